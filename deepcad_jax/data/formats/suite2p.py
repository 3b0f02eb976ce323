"""suite2p plane folders: `data.bin` (raw int16, (T, Y, X), C order) described by `ops.npy`
(suite2p < 1.0) or `db.npy` (suite2p >= 1.0).

Reading memory-maps `data.bin` with the shape `ops.npy` or `db.npy` gives (read with the
restricted unpickler of `safe_pickle`: no pickle code runs). Writing makes a plane folder
that either suite2p runs on with registration off: `data.bin` int16, streamed as frames
come; an `ops.npy` with Ly, Lx, nframes, reg_file, meanImg, fs, yrange, xrange and
do_registration=0 (suite2p 0.x); and `db.npy` with the same description plus
`settings.npy` with fs and do_registration=0 (suite2p 1.x, which finds a plane folder
by those two files and data.bin; its `run_s2p` then replaces settings.npy with the
settings it is given). The folder paths follow suite2p's layout
SAVE_PATH0/suite2p/planeN. Values are stored as round(value * scale), clipped to int16. By
default the scale uses int16's range: the largest |value| becomes 32767 (the frames
are kept as float32 beside data.bin until the last one is known, then converted block
by block); `[scale=...]` sets it and streams int16 directly. The scale, the rounding
step and any clipping are logged and kept in ops (`deepcad_scale`, `deepcad_clipped`).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from deepcad_jax.data import safe_pickle
from deepcad_jax.data.axes import Source
from deepcad_jax.data.metadata import MovieMetadata
from deepcad_jax.errors import UserError
from deepcad_jax.runtime.paths import check_input

log = logging.getLogger("deepcad_jax")

_OPS = "suite2p's ops.npy (a pickled dict)"
_OPS_FIX = "give the ops.npy (or db.npy) that suite2p wrote for one plane"
DESCRIPTIONS = ("ops.npy", "db.npy")  # suite2p 0.x, 1.x: what describes a plane's data.bin
INT16 = np.iinfo(np.int16)
FLOAT_FILE = "data.float32.partial"  # the frames before the scale is known (auto scale)


def load_ops(path: str) -> dict:
  """suite2p's ops.npy (one plane's dict of settings and results: numbers, strings,
  lists, dicts, numpy arrays, the processing date), read without running pickle code."""
  root = safe_pickle.load_npy(path, {**safe_pickle.NUMPY, **safe_pickle.DATETIME},
                              what=_OPS, fix=_OPS_FIX)
  ops = root.item() if root.size == 1 else None
  if not isinstance(ops, dict) or not all(isinstance(k, str) for k in ops):
    raise UserError(f"{path} is not {_OPS}: it holds {root.size} item(s) that are not "
                    f"one dict with string keys; {_OPS_FIX}.")
  return ops


def plane_folder(path: str) -> str:
  """The plane folder of `path` (the folder itself, or the folder of its data.bin)."""
  return os.path.dirname(path) if os.path.basename(path) == "data.bin" else path


def open_plane(path: str) -> Source:
  """The movie of a suite2p plane folder, memory-mapped (int16, (nframes, Ly, Lx))."""
  folder = plane_folder(path)
  data_path = os.path.join(folder, "data.bin")
  described = [os.path.join(folder, n) for n in DESCRIPTIONS
               if os.path.lexists(os.path.join(folder, n))]
  missing = ([] if described else [os.path.join(folder, DESCRIPTIONS[0])]) + [
      p for p in (data_path,) if not os.path.lexists(p)]
  if missing:
    raise UserError(f"{folder} is not a suite2p plane folder: {missing[0]} is missing; "
                    "give the folder that holds data.bin and ops.npy or db.npy (e.g. "
                    "suite2p/plane0).")
  ops_path = described[0]
  ops = load_ops(ops_path)
  settings_path = os.path.join(folder, "settings.npy")  # suite2p 1.x keeps fs there
  if "fs" not in ops and os.path.isfile(settings_path):
    fs = load_ops(settings_path).get("fs")
    if fs is not None:
      ops = {**ops, "fs": fs}
  name = os.path.basename(ops_path)
  try:
    ly, lx = int(ops["Ly"]), int(ops["Lx"])
  except (KeyError, TypeError, ValueError):
    raise UserError(f"{ops_path} does not give Ly and Lx (the frame size); {_OPS_FIX}."
                    ) from None
  if ly <= 0 or lx <= 0:
    raise UserError(f"{ops_path} gives a frame size Ly={ly}, Lx={lx}, which is not a "
                    f"frame (both must be at least 1); {_OPS_FIX}.")
  check_input(data_path, folder=False)  # no FIFO or device: memory-mapped below
  frame_bytes = ly * lx * 2
  size = os.path.getsize(data_path)
  frames = size // frame_bytes if frame_bytes else 0
  if frames < 1 or size % frame_bytes:
    raise UserError(f"{data_path} has {size} bytes, not a whole number of {ly} x {lx} "
                    f"int16 frames; the file is damaged or {name} belongs to another "
                    "plane.")
  nframes = ops.get("nframes")
  if nframes is not None and int(nframes) != frames:
    log.warning("%s: %s says %s frames but data.bin holds %d; reading %d.",
                folder, name, nframes, frames, frames)
  data = np.memmap(data_path, np.int16, "r", shape=(frames, ly, lx))
  meta = MovieMetadata(kind="suite2p")
  fs = ops.get("fs")
  if fs:
    meta.frame_interval = 1.0 / float(fs)
  return Source(data, folder, "TYX", meta)


class Suite2pSink:
  """A suite2p plane folder (data.bin int16 and ops.npy) written as frames come."""

  BLOCK_BYTES = 64 * 2**20  # float32 read back per block when converting

  def __init__(self, scale: float | None, name: str):
    self.auto = scale is None  # a scale that uses int16's range, chosen at the end
    self.scale = 1.0 if scale is None else float(scale)
    self.name = name
    self.fh = None
    self.clipped = 0
    self.total = None
    self.low = self.high = None

  def open(self, temp: str, frame_shape, dtype, frames: int | None,
           metadata: MovieMetadata | None) -> None:
    self.folder = temp
    self.frame_shape = tuple(int(n) for n in frame_shape)
    self.metadata = metadata or MovieMetadata()
    self.fh = open(os.path.join(temp, FLOAT_FILE if self.auto else "data.bin"), "xb")
    self.total = np.zeros(self.frame_shape, np.float64)

  def write(self, start: int, frames: np.ndarray) -> None:
    if self.auto:  # kept as float32 until the range is known
      values = np.asarray(frames, np.float32)
      low, high = float(values.min()), float(values.max())
      self.low = low if self.low is None else min(self.low, low)
      self.high = high if self.high is None else max(self.high, high)
      self.fh.write(values.astype("<f4").tobytes())
      return
    self._write_int16(frames)

  def _write_int16(self, frames: np.ndarray) -> None:
    values = np.asarray(frames, np.float64)
    if self.scale != 1.0:
      values = values * self.scale
    values = np.rint(values)
    low, high = float(values.min()), float(values.max())
    self.low = low if self.low is None else min(self.low, low)
    self.high = high if self.high is None else max(self.high, high)
    outside = (values < INT16.min) | (values > INT16.max)
    self.clipped += int(outside.sum())
    out = np.clip(values, INT16.min, INT16.max).astype("<i2")
    self.total += out.sum(0)
    self.fh.write(out.tobytes())

  def close(self, count: int) -> None:
    if self.auto:
      self._convert(count)
    self.fh.flush()
    os.fsync(self.fh.fileno())
    self.fh.close()
    self.fh = None
    ly, lx = self.frame_shape
    final = self.name
    interval = self.metadata.frame_interval
    fs = float(1.0 / interval) if interval else 10.0
    # suite2p's layout: save_path = save_path0 / save_folder / planeN.
    save_folder = os.path.dirname(final)
    db = {
        "Ly": ly, "Lx": lx, "nframes": int(count), "nframes_per_folder": [int(count)],
        "frames_per_file": [int(count)], "reg_file": os.path.join(final, "data.bin"),
        "save_path": final, "save_path0": os.path.dirname(save_folder),
        "save_folder": os.path.basename(save_folder), "fast_disk": final,
        "data_path": [os.path.dirname(save_folder)], "filelist": [], "file_list": [],
        "input_format": "binary", "nplanes": 1, "iplane": 0, "nchannels": 1,
        "functional_chan": 1, "keep_movie_raw": False, "yrange": [0, ly],
        "xrange": [0, lx], "meanImg": (self.total / max(1, count)).astype(np.float32),
        "db_path": os.path.join(final, "db.npy"),
        "settings_path": os.path.join(final, "settings.npy"),
        "deepcad_scale": self.scale, "deepcad_clipped": int(self.clipped),
    }
    for name, value in (("ops.npy", {**db, "fs": fs, "do_registration": 0}),
                        ("db.npy", db),
                        ("settings.npy", {"fs": fs, "run": {"do_registration": 0}})):
      with open(os.path.join(self.folder, name), "xb") as f:
        np.save(f, np.array(value, dtype=object), allow_pickle=True)  # our own dicts
        f.flush()
        os.fsync(f.fileno())
    voxels = count * ly * lx
    if self.auto:
      log.info("%s: suite2p data.bin written as int16 = round(value x %.6g): the largest "
               "|value| (range %.6g..%.6g) uses int16's range; rounding step %.3g in the "
               "movie's units.", final, self.scale, self.raw_low, self.raw_high,
               1 / self.scale)
    elif self.clipped:
      fit = 32767.0 / max(abs(self.low or 0), abs(self.high or 0)) * self.scale
      log.warning("%s: %d voxels (%.3g%%) of %.4g..%.4g (after scaling by %g) did not fit "
                  "int16 and were clipped; write it with [scale=%.3g] to keep them.",
                  final, self.clipped, 100 * self.clipped / max(1, voxels), self.low,
                  self.high, self.scale, fit)
    else:
      log.info("%s: suite2p data.bin written as int16 = round(value x %g) (range %s..%s, "
               "nothing clipped).", final, self.scale, self.low, self.high)

  def _convert(self, count: int) -> None:
    """The float32 frames, scaled to use int16's range, into data.bin block by block."""
    self.fh.flush()
    self.fh.close()
    self.raw_low, self.raw_high = self.low or 0.0, self.high or 0.0
    peak = max(abs(self.raw_low), abs(self.raw_high))
    self.scale = float(INT16.max) / peak if peak > 0 else 1.0
    self.low = self.high = None
    floats = os.path.join(self.folder, FLOAT_FILE)
    self.fh = open(os.path.join(self.folder, "data.bin"), "xb")
    frame = int(np.prod(self.frame_shape))
    source = np.memmap(floats, "<f4", "r", shape=(count, *self.frame_shape)) \
        if count else np.zeros((0, *self.frame_shape), np.float32)
    step = max(1, self.BLOCK_BYTES // (4 * frame))
    for t in range(0, count, step):
      self._write_int16(np.asarray(source[t:t + step]))
    del source
    os.remove(floats)

  def abort(self) -> None:
    if self.fh is not None:
      try:
        self.fh.close()
      finally:
        self.fh = None
