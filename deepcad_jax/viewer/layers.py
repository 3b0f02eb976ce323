"""Movies as napari layers: a lazy array over `data.movie`, the readers of every format
the project reads, a TIFF writer, and the demo's simulated movie as sample data.

A layer's data is a `LazyMovie`: napari asks for the frames it shows and only those are
read (`Movie.read`), so a recording larger than memory opens at once.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from deepcad_jax.analysis.simulate import simulate
from deepcad_jax.config.demo import SIMULATIONS
from deepcad_jax.data.movie import ArrayMovie, Movie, as_movie, list_movies, open_movie
from deepcad_jax.data.spec import MovieSpec
from deepcad_jax.data.writers import write_movie
from deepcad_jax.errors import UserError

CONTRAST_FRAMES = 16        # frames sampled for a layer's contrast limits
CONTRAST_PERCENTILES = (0.5, 99.8)
LayerData = tuple[Any, dict, str]


def _full_key(key, ndim: int) -> tuple:
  """An index as a tuple, its Ellipsis (if any) spelt out as full slices for `ndim`
  axes."""
  key = key if isinstance(key, tuple) else (key,)
  if any(k is Ellipsis for k in key):
    at = next(i for i, k in enumerate(key) if k is Ellipsis)
    key = key[:at] + (slice(None),) * (ndim + 1 - len(key)) + key[at + 1:]
  return key


class LazyMovie:
  """A (T, Y, X) `Movie` that napari slices like an array; frames are read on demand."""

  def __init__(self, movie: Movie):
    self.movie = movie
    self.shape = tuple(int(n) for n in movie.shape)
    self.dtype = np.dtype(movie.dtype)
    self.ndim = 3
    self.size = int(np.prod(self.shape))

  def __len__(self) -> int:
    return self.shape[0]

  def _frames(self, index) -> tuple[np.ndarray, Any]:
    """The frames `index` (along T) names, and the index of the block to apply after."""
    t = self.shape[0]
    if isinstance(index, (int, np.integer)):
      i = int(index) + (t if index < 0 else 0)
      if not 0 <= i < t:
        raise IndexError(f"frame {index} of a movie of {t} frames")
      return self.movie.read(i, i + 1), 0
    if isinstance(index, slice):
      start, stop, step = index.indices(t)
      if step > 0 and start < stop:
        return self.movie.read(start, stop), slice(None, None, step)
      index = np.arange(start, stop, step)
    index = np.asarray(index).reshape(-1) % max(t, 1)
    if index.size == 0:
      return np.zeros((0,) + self.shape[1:], self.dtype), slice(None)
    lo = int(index.min())
    return self.movie.read(lo, int(index.max()) + 1), index - lo

  def __getitem__(self, key) -> np.ndarray:
    key = _full_key(key, self.ndim)
    block, pick = self._frames(key[0] if key else slice(None))
    return np.asarray(block[(pick,) + tuple(key[1:])])

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    whole = self.movie.read(0, self.shape[0])
    return whole if dtype is None else whole.astype(dtype)


class LazyStack:
  """(S, T, Y, X) sample movies, one `Movie` each, that napari slices like an array;
  frames are read on demand."""

  def __init__(self, movies: list[Movie]):
    self.movies = [LazyMovie(m) for m in movies]
    self.shape = (len(movies),) + self.movies[0].shape
    self.dtype = self.movies[0].dtype
    self.ndim = 4
    self.size = int(np.prod(self.shape))

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, key) -> np.ndarray:
    key = _full_key(key, self.ndim)
    first, rest = (key[0], key[1:]) if key else (slice(None), ())
    if isinstance(first, (int, np.integer)):
      return self.movies[int(first)][rest]
    picks = np.arange(len(self.movies))[first]
    return np.stack([self.movies[int(i)][rest] for i in np.atleast_1d(picks)])

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    whole = np.stack([np.asarray(m) for m in self.movies])
    return whole if dtype is None else whole.astype(dtype)


def sample_movies(layer: Any) -> list[Movie]:
  """The sample movies behind a (sample, T, Y, X) image layer: its files (lazy, as
  `view --samples` opens them) or its array (as the Denoise panel adds them)."""
  data = layer.data
  if isinstance(data, LazyStack):
    return [m.movie for m in data.movies]
  if getattr(data, "ndim", 0) != 4 or data.shape[0] < 2:
    raise UserError(f"layer {layer.name!r} is {tuple(data.shape)}; the samples are one "
                    "layer of at least 2 movies (sample, T, Y, X), as the Denoise panel "
                    "adds them or view --samples opens them.")
  return [ArrayMovie(data[i], f"layer {layer.name!r} sample {i}") for i in range(len(data))]


def contrast_limits(movie: Movie) -> tuple[float, float]:
  """Robust display limits from a few frames spread over the movie."""
  t = movie.shape[0]
  picks = sorted({int(i) for i in np.linspace(0, t - 1, min(t, CONTRAST_FRAMES))})
  values = np.concatenate([movie.read(i, i + 1).ravel() for i in picks]).astype(np.float64)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return 0.0, 1.0
  lo, hi = np.percentile(values, CONTRAST_PERCENTILES)
  return float(lo), float(hi if hi > lo else lo + 1.0)


def movie_layer(movie: Movie, name: str, **kwargs: Any) -> LayerData:
  """A napari image layer tuple for `movie`, lazy, with its contrast limits."""
  meta = {"name": name, "contrast_limits": contrast_limits(movie),
          "metadata": {"deepcad_source": movie.name}, **kwargs}
  return LazyMovie(movie), meta, "image"


def read_layers(path: str) -> list[LayerData]:
  """Every movie of `path` (one per plane and channel of a recording) as a layer."""
  parts = list_movies(path)
  return [movie_layer(open_movie(p), _layer_name(p)) for p in parts]


def _layer_name(path: str) -> str:
  spec = MovieSpec.parse(path)
  base = os.path.basename(spec.path.rstrip("/\\")) or spec.path
  return base + (f"[{','.join(f'{k}={v}' for k, v in spec.options.items())}]"
                 if spec.plane is not None or spec.channel is not None else "")


def napari_get_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
  """The reader of `path` when it is a movie deepcad-jax reads (TIFF, HDF5, Zarr, NWB,
  a suite2p plane folder, a CaImAn memmap, `raw:FILE[shape=...,dtype=...]`), else None."""
  if isinstance(path, (list, tuple)):
    if len(path) != 1:
      return None
    path = path[0]
  path = os.fspath(path)
  try:
    spec = MovieSpec.parse(path)
    kind = spec.kind
  except UserError:
    return None
  if kind in ("unknown", "folder") or (kind == "raw" and spec.shape is None):
    return None
  return lambda p: read_layers(p[0] if isinstance(p, (list, tuple)) else os.fspath(p))


def write_tiff(path: str, data: Any, meta: dict) -> list[str]:
  """napari's writer for one image layer: a (T, Y, X) movie as TIFF, written under its
  name only once complete (other shapes: napari's own writers)."""
  array = np.asarray(data)
  if array.ndim != 3:
    raise UserError(f"{path}: deepcad-jax writes (T, Y, X) movies; the layer has shape "
                    f"{array.shape}: save it with napari's own TIFF writer.")
  write_movie(path, array)
  return [path]


def sample_movie(preset: str = "quick", seed: int = 0) -> list[LayerData]:
  """The demo's simulated movie (noisy) and its ground truth (clean), as layers."""
  noisy, clean, _ = simulate(seed=seed, **SIMULATIONS[preset])
  return [movie_layer(as_movie(noisy, "noisy"), "noisy (simulated)"),
          movie_layer(as_movie(clean, "clean"), "clean (ground truth)", visible=False)]


def sample_demo() -> list[LayerData]:
  """napari's sample data: the demo's full simulated movie with its ground truth."""
  return sample_movie("full")


def layer_movie(layer: Any) -> Movie:
  """The movie behind an image layer: its file (lazy), or its array (T, Y, X)."""
  if layer is None:
    raise UserError("choose an image layer first (open a movie or add the sample data).")
  data = layer.data
  if isinstance(data, LazyMovie):
    return data.movie
  return as_movie(np.asarray(data), f"layer {layer.name!r}")


def layer_path(layer: Any) -> str | None:
  """The file an image layer was read from (None: an array in memory)."""
  data = getattr(layer, "data", None)
  return data.movie.name if isinstance(data, LazyMovie) and os.path.exists(
      MovieSpec.parse(data.movie.name).path) else None
