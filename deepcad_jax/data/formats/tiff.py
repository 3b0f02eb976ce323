"""TIFF files: opened and checked before any frame is read (a damaged or truncated file,
a colour image, several series, metadata that does not fit the data), their pages seen
as an array (`TiffFrames`), and whole small files read (`read_frames`). `data.movie`'s
`TiffMovie` reads a plain (T, Y, X) movie; the general reader (`data.axes`) the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import numpy as np
import tifffile

from deepcad_jax.data.axes import Source, check_dtype, native, scanimage_interleave
from deepcad_jax.data.metadata import read_metadata
from deepcad_jax.errors import UserError
from deepcad_jax.runtime.paths import check_input

FRAME_AXES = "TZQIR"          # tifffile axis codes that can hold frames

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
def tifffile_problems() -> Iterator[list[str]]:
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


def open_tiff(path: str) -> tifffile.TiffFile:
  if os.path.isdir(path):
    raise UserError(f"{path} is a folder; give one TIFF movie file here.")
  check_input(path, folder=False)  # exists; no FIFO, device or looping link
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


def check_series(path: str, tif: tifffile.TiffFile, problems: list[str]):
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
  end, size = data_end(series), os.path.getsize(path)
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


def data_end(series) -> int:
  """The byte after the last image data a series refers to."""
  if series.dataoffset is not None:
    return int(series.dataoffset) + int(series.nbytes)
  end = 0
  for page in series.pages:
    if page is not None:
      end = max([end] + [int(o) + int(n) for o, n in zip(page.dataoffsets,
                                                          page.databytecounts)])
  return end


def movie_shape(path: str, shape, axes: str) -> tuple[tuple[int, int, int], str]:
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



class TiffFrames:
  """The pages of a TIFF series as an array-like of the series' shape (leading axes:
  frames in page order; the last two: Y, X), read page by page as indexed."""

  def __init__(self, path: str, shape: tuple[int, ...], dtype):
    self.path = path
    self.shape = tuple(int(n) for n in shape)
    self.dtype = np.dtype(dtype)
    self._map = None
    try:
      self._map = tifffile.memmap(path, mode="r").reshape((-1,) + self.shape[-2:])
    except (ValueError, OSError):
      self._map = None

  def __getitem__(self, index) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    index = index + (slice(None),) * (len(self.shape) - len(index))
    lead, lists = self.shape[:-2], []
    for i, n in zip(index[:-2], lead):
      lists.append(np.arange(n)[i] if isinstance(i, slice) else np.array([int(i)]))
    grid = np.meshgrid(*lists, indexing="ij")
    pages = np.ravel_multi_index([g.ravel() for g in grid], lead) if lead else \
        np.zeros(1, np.int64)
    if len(pages) == 0:
      frames = np.zeros((0,) + self.shape[-2:], self.dtype)
    elif self._map is not None:
      frames = np.asarray(self._map[pages])
    else:
      with tifffile.TiffFile(self.path) as tif:
        frames = np.asarray(tif.asarray(key=[int(p) for p in pages]))
    frames = frames.reshape([len(v) for v in lists] + list(self.shape[-2:]))
    frames = frames[(slice(None),) * len(lists) + tuple(index[-2:])]
    drop = tuple(k for k, i in enumerate(index[:-2]) if not isinstance(i, slice))
    return frames.reshape([n for k, n in enumerate(frames.shape) if k not in drop])

  def __getstate__(self):
    return {**self.__dict__, "_map": None}


_TIFF_AXES = {"T": "T", "Z": "Z", "C": "C", "Y": "Y", "X": "X"}


def tiff_source(path: str) -> tuple[Source, bool]:
  """A TIFF as a `Source` (frames indexed by the series' axes, or flat with ScanImage's
  interleaving), and whether it is a plain (T, Y, X) movie that `TiffMovie` reads (or
  refuses in its own words: a 2-D image, a colour image)."""
  with tifffile_problems() as problems, open_tiff(path) as tif:
    series = check_series(path, tif, problems)
    interleave = scanimage_interleave(tif)
    shape, axes, dtype = tuple(series.shape), series.axes, series.dtype
    metadata = read_metadata(tif, "T")
  if interleave is not None:  # ScanImage: frames in page order, de-interleaved
    n = int(np.prod(shape[:-2], dtype=np.int64))
    return Source(TiffFrames(path, (n,) + shape[-2:], dtype), path, "TYX", metadata,
                  interleave=interleave), interleave == (1, 1)
  extra = [(a, k) for a, k in zip(axes[:-2], shape[:-2]) if k > 1]
  plain = len(extra) <= 1 or len(shape) != len(axes)  # TiffMovie reads it (or refuses)
  letters = None
  if len(shape) == len(axes) and axes[-2:] == "YX":
    mapped = [_TIFF_AXES.get(a, "Q" if k == 1 else "?") for a, k in zip(axes, shape)]
    if "T" not in mapped and mapped.count("?") == 1:
      mapped[mapped.index("?")] = "T"
    letters = "".join(mapped) if "?" not in mapped else None
  return Source(TiffFrames(path, shape, dtype), path, letters, metadata), plain



def read_frames(path: str) -> np.ndarray:
  """A whole TIFF as (N, Y, X) frames: a single 2-D image (N = 1) or a movie, checked
  as `TiffMovie` checks files (for mean images and the files a watched folder
  receives, which may hold one frame each)."""
  with tifffile_problems() as problems, open_tiff(path) as tif:
    series = check_series(path, tif, problems)
    shape, axes = tuple(series.shape), series.axes
    check_dtype(path, series.dtype)
  if int(np.prod(shape[:-2], dtype=np.int64)) > 1:
    shape = movie_shape(path, shape, axes)[0]
  try:
    with tifffile_problems() as problems:
      data = tifffile.imread(path)
    if problems:
      raise ValueError(problems[0])
  except (ValueError, OSError, RuntimeError, tifffile.TiffFileError) as e:
    raise UserError(f"{path} could not be read ({e}); the file is damaged: copy it "
                    "again from the original.") from None
  return native(data).reshape((-1,) + tuple(shape[-2:]))
