"""Axes, planes and channels: any N-D recording seen as (T, Y, X) movies.

A reader (HDF5, Zarr, NWB, suite2p, raw, TIFF) gives a `Source`: an array-like with
numpy slicing (an h5py dataset, a Zarr array, a memory map, TIFF pages) and the axis
order its metadata states, if any. `layout` settles the axes (the user's `--axes`
first, then the file's metadata, then (T, Y, X) for a 3-D array) and undoes
ScanImage-style interleaving (frames stored plane by plane and channel by channel:
frame n is time n // (P*C), plane (n // C) % P, channel n % C). `read_movie_frames`
reads frames t0..t1 of one plane and channel, so that memory stays bounded by the
frames asked for.

Axis letters: T (time), Z (plane), C (channel), Y, X. A size-1 axis may be left out of
`--axes` (e.g. `--axes TCYX` for a TZCYX file with one plane).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import numpy as np
import tifffile

from deepcad_jax.data.metadata import MovieMetadata
from deepcad_jax.errors import UserError

log = logging.getLogger("deepcad_jax")

AXES = "TZCYX"
# Names that metadata uses for axes (xarray dims, OME-Zarr axes, HDF5 dimension labels).
_AXIS_NAMES = {"t": "T", "time": "T", "frame": "T", "frames": "T", "z": "Z",
               "plane": "Z", "planes": "Z", "depth": "Z", "c": "C", "channel": "C",
               "channels": "C", "y": "Y", "row": "Y", "rows": "Y", "height": "Y",
               "x": "X", "col": "X", "column": "X", "columns": "X", "width": "X"}


@dataclasses.dataclass
class Source:
  """An array inside a file, before its axes are settled."""

  array: Any                      # .shape, .dtype, numpy-style slicing
  name: str                       # for messages: 'rec.h5:/data'
  axes: str | None = None         # what the file's metadata says, if anything
  metadata: MovieMetadata = dataclasses.field(default_factory=MovieMetadata)
  close: Callable[[], None] | None = None
  interleave: tuple[int, int] | None = None   # (planes, channels) the file's metadata says


def axes_from_attr(value) -> str | None:
  """Axes from a file's `axes` attribute: a string ('TYX', b'TYX'), or a sequence or
  array of names or letters ([b't', b'y', b'x'], ['time', 'y', 'x']); None otherwise."""
  if isinstance(value, bytes):
    value = value.decode("utf-8", "replace")
  if isinstance(value, str):
    return value.strip().upper() or None
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return axes_from_attr(value.item())
  if isinstance(value, (list, tuple, np.ndarray)) and len(value):
    names = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
    if not all(isinstance(n, str) for n in names):
      return None
    if all(len(n.strip()) == 1 for n in names):
      return "".join(n.strip() for n in names).upper()
    return axes_from_names(names)
  return None


def check_dtype(name: str, dtype) -> np.dtype:
  """The dtype of a movie, in native byte order, once it is a real number type (integer
  or floating point); one sentence for complex, string, compound or other values."""
  dtype = np.dtype(dtype)
  if dtype.kind in "uif" and dtype.fields is None:
    return dtype.newbyteorder("=")
  what = {"c": "complex numbers", "S": "byte strings", "U": "text", "O": "Python objects "
          "or variable-length strings", "V": "records (a compound type)", "b": "booleans",
          "M": "dates", "m": "time spans"}.get(dtype.kind, f"values of type {dtype}")
  if dtype.fields is not None:
    what = "records (a compound type)"
  fix = ("save its real part or magnitude as float32" if dtype.kind == "c" else
         "save the movie as integers or floats (e.g. uint16, float32)")
  raise UserError(f"{name} holds {what} ({dtype}), not intensities; deepcad-jax reads "
                  f"movies of integers or floats: {fix}.")


def native(block: np.ndarray) -> np.ndarray:
  """`block` in the machine's byte order (a big-endian file's frames are converted)."""
  block = np.asarray(block)
  if not block.dtype.isnative:
    block = block.astype(block.dtype.newbyteorder("="))
  return block


def axes_from_names(names) -> str | None:
  """'TYX'-style axes from metadata names (['t', 'y', 'x'], OME-Zarr axis dicts), or
  None when any name is unknown."""
  if names is None:
    return None
  letters = []
  for n in names:
    if isinstance(n, dict):
      n = n.get("name")
    if isinstance(n, bytes):
      n = n.decode("utf-8", "replace")
    letter = _AXIS_NAMES.get(str(n).strip().lower()) if n is not None else None
    if letter is None:
      return None
    letters.append(letter)
  text = "".join(letters)
  return text if len(set(text)) == len(text) else None


class FrameGrid:
  """A stack of N frames (N, Y, X) seen as (T, P, C, Y, X): frames interleaved by plane
  and channel, as ScanImage writes them. Supports the indexing `read_movie_frames` does
  (a slice of T, an int for P and C, whole Y and X)."""

  def __init__(self, frames: Any, planes: int, channels: int):
    self.frames = frames
    self.planes, self.channels = int(planes), int(channels)
    n, y, x = (int(s) for s in frames.shape)
    per_volume = self.planes * self.channels
    self.shape = (n // per_volume, self.planes, self.channels, y, x)
    self.dtype = np.dtype(frames.dtype).newbyteorder("=")

  def __getitem__(self, index: tuple) -> np.ndarray:
    t, z, c = index[:3]
    step = self.planes * self.channels
    first = z * self.channels + c
    t0, t1, _ = t.indices(self.shape[0])
    if t1 <= t0:
      return np.zeros((0,) + self.shape[3:], self.dtype)
    start, stop = t0 * step + first, (t1 - 1) * step + first + 1
    return native(self.frames[start:stop:step] if step > 1 else
                  self.frames[start:stop])


@dataclasses.dataclass
class Layout:
  """How to read one recording's movies: its array, its axes (all of them, in file
  order), and the plane and channel counts."""

  source: Source
  array: Any
  axes: str

  @property
  def planes(self) -> int:
    return self.size("Z")

  @property
  def channels(self) -> int:
    return self.size("C")

  def size(self, axis: str) -> int:
    return int(self.array.shape[self.axes.index(axis)]) if axis in self.axes else 1

  @property
  def movie_shape(self) -> tuple[int, int, int]:
    return tuple(self.size(a) for a in "TYX")


def layout(source: Source, axes: str | None = None, planes: int | None = None,
           channels: int | None = None) -> Layout:
  """The axes of `source`: `axes` (the user's) first, then the file's, then TYX for a
  3-D array; with `planes`/`channels` (or the file's ScanImage metadata) the frames
  are de-interleaved. Refuses, in one sentence, axes that do not fit."""
  array, name = source.array, source.name
  check_dtype(name, array.dtype)
  shape = tuple(int(s) for s in array.shape)
  interleave = (planes or 1, channels or 1) if (planes or channels) else source.interleave
  if interleave and interleave != (1, 1):
    frame_axes = _check_axes(axes or source.axes or "TYX", shape, name, given=bool(axes))
    if frame_axes != "TYX":
      raise UserError(f"{name} has axes {frame_axes} {shape}; --planes/--channels undo "
                      "interleaving of a (T, Y, X) stack of frames only: give --axes for "
                      "a file that stores planes or channels on their own axis instead.")
    p, c = interleave
    if shape[0] % (p * c):
      kept = shape[0] // (p * c)
      log.warning("%s: %d frames are not a whole number of %d plane(s) x %d channel(s); "
                  "the last %d frame(s) (an incomplete volume) are left out.", name,
                  shape[0], p, c, shape[0] - kept * p * c)
    if shape[0] < p * c:
      raise UserError(f"{name} holds {shape[0]} frames, fewer than one volume of {p} "
                      f"plane(s) x {c} channel(s); check --planes and --channels.")
    grid = FrameGrid(array, p, c)
    return Layout(source, grid, "TZCYX")
  if axes:
    return Layout(source, array, _check_axes(axes, shape, name, given=True))
  if source.axes:
    return Layout(source, array, _check_axes(source.axes, shape, name, given=False))
  if len(shape) == 3:
    return Layout(source, array, "TYX")
  if len(shape) > 3 and sum(n > 1 for n in shape[:-2]) == 1:
    # one axis of frames; the others of size 1 ('Q': read at index 0)
    return Layout(source, array, "".join("T" if n > 1 else "Q" for n in shape[:-2]) + "YX")
  examples = {2: "a single image (Y, X) is not a movie", 4: "e.g. --axes TZYX or TCYX",
              5: "e.g. --axes TZCYX"}.get(len(shape), "--axes with one letter of "
                                          "TZCYX per axis")
  raise UserError(f"{name} has shape {shape} and its file does not say which axis is "
                  f"which; name them with --axes ({examples}).")


def _check_axes(axes: str, shape: tuple[int, ...], name: str, given: bool) -> str:
  """`axes` for every dimension of `shape` (size-1 axes may be missing from a given
  `axes`: they are filled in), or one sentence naming the axes and the shape."""
  axes = axes.upper()
  where = "--axes" if given else "its metadata's axes"
  bad = [a for a in axes if a not in AXES]
  if bad or len(set(axes)) != len(axes) or not {"T", "Y", "X"} <= set(axes):
    raise UserError(f"{where} {axes!r} for {name} {shape}: give each of T, Y, X once, "
                    "plus Z (planes) and C (channels) if the file has them, one letter per "
                    "axis (e.g. TYX, YXT, TZYX, TZCYX).")
  if len(axes) == len(shape):
    return axes
  ones = [i for i, n in enumerate(shape) if n == 1]
  if len(axes) == len(shape) - len(ones):
    it = iter(axes)
    return "".join("Q" if i in ones else next(it) for i in range(len(shape)))
  raise UserError(f"{where} {axes!r} name {len(axes)} axes but {name} has {len(shape)} "
                  f"{shape}; give one letter per axis (e.g. {_suggest(shape)}).")


def _suggest(shape: tuple[int, ...]) -> str:
  return {2: "YX is not a movie", 3: "TYX or YXT", 4: "TZYX or TCYX",
          5: "TZCYX"}.get(len(shape), "TZCYX")


def read_movie_frames(lay: Layout, plane: int, channel: int, t0: int, t1: int
                      ) -> np.ndarray:
  """Frames t0..t1 of one plane and channel, as (t1 - t0, Y, X)."""
  index, kept = [], []
  for axis, n in zip(lay.axes, lay.array.shape):
    if axis == "T":
      index.append(slice(t0, t1))
      kept.append(axis)
    elif axis in "YX":
      index.append(slice(None))
      kept.append(axis)
    else:
      index.append({"Z": plane, "C": channel}.get(axis, 0))
  block = native(lay.array[tuple(index)])
  return np.transpose(block, [kept.index(a) for a in "TYX"])


def scanimage_interleave(tif) -> tuple[int, int] | None:
  """(planes, channels) of a ScanImage TIFF from its metadata (the BigTIFF header that
  tifffile reads, or the frame data ScanImage keeps in the Software tag), or None."""
  page = tif.pages.first
  if not getattr(page, "is_scanimage", False):
    return None
  frame_data = (tif.scanimage_metadata or {}).get("FrameData") or {}
  if not frame_data:
    try:
      frame_data = tifffile.matlabstr2py(page.software or "")
    except Exception:  # text that is not ScanImage's: no interleaving known
      frame_data = {}
    if not isinstance(frame_data, dict):
      return None
  saved = frame_data.get("SI.hChannels.channelSave", 1)
  channels = len(saved) if isinstance(saved, (list, tuple)) else 1
  planes = 1
  fast_z = frame_data.get("SI.hFastZ.enable", frame_data.get("SI.hStackManager.enable",
                                                             True))
  if fast_z in (True, 1, "true"):
    slices = frame_data.get("SI.hStackManager.actualNumSlices",
                            frame_data.get("SI.hStackManager.numSlices", 1))
    try:
      planes = max(1, int(slices))
    except (TypeError, ValueError):
      planes = 1
  return planes, channels
