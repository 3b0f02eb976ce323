"""Movie I/O: reading (TIFF and the formats in `formats/`), metadata, and writing.

The training-pair pipeline, which needs grain, lives in `deepcad_jax.training.pairs`.
"""

from deepcad_jax.data.metadata import MovieMetadata, read_metadata
from deepcad_jax.data.movie import (ArrayMovie, Movie, TiffMovie, as_movie, list_movies,
                                    open_movie, refuse_to_overwrite)
from deepcad_jax.data.writers import MovieWriter, write_movie
from deepcad_jax.runtime.files import AtomicFile, check_space, commit

__all__ = ["ArrayMovie", "AtomicFile", "Movie", "MovieMetadata", "MovieWriter",
           "TiffMovie", "as_movie", "check_space", "commit", "list_movies", "open_movie",
           "read_metadata", "refuse_to_overwrite", "write_movie"]
