"""Movie I/O (reading, atomic writing, metadata) and the training-pair input pipeline.

The pair pipeline (`PairSource`, `fit_patch`, `pair_iterator`) needs grain, a training
dependency: it is imported when first used, so that inference does not load it.
"""

import importlib

from deepcad_jax.data.metadata import MovieMetadata, read_metadata
from deepcad_jax.data.movie import (ArrayMovie, Movie, TiffMovie, as_movie, list_movies,
                                    open_movie, refuse_to_overwrite)
from deepcad_jax.data.output import (AtomicFile, MovieWriter, check_space, commit,
                                     write_movie)

_TRAINING = ("PairSource", "fit_patch", "pair_iterator")

__all__ = ["ArrayMovie", "AtomicFile", "Movie", "MovieMetadata", "MovieWriter",
           "TiffMovie", "as_movie", "check_space", "commit", "list_movies", "open_movie",
           "read_metadata", "refuse_to_overwrite", "write_movie", *_TRAINING]


def __getattr__(name: str):
  """The pair pipeline's names, imported on first use (a deliberate lazy import)."""
  if name in _TRAINING:
    return getattr(importlib.import_module("deepcad_jax.data.pairs"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
