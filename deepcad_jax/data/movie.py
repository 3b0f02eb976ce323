"""Movies (T, Y, X): lazy readers of every input format, and arrays (`data.writers`).

A movie is named by a spec (`data.spec`): a TIFF, an HDF5 file or Zarr store (and the
array inside), an NWB file (and its imaging series), a suite2p plane folder or a raw
binary file, with the axis order and the interleaving where the file does not say them
(`data.axes`). A volumetric or multi-channel recording is several movies, one per plane
and channel: `list_movies` names them (`rec.h5[plane=0,channel=1]`), `open_movie` opens
one.

A `Movie` has `shape`, `dtype`, `read(t0, t1)`, `mean()` and `spread()` (one pass) and
`metadata` (carried to outputs). TIFFs are memory-mapped when tifffile can, else read
page range by page range: a large recording is never loaded whole.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np
import tifffile

from deepcad_jax.data.formats import caiman, hdf5, nwb, raw, suite2p, zarr_store
from deepcad_jax.data.axes import (Layout, Source, check_dtype, layout, native,
                                   read_movie_frames)
from deepcad_jax.data.formats.tiff import (check_series, data_end, movie_shape, open_tiff,
                                           read_frames, tiff_source, tifffile_problems)
from deepcad_jax.data.metadata import MovieMetadata, read_metadata
from deepcad_jax.data.writers import write_movie  # noqa: F401 (re-exported)
from deepcad_jax.data.spec import MovieSpec, is_store
from deepcad_jax.errors import UserError
from deepcad_jax.runtime.paths import check_input

TIFF_SUFFIXES = (".tif", ".tiff")
MOVIE_SUFFIXES = (".tif", ".tiff", ".h5", ".hdf5", ".nwb", ".zarr", ".mmap")  # in a folder
INPUT_FORMATS = ("TIFF (.tif), HDF5 (.h5), Zarr (.zarr), NWB (.nwb), a suite2p plane "
                 "folder, a CaImAn memmap (.mmap), or raw:FILE[shape=TxYxX,dtype=...]")
CHUNK_BYTES = 256 * 2**20     # frames read at a time when scanning a file
SPREAD_SAMPLE, SPREAD_CLIP = 2_000_000, 0.001  # a movie's spread: voxels sampled, clip


class Movie:
  """A (T, Y, X) recording that can be read frame range by frame range."""

  name: str = "<array>"
  shape: tuple[int, int, int]
  dtype: np.dtype
  # one plane/channel of a recording: the recording's axes (of TZCYX, in its file's
  # order) and shape, for an output that keeps them in one file
  recording: tuple[str, tuple[int, ...]] | None = None
  _mean_image64: np.ndarray | None = None  # temporal mean image, from one pass
  _sample: np.ndarray | None = None        # every k-th voxel, from the same pass

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

  def spread(self) -> float:
    """The std of the voxels clipped to their 0.1 and 99.9 percentiles (a sample of up
    to SPREAD_SAMPLE voxels over the whole movie): it scales with the gain and ignores
    the offset (`core.normalise`); 0 for a constant movie."""
    if self._scan() is None or self._sample is None or self._sample.size < 2:
      return 0.0
    lo, hi = np.quantile(self._sample, [SPREAD_CLIP, 1 - SPREAD_CLIP])
    return float(np.clip(self._sample, lo, hi).std())

  def mean_image(self) -> np.ndarray:
    """Temporal mean image (Y, X), float32, of the whole movie (the mean-image prior)."""
    return self._scan().astype(np.float32)

  def _scan(self) -> np.ndarray:
    """The float64 temporal mean image and the spread's sample, from one pass (then
    cached); rejects NaN or infinite values."""
    if self._mean_image64 is not None:
      return self._mean_image64
    total = np.zeros(self.shape[1:], np.float64)
    frame = int(np.prod(self.shape[1:]))
    every, sample = max(1, -(-frame * self.shape[0] // SPREAD_SAMPLE)), []
    for t0, block in self.chunks():
      if block.dtype.kind == "f" and not np.isfinite(block).all():
        bad = int(np.argmax(~np.isfinite(block).reshape(len(block), -1).all(1))) + t0
        raise UserError(f"{self.name} {self.shape} contains NaN or infinite values "
                        f"(first in frame {bad}); replace them (e.g. with 0) first.")
      total += block.sum(0, dtype=np.float64)
      sample.append(block.reshape(-1)[(-t0 * frame) % every::every].astype(np.float64))
    self._mean_image64 = total / max(1, self.shape[0])
    self._sample = np.concatenate(sample) if sample else None
    return self._mean_image64


class ArrayMovie(Movie):
  """A movie already in memory (or any array-like with numpy slicing, e.g. a memmap)."""

  def __init__(self, array, name: str = "<array>"):
    self.array = array
    self.name = name
    self.shape = tuple(int(s) for s in array.shape)
    self.dtype = np.dtype(array.dtype).newbyteorder("=")  # read in native order

  def read(self, t0: int, t1: int) -> np.ndarray:
    return native(self.array[t0:t1])


class TiffMovie(Movie):
  """A TIFF file read lazily: memory map when possible, page ranges otherwise.

  The file is checked when opened (see `data.formats.tiff.check_series`), so that a truncated or
  damaged file, a colour image or a file of several series is refused with one sentence
  before any work; a frame that still cannot be read later raises `UserError` too.
  """

  def __init__(self, path: str):
    self.name = path
    self.path = path
    with tifffile_problems() as problems, open_tiff(path) as tif:
      series = check_series(path, tif, problems)
      self.shape, self._frame_axis = movie_shape(path, series.shape, series.axes)
      self.dtype = check_dtype(path, series.dtype)
      self._pages_are_frames = len(series.pages) == self.shape[0]
      self._data_end = data_end(series)
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
      with open_tiff(self.path) as tif:
        self._metadata = read_metadata(tif, self._frame_axis)
    return self._metadata

  def read(self, t0: int, t1: int) -> np.ndarray:
    try:
      with tifffile_problems() as problems:
        frames = self._read(t0, t1)
      if problems:
        raise ValueError(problems[0])
      return native(frames)
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


def open_source(spec: MovieSpec) -> Source:
  """The array `spec` names, opened lazily by the reader of its format."""
  kind, path = spec.kind, spec.path
  if kind == "hdf5":
    return hdf5.open_hdf5(path, spec.dataset)
  if kind == "zarr":
    return zarr_store.open_zarr(path, spec.dataset)
  if kind == "nwb":
    return nwb.open_nwb(path, spec.dataset)
  if kind == "suite2p":
    return suite2p.open_plane(path)
  if kind == "raw":
    return raw.open_raw(path, spec.shape, spec.dtype, spec.offset)
  if kind == "caiman":
    return caiman.open_memmap(path)
  if kind == "tiff":
    return tiff_source(path)[0]
  if kind == "folder":
    raise UserError(f"{path} is a folder; give one movie file here ({INPUT_FORMATS}).")
  raise UserError(f"{path} is not a movie format deepcad-jax reads; give {INPUT_FORMATS}, "
                  "or name the format, e.g. hdf5:FILE.")


def open_layout(spec: MovieSpec) -> Layout:
  """The recording `spec` names, with its axes, planes and channels settled."""
  source = open_source(spec)
  try:
    return layout(source, spec.axes, spec.planes, spec.channels)
  except BaseException:
    if source.close is not None:
      source.close()
    raise


def _uses_layout(spec: MovieSpec) -> bool:
  """Whether a TIFF needs the general reader (axes, planes or a selection given)."""
  return any(v is not None for v in (spec.axes, spec.planes, spec.channels, spec.plane,
                                     spec.channel))


class RecordingMovie(Movie):
  """One plane and channel of a recording in any format, read lazily (`data.axes`).

  Opened from its spec; a recording of several planes or channels needs the plane and
  channel named (`list_movies` names each).
  """

  def __init__(self, spec: MovieSpec, lay: Layout | None = None):
    self.spec = spec
    self._layout = lay if lay is not None else open_layout(spec)
    lay = self._layout
    planes, channels = lay.planes, lay.channels
    self.plane = _pick(spec, "plane", spec.plane, planes, channels)
    self.channel = _pick(spec, "channel", spec.channel, channels, planes)
    self.name = str(spec) if spec.plane is not None or spec.channel is not None or \
        not spec.is_plain else lay.source.name
    self.shape = lay.movie_shape
    self.dtype = check_dtype(self.name, lay.array.dtype)
    kept = [i for i, a in enumerate(lay.axes) if a != "Q"]
    self.recording = ("".join(lay.axes[i] for i in kept),
                      tuple(int(lay.array.shape[i]) for i in kept))
    if 0 in self.shape:
      raise UserError(f"{self.name} holds no frames (shape {self.shape}); check the "
                      "file, its --axes, --planes and --channels.")

  @property
  def metadata(self) -> MovieMetadata:
    return self._open().source.metadata

  def _open(self) -> Layout:
    if self._layout is None:
      self._layout = open_layout(self.spec)
    return self._layout

  def read(self, t0: int, t1: int) -> np.ndarray:
    try:
      return read_movie_frames(self._open(), self.plane, self.channel, t0, t1)
    except UserError:
      raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:
      raise UserError(f"{self.name}: frames {t0} to {t1 - 1} could not be read ({e}); "
                      "the file is damaged: copy it again from the original.") from None

  def close(self) -> None:
    if self._layout is not None and self._layout.source.close is not None:
      self._layout.source.close()
    self._layout = None

  def __getstate__(self):
    return {**self.__dict__, "_layout": None}  # reopened lazily in another process


def _pick(spec: MovieSpec, what: str, chosen: int | None, count: int, other: int) -> int:
  if chosen is None:
    if count > 1:
      example = spec.with_(plane=0, channel=0 if (other if what == "plane" else count) > 1
                           else None) if what == "plane" else spec.with_(channel=0)
      raise UserError(f"{spec} is a recording of {count} {what}s; give one, e.g. "
                      f"'{example}' (train and denoise split it into one movie per "
                      f"{what} by themselves).")
    return 0
  if not 0 <= chosen < count:
    raise UserError(f"{spec}: {what} {chosen} does not exist: the recording has {count} "
                    f"{what}(s), numbered from 0.")
  return chosen


def _check_raw_options(spec: MovieSpec) -> None:
  """A raw binary's shape, dtype and offset given for another format are refused, never
  silently ignored (the file says its own)."""
  given = [k for k in ("shape", "dtype", "offset") if getattr(spec, k) is not None]
  if given and spec.kind not in ("raw", "folder", "unknown"):
    raise UserError(f"{spec.path}: {', '.join(given)} (--raw-shape, --raw-dtype) describe "
                    f"raw binary files only, and this is a {spec.kind} file, which says "
                    "its own; leave them out.")


def open_movie(path: "str | MovieSpec") -> Movie:
  """Open one movie, validating it is (T, Y, X): a TIFF, or any format `data.spec`
  names (one plane and channel of it)."""
  spec = MovieSpec.parse(path)
  check_input(spec.path)  # exists, and no FIFO, device or looping link
  _check_raw_options(spec)
  kind = spec.kind
  if kind == "tiff" and not _uses_layout(spec):
    source, plain = tiff_source(spec.path)
    if plain:
      return TiffMovie(spec.path)
    return RecordingMovie(spec, layout(source, None, None, None))
  if kind == "folder":
    raise UserError(f"{spec.path} is a folder; give one movie file here "
                    f"({INPUT_FORMATS}).")
  if kind == "unknown":
    raise UserError(f"{spec.path} is not a TIFF file (.tif or .tiff) or another format "
                    f"deepcad-jax reads; give {INPUT_FORMATS}.")
  return RecordingMovie(spec)


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


def read_mean_image(path: str) -> np.ndarray:
  """A (Y, X) mean image from a 2-D TIFF, or the temporal mean of a TIFF movie."""
  with tifffile_problems() as problems, open_tiff(path) as tif:
    shape = tuple(check_series(path, tif, problems).shape)
  if int(np.prod(shape[:-2], dtype=np.int64)) == 1:
    return read_frames(path)[0].astype(np.float32)
  return open_movie(path).mean_image()


def refuse_to_overwrite(paths: Iterable[str], overwrite: bool) -> None:
  """Nothing the user has is replaced unless they asked (`--overwrite`)."""
  if overwrite:
    return
  for path in paths:
    if os.path.exists(MovieSpec.parse(path).path):
      raise UserError(f"{path} already exists; add --overwrite to replace it or choose "
                      "another --output.")


def movie_parts(path: "str | MovieSpec") -> list[str]:
  """The movies of one recording: itself, or one spec per plane and channel."""
  spec = MovieSpec.parse(path)
  _check_raw_options(spec)
  if spec.kind == "tiff" and not _uses_layout(spec):
    source, plain = tiff_source(spec.path)
    if plain:
      return [os.fspath(path) if isinstance(path, str) else str(spec)]
    lay = layout(source, None, None, None)
  else:
    lay = open_layout(spec)
  try:
    planes, channels = lay.planes, lay.channels
  finally:
    if lay.source.close is not None:
      lay.source.close()
  if planes * channels == 1 or (spec.plane is not None and spec.channel is not None):
    return [os.fspath(path) if isinstance(path, str) else str(spec)]
  plane_ids = [spec.plane] if spec.plane is not None else range(planes)
  channel_ids = [spec.channel] if spec.channel is not None else range(channels)
  return [str(spec.with_(plane=z if planes > 1 else None, channel=c if channels > 1
                         else None)) for z in plane_ids for c in channel_ids]


def list_movies(path: "str | MovieSpec") -> list[str]:
  """The movies of a file or a folder (sorted): a recording of several planes or
  channels gives one movie per plane and channel (`movie_parts`). A folder's files of
  every readable format are listed (TIFF, HDF5, NWB, Zarr stores, suite2p plane
  folders); the options of `path` (e.g. axes) apply to each."""
  spec = MovieSpec.parse(path)
  if not os.path.lexists(spec.path):
    raise UserError(f"{spec.path} does not exist; give a movie file or a folder of them.")
  check_input(spec.path)
  if os.path.isdir(spec.path) and not is_store(spec.path) and spec.format is None:
    names = sorted(os.listdir(spec.path))
    files = [os.path.join(spec.path, f) for f in names if not f.startswith(".") and (
        f.lower().endswith(MOVIE_SUFFIXES) or is_store(os.path.join(spec.path, f)))]
    for f in files:  # a FIFO or device among them would block training or denoising
      check_input(f)
    if not files:
      raise UserError(f"{spec.path} holds no .tif or .tiff files (nor other movies: "
                      f"{INPUT_FORMATS}); put the movies there or give one file.")
    if spec.is_plain:
      return [p for f in files for p in movie_parts(f)]
    return [p for f in files for p in movie_parts(spec.with_(path=f))]
  kind = spec.kind
  if kind == "unknown":
    raise UserError(f"{spec.path} is not a TIFF file (.tif or .tiff) or another format "
                    f"deepcad-jax reads; give {INPUT_FORMATS}.")
  return movie_parts(path)
