"""Movies (T, Y, X): lazy TIFF readers and in-memory arrays (writing: `data.output`).

A `Movie` exposes `shape`, `dtype`, `read(t0, t1)` (frames as a numpy array), `mean()`
(float64, computed chunk by chunk) and `metadata` (pixel size, frame interval, ImageJ
and OME fields, carried to the outputs). TIFFs are memory-mapped when tifffile can (plain,
uncompressed files) and otherwise read page range by page range, so a large recording is
never loaded whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterable, Iterator

import numpy as np
import tifffile

from deepcad_jax.data.metadata import MovieMetadata, read_metadata
from deepcad_jax.data.output import write_movie  # noqa: F401 (re-exported)
from deepcad_jax.errors import UserError

TIFF_SUFFIXES = (".tif", ".tiff")
FRAME_AXES = "TZQIR"          # tifffile axis codes that can hold frames
CHUNK_BYTES = 256 * 2**20     # frames read at a time when scanning a file


class Movie:
  """A (T, Y, X) recording that can be read frame range by frame range."""

  name: str = "<array>"
  shape: tuple[int, int, int]
  dtype: np.dtype
  _mean_image64: np.ndarray | None = None  # temporal mean image, from one pass

  def read(self, t0: int, t1: int) -> np.ndarray:
    raise NotImplementedError

  @property
  def metadata(self) -> MovieMetadata:
    """Acquisition metadata to carry to outputs (none for an array)."""
    return MovieMetadata()

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * self.dtype.itemsize

  def chunks(self, max_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, np.ndarray]]:
    """(t0, frames) blocks of at most `max_bytes`, in order."""
    frame_bytes = max(1, self.shape[1] * self.shape[2] * self.dtype.itemsize)
    step = max(1, max_bytes // frame_bytes)
    for t0 in range(0, self.shape[0], step):
      yield t0, self.read(t0, min(self.shape[0], t0 + step))

  def mean(self) -> float:
    """Mean intensity of the whole movie; rejects NaN or infinite values."""
    image = self._scan()
    return float(image.mean()) if image.size else 0.0

  def mean_image(self) -> np.ndarray:
    """Temporal mean image (Y, X), float32, of the whole movie (the mean-image prior)."""
    return self._scan().astype(np.float32)

  def _scan(self) -> np.ndarray:
    """The float64 temporal mean image, from one pass over the file (then cached);
    rejects NaN or infinite values."""
    if self._mean_image64 is not None:
      return self._mean_image64
    total = np.zeros(self.shape[1:], np.float64)
    for t0, block in self.chunks():
      if block.dtype.kind == "f" and not np.isfinite(block).all():
        bad = int(np.argmax(~np.isfinite(block).reshape(len(block), -1).all(1))) + t0
        raise UserError(f"{self.name} {self.shape} contains NaN or infinite values "
                        f"(first in frame {bad}); replace them (e.g. with 0) first.")
      total += block.sum(0, dtype=np.float64)
    self._mean_image64 = total / max(1, self.shape[0])
    return self._mean_image64


class ArrayMovie(Movie):
  """A movie already in memory (or any array-like with numpy slicing, e.g. a memmap)."""

  def __init__(self, array, name: str = "<array>"):
    self.array = array
    self.name = name
    self.shape = tuple(int(s) for s in array.shape)
    self.dtype = np.dtype(array.dtype)

  def read(self, t0: int, t1: int) -> np.ndarray:
    return np.asarray(self.array[t0:t1])


class TiffMovie(Movie):
  """A TIFF file read lazily: memory map when possible, page ranges otherwise.

  The file is checked when opened (see `_check_series`), so that a truncated or
  damaged file, a colour image or a file of several series is refused with one sentence
  before any work; a frame that still cannot be read later raises `UserError` too.
  """

  def __init__(self, path: str):
    self.name = path
    self.path = path
    with _tifffile_problems() as problems, _open_tiff(path) as tif:
      series = _check_series(path, tif, problems)
      self.shape, self._frame_axis = _movie_shape(path, series.shape, series.axes)
      self.dtype = np.dtype(series.dtype)
      self._pages_are_frames = len(series.pages) == self.shape[0]
      self._data_end = _data_end(series)
    self._map = None
    try:
      self._map = tifffile.memmap(path, mode="r").reshape(self.shape)
    except (ValueError, OSError):
      self._map = None  # compressed or not contiguous: read pages

  @property
  def memory_mapped(self) -> bool:
    return self._map is not None

  @property
  def metadata(self) -> MovieMetadata:
    """Pixel size, frame interval, ImageJ and OME fields of the file (read once)."""
    if getattr(self, "_metadata", None) is None:
      with _open_tiff(self.path) as tif:
        self._metadata = read_metadata(tif, self._frame_axis)
    return self._metadata

  def read(self, t0: int, t1: int) -> np.ndarray:
    try:
      with _tifffile_problems() as problems:
        frames = self._read(t0, t1)
      if problems:
        raise ValueError(problems[0])
      return frames
    except UserError:
      raise
    except (ValueError, OSError, RuntimeError, tifffile.TiffFileError) as e:
      raise UserError(f"{self.path}: frames {t0} to {t1 - 1} could not be read ({e}); "
                      "the file is damaged: copy it again from the original.") from None

  def _read(self, t0: int, t1: int) -> np.ndarray:
    if self._map is not None:
      # A memory map of a file that shrank since it was opened would crash the process
      # (SIGBUS) when touched beyond the end: check the size first.
      size = os.path.getsize(self.path)
      if size < self._data_end:
        raise UserError(f"{self.path} shrank to {size} bytes while being read (its "
                        f"frames end at byte {self._data_end}); let the copy or the "
                        "recording finish, then run again.")
      return np.asarray(self._map[t0:t1])
    with tifffile.TiffFile(self.path) as tif:
      if self._pages_are_frames:
        frames = tif.asarray(series=0, key=slice(t0, t1))
      else:  # frames are not separate pages: read the series once
        frames = tif.asarray(series=0).reshape(self.shape)[t0:t1]
    return np.asarray(frames).reshape((t1 - t0,) + self.shape[1:])

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_map"] = None  # reopened lazily in another process
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    try:
      self._map = tifffile.memmap(self.path, mode="r").reshape(self.shape)
    except (ValueError, OSError):
      self._map = None


class _Problems(logging.Handler):
  """Collects what tifffile logs at ERROR level (a broken page chain, a shaped series
  that does not fit its data) instead of printing it."""

  def __init__(self):
    super().__init__(logging.ERROR)
    self.messages: list[str] = []

  def emit(self, record: logging.LogRecord) -> None:
    message = record.getMessage()  # without tifffile's '<tifffile.TiffPages @8> '
    self.messages.append(message.split("> ", 1)[1] if message.startswith("<") and
                         "> " in message else message)


@contextlib.contextmanager
def _tifffile_problems() -> Iterator[list[str]]:
  """tifffile's error messages while the block runs, kept from the terminal (warnings,
  e.g. metadata it ignored, are dropped: the checks below judge the data itself)."""
  logger = logging.getLogger("tifffile")
  handler = _Problems()
  propagate = logger.propagate
  logger.addHandler(handler)
  logger.propagate = False
  try:
    yield handler.messages
  finally:
    logger.removeHandler(handler)
    logger.propagate = propagate


def _open_tiff(path: str) -> tifffile.TiffFile:
  if os.path.isdir(path):
    raise UserError(f"{path} is a folder; give one TIFF movie file here.")
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    raise UserError(f"{path} is empty (0 bytes); the copy or the recording did not "
                    "finish: copy it again.")
  try:
    return tifffile.TiffFile(path)
  except FileNotFoundError:
    raise UserError(f"{path} does not exist; check the path.") from None
  except PermissionError:
    raise UserError(f"{path} cannot be read (permission denied); check its "
                    "permissions.") from None
  except (tifffile.TiffFileError, ValueError, OSError) as e:
    raise UserError(f"{path} is not a readable TIFF file ({e}); give a .tif movie "
                    "with frames as pages.") from None


def _check_series(path: str, tif: tifffile.TiffFile, problems: list[str]):
  """The one image series of a TIFF, once it is known to be whole: refuses a damaged
  or truncated file, several series, colour samples, zero frames, and metadata that
  describes more or fewer frames than the file holds."""
  damaged = "; copy it again from the original (or re-save it)"
  try:
    all_series = tif.series
    pages = len(tif.pages)  # walks the whole page chain: finds a cut-off file
  except (tifffile.TiffFileError, ValueError, OSError, IndexError) as e:
    raise UserError(f"{path} is damaged ({e}){damaged}.") from None
  if problems:
    raise UserError(f"{path} is damaged or truncated (tifffile: {problems[0]})"
                    f"{damaged}.")
  if not all_series:
    raise UserError(f"{path} holds no image data{damaged}.")
  if len(all_series) > 1:
    shapes = ", ".join(str(tuple(s.shape)) for s in all_series[:4])
    raise UserError(f"{path} holds {len(all_series)} image series ({shapes}"
                    f"{', ...' if len(all_series) > 4 else ''}) and only one movie per "
                    "file is read; save each series as its own TIFF (e.g. "
                    "tifffile.imwrite(f'part{i}.tif', tifffile.imread(path, series=i))).")
  series = all_series[0]
  photometric = getattr(series.keyframe, "photometric", None)
  samples = dict(zip(series.axes, series.shape)).get("S", 1)
  if samples > 1 or photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR):
    raise UserError(f"{path} is a colour image (shape {tuple(series.shape)}, axes "
                    f"{series.axes}, {samples} samples per pixel); deepcad-jax denoises "
                    "grayscale movies (T, Y, X): save one channel per file, or convert "
                    "it to grayscale.")
  if 0 in tuple(series.shape):
    raise UserError(f"{path} holds no frames (shape {tuple(series.shape)}); export the "
                    "recording again.")
  end, size = _data_end(series), os.path.getsize(path)
  if end > size:
    raise UserError(f"{path} is truncated: its header describes {tuple(series.shape)} "
                    f"{series.dtype} data ending at byte {end}, but the file has {size} "
                    f"bytes{damaged}.")
  frames = int(np.prod(series.shape[:-2], dtype=np.int64))
  if pages > frames:
    raise UserError(f"{path} holds {pages} pages but its metadata describes "
                    f"{frames} frame(s) {tuple(series.shape)}, so frames would be lost; "
                    "re-save it with the right frame count (e.g. ImageJ: Image > "
                    "Properties; or tifffile.imwrite with every page).")
  return series


def _data_end(series) -> int:
  """The byte after the last image data a series refers to."""
  if series.dataoffset is not None:
    return int(series.dataoffset) + int(series.nbytes)
  end = 0
  for page in series.pages:
    if page is not None:
      end = max([end] + [int(o) + int(n) for o, n in zip(page.dataoffsets,
                                                          page.databytecounts)])
  return end


def _movie_shape(path: str, shape, axes: str) -> tuple[tuple[int, int, int], str]:
  """(T, Y, X) of a TIFF series: singleton axes squeezed, one frame axis allowed."""
  if len(shape) != len(axes) or axes[-2:] != "YX":
    if len(shape) == 3:
      return tuple(int(s) for s in shape), "?"
    raise UserError(f"{path} has shape {tuple(shape)} with axes {axes!r}; expected a "
                    "movie with frames, rows and columns (T, Y, X).")
  extra = [(a, n) for a, n in zip(axes[:-2], shape[:-2]) if n > 1]
  if not extra:
    raise UserError(f"{path} is a single 2-D image of shape {tuple(shape[-2:])}; "
                    "a movie needs many frames (T, Y, X).")
  if len(extra) > 1 or extra[0][0] not in FRAME_AXES:
    desc = ", ".join(f"{a}={n}" for a, n in extra)
    raise UserError(f"{path} has shape {tuple(shape)} (axes {axes}) with more than one "
                    f"axis besides Y and X ({desc}); save one movie (T, Y, X) per file, "
                    "e.g. one file per channel or plane.")
  return (int(extra[0][1]), int(shape[-2]), int(shape[-1])), extra[0][0]



def open_movie(path: str) -> TiffMovie:
  """Open one TIFF movie, validating it is (T, Y, X)."""
  if not os.path.exists(path):
    raise UserError(f"{path} does not exist; check the path.")
  if os.path.isdir(path):
    raise UserError(f"{path} is a folder; give one TIFF movie file here.")
  if not path.lower().endswith(TIFF_SUFFIXES):
    raise UserError(f"{path} is not a TIFF file (.tif or .tiff); convert the movie "
                    "to TIFF first.")
  return TiffMovie(path)


def as_movie(movie, name: str = "<array>") -> Movie:
  """A `Movie` from a path, a `Movie`, or a (T, Y, X) array."""
  if isinstance(movie, Movie):
    return movie
  if isinstance(movie, (str, os.PathLike)):
    return open_movie(os.fspath(movie))
  if not hasattr(movie, "shape") or not hasattr(movie, "dtype"):
    movie = np.asarray(movie)
  if len(movie.shape) != 3:
    raise UserError(f"{name} has shape {tuple(movie.shape)}; a movie must be a 3-D "
                    "array (T, Y, X).")
  return ArrayMovie(movie, name)


def read_frames(path: str) -> np.ndarray:
  """A whole TIFF as (N, Y, X) frames: a single 2-D image (N = 1) or a movie, checked
  as `TiffMovie` checks files (for mean images and the files a watched folder
  receives, which may hold one frame each)."""
  with _tifffile_problems() as problems, _open_tiff(path) as tif:
    series = _check_series(path, tif, problems)
    shape, axes = tuple(series.shape), series.axes
  if int(np.prod(shape[:-2], dtype=np.int64)) > 1:
    shape = _movie_shape(path, shape, axes)[0]
  try:
    with _tifffile_problems() as problems:
      data = tifffile.imread(path)
    if problems:
      raise ValueError(problems[0])
  except (ValueError, OSError, RuntimeError, tifffile.TiffFileError) as e:
    raise UserError(f"{path} could not be read ({e}); the file is damaged: copy it "
                    "again from the original.") from None
  return np.asarray(data).reshape((-1,) + tuple(shape[-2:]))


def read_mean_image(path: str) -> np.ndarray:
  """A (Y, X) mean image from a 2-D TIFF, or the temporal mean of a TIFF movie."""
  with _tifffile_problems() as problems, _open_tiff(path) as tif:
    shape = tuple(_check_series(path, tif, problems).shape)
  if int(np.prod(shape[:-2], dtype=np.int64)) == 1:
    return read_frames(path)[0].astype(np.float32)
  return open_movie(path).mean_image()


def refuse_to_overwrite(paths: Iterable[str], overwrite: bool) -> None:
  """Nothing the user has is replaced unless they asked (`--overwrite`)."""
  if overwrite:
    return
  for path in paths:
    if os.path.exists(path):
      raise UserError(f"{path} already exists; add --overwrite to replace it or choose "
                      "another --output.")


def list_movies(path: str) -> list[str]:
  """One TIFF file, or the TIFF files of a folder (sorted)."""
  if not os.path.exists(path):
    raise UserError(f"{path} does not exist; give a TIFF file or a folder of TIFFs.")
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(TIFF_SUFFIXES) and not f.startswith("."))
    if not files:
      raise UserError(f"{path} holds no .tif or .tiff files; put the movies there "
                      "or give one file.")
    return files
  if not path.lower().endswith(TIFF_SUFFIXES):
    raise UserError(f"{path} is not a TIFF file (.tif or .tiff); convert the movie "
                    "to TIFF first.")
  return [path]
