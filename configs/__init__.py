"""Named configurations; each module exposes get_config(arg=None) -> Config."""
