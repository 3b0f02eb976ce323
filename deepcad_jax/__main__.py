"""`python -m deepcad_jax` is the `deepcad-jax` command."""

from deepcad_jax.cli import entry

entry()
