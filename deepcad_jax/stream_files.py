"""The files a live stream writes, all through `data.output.MovieWriter`."""

from __future__ import annotations

import os

import numpy as np

from deepcad_jax.data.output import MovieWriter
from deepcad_jax.infer import DenoiseStats, TemporalSpread, quantisation_note, to_dtype


def raw_path(output: str) -> str:
  """Where the raw frames of a stream written to `output` go: beside it, `*_raw.tif`."""
  return os.path.splitext(output)[0] + "_raw.tif"


class _DenoisedWriter:
  """The denoised stream's file: frames converted to the output dtype here (rounded and
  clipped, the rounding error measured) and appended as they come."""

  def __init__(self, writer: MovieWriter):
    self.writer, self.dtype = writer, writer.dtype
    self.clipped = 0
    self.stats = DenoiseStats()

  def write(self, frames: np.ndarray) -> None:
    frames = np.asarray(frames, np.float32)
    if self.dtype.kind in "iu":
      info = np.iinfo(self.dtype)
      inside = (frames >= info.min - 0.5) & (frames <= info.max + 0.5)
      error = np.where(inside, np.rint(frames) - frames, 0.0)
      self.stats.rounding_sq += float(np.sum(error * error, dtype=np.float64))
      self.stats.rounded += int(np.count_nonzero(inside))
      if self.stats.spread is None:
        self.stats.spread = TemporalSpread(frames.shape[1:])
      self.stats.spread.add(frames)
    frames, clipped = to_dtype(frames, self.dtype)  # rounded and clipped
    self.clipped += clipped
    self.writer.write(frames)

  def note(self) -> str | None:
    """The quantisation note of an integer output (see infer)."""
    return quantisation_note(self.writer.path, self.dtype, self.stats)
