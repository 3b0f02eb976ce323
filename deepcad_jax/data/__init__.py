"""Movie I/O and the training-pair input pipeline."""

from deepcad_jax.data.movie import (ArrayMovie, Movie, TiffMovie, as_movie, list_movies,
                                    open_movie, refuse_to_overwrite, write_movie)
from deepcad_jax.data.pairs import PairSource, fit_patch, pair_iterator

__all__ = ["ArrayMovie", "Movie", "TiffMovie", "as_movie", "list_movies", "open_movie",
           "refuse_to_overwrite", "write_movie", "PairSource", "fit_patch", "pair_iterator"]
