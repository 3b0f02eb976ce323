"""CaImAn's memory-mapped movies (`.mmap`), the files `caiman.save_memmap` writes and
`caiman.load_memmap` reads.

The layout (CaImAn's `caiman/mmapping.py` and `caiman/paths.py`): a headerless float32
matrix Yr of shape (d1 * d2 * d3, T), pixels by frames, stored in order 'C' (each
pixel's T values together, what CNMF wants) or 'F' (each frame's pixels together). The
pixel index is Fortran-ordered over (d1, d2, d3): pixel (y, x, z) is row y + d1 * x +
d1 * d2 * z, so that CaImAn gets the movie back as `np.reshape(Yr.T, [T, d1, d2],
order='F')`. Nothing in the file says its shape: the name does,
`{base}_d1_{Y}_d2_{X}_d3_{Z}_order_{C|F}_frames_{T}.mmap`, read as `load_memmap` reads
it (the last `d1`, `d2`, `d3`, `order` and `frames` fields of the name split at `_`).

Writing gives order 'C' with d3 = 1: the frames come in time order but the file is
pixel-major, so they are first appended to a frame-major temporary file beside the
output, which is then transposed into the output pixel block by pixel block (memory:
one block, CHUNK_BYTES; disk: twice the movie while it is written).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import numpy as np

from deepcad_jax.data.axes import Source
from deepcad_jax.data.metadata import MovieMetadata
from deepcad_jax.data.spec import split_name
from deepcad_jax.errors import UserError

log = logging.getLogger("deepcad_jax")

CHUNK_BYTES = 64 * 2**20     # pixels transposed at a time
_FIELDS = ("d1", "d2", "d3", "order", "frames")
_TAIL = re.compile(r"_d1_\d+_d2_\d+_d3_\d+_order_[CF]_frames_\d+_?$")
_EXAMPLE = "Yr_d1_512_d2_512_d3_1_order_C_frames_1000.mmap"


def parse_name(path: str) -> dict[str, Any]:
  """d1, d2, d3, order and T from a CaImAn memmap name, as `load_memmap` reads it; one
  sentence when a field is missing."""
  stem = os.path.splitext(os.path.basename(path))[0]
  parts = stem.split("_")[1:]  # the first part names the data set
  found: dict[str, Any] = {}
  for field in _FIELDS:
    for i in range(len(parts) - 2, -1, -1):  # the last occurrence, as CaImAn does
      if parts[i] == field:
        found[field] = parts[i + 1]
        break
  try:
    info = {"d1": int(found["d1"]), "d2": int(found["d2"]),
            "d3": int(found.get("d3", 1)), "order": found["order"]}
    info["T"] = int(parts[-1]) if parts and parts[-1] != "" else int(found["frames"])
  except (KeyError, ValueError, IndexError):
    raise UserError(f"{path}: a CaImAn memmap's name gives its shape, and this one does "
                    f"not (expected e.g. {_EXAMPLE}); keep the name CaImAn wrote.") from None
  if info["order"] not in ("C", "F") or min(info["d1"], info["d2"], info["d3"],
                                            info["T"]) < 1:
    raise UserError(f"{path}: order {info['order']!r} or a size of 0 in the name; keep "
                    f"the name CaImAn wrote (e.g. {_EXAMPLE}).")
  return info


def memmap_name(path: str, frame_shape, frames: int | None) -> str:
  """The file a CaImAn output named `path` is written as: its stem with the shape CaImAn
  reads from names (`den.mmap` -> `den_d1_512_d2_512_d3_1_order_C_frames_1000.mmap`);
  a name that already carries a shape must carry this one."""
  if frames is None or frame_shape is None:
    raise UserError(f"{path}: a CaImAn memmap's name holds the movie's frame count, "
                    "unknown for a stream; write TIFF, HDF5 or Zarr here instead.")
  d1, d2 = (int(n) for n in frame_shape)
  tail = f"_d1_{d1}_d2_{d2}_d3_1_order_C_frames_{int(frames)}"
  stem, ext = split_name(path)
  if ext.lower() != ".mmap":
    stem = path.rstrip("/\\")
  if _TAIL.search(stem):
    info = parse_name(stem + ".mmap")
    if (info["d1"], info["d2"], info["d3"], info["order"], info["T"]) != \
        (d1, d2, 1, "C", int(frames)):
      raise UserError(f"{path} names a CaImAn memmap of another shape than the movie "
                      f"written ({frames} frames of {d1} x {d2}, order C); name it "
                      f"{_TAIL.sub('', stem)}.mmap and the shape is added.")
    return stem + ".mmap"
  if not os.path.basename(stem):
    raise UserError(f"{path}: give a file name for the CaImAn memmap (e.g. den.mmap).")
  return stem + tail + ".mmap"


class MemmapFrames:
  """A CaImAn memmap seen as (T, d1, d2) or (T, d1, d2, d3), frames read as indexed
  (a slice of T first, then whole axes or one index each)."""

  def __init__(self, path: str, info: dict[str, Any]):
    self.dims = (info["d1"], info["d2"], info["d3"])
    pixels = int(np.prod(self.dims))
    self.yr = np.memmap(path, np.float32, "r", shape=(pixels, info["T"]),
                        order=info["order"])
    self.shape = (info["T"],) + (self.dims if self.dims[2] > 1 else self.dims[:2])
    self.dtype = np.dtype(np.float32)

  def __getitem__(self, index) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    t = index[0] if isinstance(index[0], slice) else slice(index[0], index[0] + 1)
    block = np.asarray(self.yr[:, t])                        # (pixels, n)
    frames = np.moveaxis(block.reshape(self.shape[1:] + (block.shape[1],), order="F"),
                         -1, 0)[(slice(None),) + tuple(index[1:])]
    return frames if isinstance(index[0], slice) else frames[0]


def open_memmap(path: str) -> Source:
  """A CaImAn memmap, memory-mapped with the shape and order its name gives."""
  info = parse_name(path)
  need = info["d1"] * info["d2"] * info["d3"] * info["T"] * 4
  size = os.path.getsize(path)
  if size != need:
    raise UserError(f"{path} holds {size} bytes but its name describes {info['T']} "
                    f"float32 frames of {info['d1']} x {info['d2']} x {info['d3']} "
                    f"({need} bytes); the file is damaged or was renamed.")
  frames = MemmapFrames(path, info)
  return Source(frames, path, "TYXZ" if info["d3"] > 1 else "TYX",
                MovieMetadata(kind="caiman"))


class CaimanSink:
  """A CaImAn memmap (order 'C', float32) written from frame blocks: appended to a
  frame-major file, transposed into the output when the movie is complete."""

  def __init__(self, name: str):
    self.name = name
    self.fh = None
    self.frames_path: str | None = None

  def open(self, temp: str, frame_shape, dtype, frames: int | None,
           metadata: MovieMetadata | None) -> None:
    self.temp = temp
    self.frame_shape = tuple(int(n) for n in frame_shape)
    base = temp[:-len(".partial")] if temp.endswith(".partial") else temp
    self.frames_path = base + ".frames.partial"   # removed with the run's partial files
    self.fh = open(self.frames_path, "xb")

  def write(self, start: int, frames: np.ndarray) -> None:
    # each frame's pixels in CaImAn's (Fortran) order: frame.T in C order
    self.fh.write(np.ascontiguousarray(np.asarray(frames, "<f4").transpose(0, 2, 1)))

  def close(self, count: int) -> None:
    self.fh.close()
    self.fh = None
    pixels = int(np.prod(self.frame_shape))
    if count and pixels:
      rows = np.memmap(self.frames_path, "<f4", "r", shape=(count, pixels))
      step = max(1, CHUNK_BYTES // (4 * count))
      with open(self.temp, "wb") as out:
        for p in range(0, pixels, step):
          out.write(np.ascontiguousarray(rows[:, p:p + step].T))  # one copy
      del rows
    self._drop_frames()
    log.info("%s: CaImAn memmap, float32 (%d pixels x %d frames, order C).", self.name,
             pixels, count)

  def _drop_frames(self) -> None:
    if self.frames_path is not None:
      try:
        os.remove(self.frames_path)
      except FileNotFoundError:
        pass
      self.frames_path = None

  def abort(self) -> None:
    if self.fh is not None:
      try:
        self.fh.close()
      finally:
        self.fh = None
    self._drop_frames()
