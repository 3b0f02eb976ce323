"""Movie I/O (reading, atomic writing, metadata) and the training-pair input pipeline."""

from deepcad_jax.data.metadata import MovieMetadata, read_metadata
from deepcad_jax.data.movie import (ArrayMovie, Movie, TiffMovie, as_movie, list_movies,
                                    open_movie, refuse_to_overwrite)
from deepcad_jax.data.output import (AtomicFile, MovieWriter, check_space, commit,
                                     write_movie)
from deepcad_jax.data.pairs import PairSource, fit_patch, pair_iterator

__all__ = ["ArrayMovie", "AtomicFile", "Movie", "MovieMetadata", "MovieWriter",
           "TiffMovie", "as_movie", "check_space", "commit", "list_movies", "open_movie",
           "read_metadata", "refuse_to_overwrite", "write_movie", "PairSource", "fit_patch",
           "pair_iterator"]
