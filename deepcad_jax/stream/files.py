"""The files a live stream writes, all through `data.writers.MovieWriter`: the raw frames
and the denoised frames, under temporary names until the stream ends."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from deepcad_jax.data.metadata import MovieMetadata
from deepcad_jax.data.writers import BIGTIFF_BYTES, MovieWriter, output_space
from deepcad_jax.runtime.files import check_space
from deepcad_jax.data.spec import with_name_suffix
from deepcad_jax.denoising.outputs import (DenoiseStats, TemporalSpread,
                                           quantisation_note, to_dtype)
from deepcad_jax.denoising.step import Channels


def raw_path(output: str) -> str:
  """Where the raw frames of a stream written to `output` go: beside it, `*_raw`, in
  the output's format (`*_raw.tif` for a TIFF)."""
  return with_name_suffix(output, "_raw")


class DenoisedWriter:
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


class StreamFiles:
  """The raw and denoised movies of one stream, and with uncertainty the std (and
  samples) beside the denoised one.

  Creating it checks that the disk has room when the source's length and frame shape
  are known (a stream of unknown length is written as BigTIFF); `open` locks the files;
  `commit` gives every file that received frames its final name.

  Args:
    output: the denoised movie (the mean with uncertainty).
    raw_output: the raw movie.
    frame_shape: the source's (Y, X), or None (that of the first frames).
    length: the source's frame count, or None.
    source_dtype: the raw frames' dtype.
    out_dtype: the denoised movie's dtype.
    extras: the float32 movies of the denoised frames' further channels (std, samples).
  """

  def __init__(self, output: str, raw_output: str, frame_shape: Sequence[int] | None,
               length: int | None, source_dtype: Any, out_dtype: Any,
               extras: Sequence[str] = ()):
    self.output, self.raw_output, self.extra_paths = output, raw_output, list(extras)
    self.frame_shape = frame_shape
    self.source_dtype, self.out_dtype = np.dtype(source_dtype), np.dtype(out_dtype)
    self.bigtiff = True  # a stream of unknown length
    if length is not None and frame_shape is not None:
      shape = (length,) + tuple(frame_shape)
      needs = [output_space(raw_output, shape, self.source_dtype),
               output_space(output, shape, self.out_dtype)]
      needs += [output_space(p, shape, np.float32) for p in self.extra_paths]
      check_space(needs)
      self.bigtiff = max(n for _, n in needs) > BIGTIFF_BYTES
    self.raw: MovieWriter | None = None
    self.denoised: DenoisedWriter | None = None
    self.extras: list[MovieWriter] = []

  def open(self, overwrite: bool = False) -> None:
    """Lock the files (they appear when the stream ends)."""
    opened = []
    try:
      for path, dtype in ([(self.raw_output, self.source_dtype),
                           (self.output, self.out_dtype)] +
                          [(p, np.float32) for p in self.extra_paths]):
        opened.append(MovieWriter(path, self.frame_shape, dtype, overwrite=overwrite,
                                  bigtiff=self.bigtiff))
    except BaseException:
      for w in opened:
        w.abort()
      raise
    self.raw, self.denoised = opened[0], DenoisedWriter(opened[1])
    self.extras = opened[2:]

  @property
  def writers(self) -> list[MovieWriter]:
    return [self.raw, self.denoised.writer] + self.extras

  def set_metadata(self, metadata: MovieMetadata | None) -> None:
    """The source's metadata, for every file (before the first frame)."""
    for w in self.writers:
      w.metadata = metadata

  def write_raw(self, frames: np.ndarray) -> None:
    self.raw.write(frames)

  def write_denoised(self, frames: np.ndarray) -> None:
    """Denoised frames (n, Y, X), or (n, Y, X, channels): the mean to the denoised
    movie, channel 1 + i to extra movie i."""
    if frames.ndim == 3:
      self.denoised.write(frames)
      return
    self.denoised.write(Channels.mean(frames))
    for i, w in enumerate(self.extras):
      w.write(Channels.extras(frames)[..., i])

  def commit(self) -> tuple[list[str], list[BaseException]]:
    """Give every file that received frames its final name: (the paths kept, the
    errors met)."""
    kept, errors = [], []
    for w in self.writers:
      try:  # what came is kept under the final name; nothing if no frame came
        if w.commit():
          kept.append(w.path)
      except BaseException as e:  # noqa: BLE001 - the caller raises the first error
        errors.append(e)
    return kept, errors
