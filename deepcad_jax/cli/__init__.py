"""The `deepcad-jax` command: `app` builds the parser and runs a command."""

from deepcad_jax.cli.app import entry, main

__all__ = ["entry", "main"]
