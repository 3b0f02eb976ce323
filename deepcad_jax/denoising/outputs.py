"""What a denoised movie is written as: its dtype (`resolve_output_dtype`, `to_dtype`),
the check that an integer dtype's rounding is small (`DenoiseStats`, `TemporalSpread`,
`quantisation_note`), and the names of the uncertainty outputs (`std_path`,
`sample_path`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from deepcad_jax.data.spec import with_name_suffix
from deepcad_jax.errors import UserError


@dataclasses.dataclass
class DenoiseStats:
  """What one denoising pass did (filled in as it runs)."""

  shape: tuple[int, int, int] = (0, 0, 0)
  tile: tuple[int, int, int] = (0, 0, 0)
  tiles: int = 0
  tiling: str = ""            # the plan, in words
  recompute: float = 0.0      # network voxels / movie voxels
  seconds: float = 0.0
  compile_s: float = 0.0
  clipped: int = 0
  rescale_skipped: int = 0    # reference stitching: patches whose sums were not positive
  rounding_sq: float = 0.0    # integer outputs: sum of squared rounding errors
  rounded: int = 0            # voxels that sum is over
  spread: TemporalSpread | None = None  # integer outputs: the float frames' variation

  def count(self, block: Converted) -> None:
    """Add one block of output frames to the rounding, clipping and spread counts."""
    self.clipped += block.clipped
    if block.data.dtype.kind in "iu":
      self.rounding_sq += block.rounding_sq
      self.rounded += block.data.size - block.clipped
      if block.moments is not None:
        if self.spread is None:
          self.spread = TemporalSpread(block.data.shape[1:])
        self.spread.add_sums(len(block.data), *block.moments)
    elif len(block.data):
      if self.spread is None:
        self.spread = TemporalSpread(block.data.shape[1:])
      self.spread.add(block.data)

  @property
  def voxels_per_s(self) -> float:
    return float(np.prod(self.shape)) / self.seconds if self.seconds else 0.0

  @property
  def rounding_rms(self) -> float:
    """The quantisation noise an integer output added (RMS, in counts); 0 for floats."""
    return float(np.sqrt(self.rounding_sq / self.rounded)) if self.rounded else 0.0


@dataclasses.dataclass
class Converted:
  """A block of output frames and what converting it cost."""

  data: np.ndarray
  clipped: int = 0
  rounding_sq: float = 0.0  # integer data: sum of squared rounding errors (not clipped)
  moments: np.ndarray | None = None  # integer data: (2, Y, X) sums of x, x^2 (float)


def host_convert(block: np.ndarray, dtype) -> Converted:
  """Float frames into `dtype` on the host, with the rounding error and the float
  frames' moments that an integer output's checks need (`quantisation_note`)."""
  dtype = np.dtype(dtype)
  rounding_sq, moments = 0.0, None
  if dtype.kind in "iu":
    info = np.iinfo(dtype)
    x = np.asarray(block, np.float64)
    inside = (x >= info.min - 0.5) & (x <= info.max + 0.5)
    rounding_sq = float(np.sum(np.where(inside, np.rint(x) - x, 0.0) ** 2))
    moments = np.stack([x.sum(0), (x * x).sum(0)])
  data, clipped = to_dtype(block, dtype)
  return Converted(data, clipped, rounding_sq, moments)


def to_dtype(block: np.ndarray, dtype) -> tuple[np.ndarray, int]:
  """Round and clip float data into `dtype` (integers); returns (array, voxels clipped)."""
  dtype = np.dtype(dtype)
  if dtype.kind == "f":
    return block.astype(dtype), 0
  if dtype.kind not in "iu":
    raise UserError(f"output dtype {dtype} is not supported; use an integer type "
                    "or float32.")
  info = np.iinfo(dtype)
  rounded = np.rint(block)
  clipped = int(np.count_nonzero((rounded < info.min) | (rounded > info.max)))
  return np.clip(rounded, info.min, info.max).astype(dtype), clipped


# An integer output gets a note when its rounding noise exceeds this share of the
# denoised movie's temporal variation (RMS; 0.1 in amplitude is 1% in power).
QUANTISATION_NOTE = 0.1


class TemporalSpread:
  """How much a movie varies in time: each pixel's temporal variance, from per-pixel
  sums accumulated block by block (`add_sums`, as the device returns them, or `add`:
  frames, over a strided grid of at most `max_pixels` pixels), averaged over pixels."""

  def __init__(self, frame_shape: Sequence[int], max_pixels: int = 2**16):
    self.step = max(1, int(np.ceil(np.sqrt(frame_shape[0] * frame_shape[1] /
                                           max_pixels))))
    self.n = 0
    self.sum: np.ndarray | None = None
    self.sum_sq: np.ndarray | None = None

  def add_sums(self, n: int, total: np.ndarray, total_sq: np.ndarray) -> None:
    """n frames' per-pixel sums of x - c and (x - c)^2 (any constant c)."""
    if self.sum is None:
      self.sum, self.sum_sq = np.zeros(total.shape), np.zeros(total.shape)
    self.sum += total
    self.sum_sq += total_sq
    self.n += int(n)

  def add(self, block: np.ndarray) -> None:
    b = np.asarray(block[:, ::self.step, ::self.step], np.float64)
    self.add_sums(len(b), b.sum(0), (b * b).sum(0))

  def variance(self) -> float:
    """The mean over pixels of each pixel's temporal variance."""
    if not self.n:
      return 0.0
    mean = self.sum / self.n
    return float(np.mean(np.maximum(self.sum_sq / self.n - mean * mean, 0.0)))


def quantisation_note(dst: str, out_dtype, stats: DenoiseStats) -> str | None:
  """One line when rounding to an integer `out_dtype` added more than
  QUANTISATION_NOTE of the denoised movie's temporal variation (RMS over pixels of
  each pixel's temporal std, before rounding; both measured)."""
  q = stats.rounding_rms
  if not q or stats.spread is None:
    return None
  signal = float(np.sqrt(stats.spread.variance()))
  if q <= QUANTISATION_NOTE * signal:
    return None
  share = f"{100 * q / signal:.0f}%" if signal else "more than all"
  return (f"rounding {dst} to {np.dtype(out_dtype).name} added {q:.2f} counts RMS of "
          f"quantisation noise, {share} of the denoised movie's temporal variation "
          f"({signal:.2f} counts RMS); the default --output-dtype float32 keeps the "
          "network's precision.")


def resolve_output_dtype(requested: Any, input_dtype: Any) -> np.dtype:
  """The output dtype: float32 by default (what the network computes), the input's
  dtype for 'input', else the one named (a float or integer type)."""
  if requested is None:
    return np.dtype(np.float32)
  if isinstance(requested, str) and requested.strip().lower() == "input":
    return np.dtype(input_dtype)
  try:
    dtype = np.dtype(requested)
  except TypeError:
    dtype = None
  if dtype is None or dtype.kind not in "fiu":
    raise UserError(f"--output-dtype takes float32 (the default), input (the input's "
                    f"type), uint16, int16 or another integer type; got {requested!r}.")
  return dtype


def std_path(output: str) -> str:
  """Where the uncertainty (std) movie of `output` goes: beside it, `*_std.tif` (in
  the output's format)."""
  return with_name_suffix(output, "_std")


def sample_path(output: str, i: int) -> str:
  """Where sample `i` of `output` goes with --save-samples: `*_sample00.tif`, ..."""
  return with_name_suffix(output, f"_sample{i:02d}")
