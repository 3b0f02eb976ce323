"""The per-movie brightness correction: each region of the denoised movie keeps the raw
movie's mean.

A network trained for a few minutes on a dim recording does not reproduce the mean image
exactly: at 0.1 photons per voxel its time-averaged output was 4.8% off the truth in a
median 16x16-pixel region (95th percentile 16.5%), although its global mean was right
(benchmarks/quality.py). The raw movie's own time average is unbiased; so the correction
is the raw minus the denoised time-averaged image, smoothed by a Gaussian, added to every
frame. The smoothing is chosen on the movie itself by two-fold cross-validation: the
frames are cut into blocks of a network patch's length, alternate blocks form two sets,
and each set's smoothed difference is scored against the other's (their noise is
independent, so the score is lowest where the smoothed field is closest to the true
bias). "global" (one number) and "none" take part, so a model without regional bias gets
no regional field. The correction is static: it moves no frame relative to another.

Two passes: `Measure` sees the float32 frames as they are denoised (with the raw frames
read beside them) and `correct` hands the stored frames back, corrected and in the output
dtype."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from deepcad_jax.data.movie import ArrayMovie, Movie
from deepcad_jax.errors import UserError
from deepcad_jax.denoising.outputs import DenoiseStats, host_convert
from deepcad_jax.denoising.step import Channels

MODES = ("regional", "model")  # regional: this correction; model: the network's output
SIGMAS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # candidate smoothing, in pixels
MIN_BLOCKS_PER_SET = 2  # the cross-validation needs at least two blocks in each set


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise UserError(f"--brightness takes regional (each region keeps the raw movie's "
                    f"mean; the default) or model (the network's output as it is); got "
                    f"{mode!r}.")
  return mode


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """`image` (Y, X) smoothed by a Gaussian of `sigma` pixels (truncated at 4 sigma),
  edges mirrored (so a constant image stays constant and the mean is kept); by FFT of
  the mirrored image, so a wide Gaussian costs no more than a narrow one."""
  radius = int(np.ceil(4 * sigma))
  offsets = np.arange(-radius, radius + 1)
  kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
  kernel /= kernel.sum()
  image = np.asarray(image, np.float64)
  padded = np.pad(image, radius, mode="symmetric")

  def centred(n: int) -> np.ndarray:  # the kernel with its centre at index 0 (circular)
    k = np.zeros(n)
    k[:radius + 1], k[n - radius:] = kernel[radius:], kernel[:radius]
    return k
  ny, nx = padded.shape
  spectrum = (np.fft.rfft2(padded) * np.fft.fft(centred(ny))[:, None] *
              np.fft.rfft(centred(nx))[None, :])
  out = np.fft.irfft2(spectrum, s=padded.shape)  # circular, but the wrap stays in the pad
  return out[radius:radius + image.shape[0], radius:radius + image.shape[1]]


@dataclasses.dataclass
class Correction:
  """The static image added to every denoised frame.

  field: (Y, X) float32, in intensity units.
  choice: 'none', 'global' or the smoothing in pixels ('sigma 2 px').
  scores: each candidate's cross-validated error (mean squared, intensity units^2).
  raw_mean: the raw movie's mean (for the report).
  """

  field: np.ndarray
  choice: str
  scores: dict[str, float]
  raw_mean: float

  def to_json(self) -> dict:
    return {"choice": self.choice, "scores": self.scores,
            "field_rms": float(np.sqrt(np.mean(self.field.astype(np.float64) ** 2))),
            "raw_mean": self.raw_mean}

  def describe(self) -> str:
    rms = self.to_json()["field_rms"]
    share = f" ({100 * rms / abs(self.raw_mean):.2g}% of the raw mean)" if self.raw_mean else ""
    if self.choice == "none":
      return "brightness: no correction needed (cross-validated)"
    what = "one offset" if self.choice == "global" else f"smoothed over {self.choice}"
    return f"brightness: regional correction, {what}, RMS {rms:.3g}{share}"


class Measure:
  """Pass one: takes the float32 blocks of the denoised movie in order ((n, Y, X), or
  (n, Y, X, C) with uncertainty channels, `step.Channels`), keeps them in `store` when
  given, and sums the raw and denoised frames of two interleaved sets of `block`-frame
  blocks."""

  def __init__(self, movie: Movie, block: int, store: np.ndarray | None = None):
    self.movie = movie
    self.block = max(1, int(block))
    self.store = store
    self.done = 0
    shape = (2,) + tuple(movie.shape[1:3])
    self.raw = np.zeros(shape, np.float64)
    self.den = np.zeros(shape, np.float64)
    self.count = np.zeros(2, np.int64)

  def add(self, block: np.ndarray) -> None:
    """The next frames of the denoised movie (float32)."""
    start, n = self.done, len(block)
    if self.store is not None:
      self.store[start:start + n] = block
    data = np.asarray(block if block.ndim == 3 else Channels.mean(block), np.float64)
    raw = self.movie.read(start, start + n).astype(np.float64)
    half = (np.arange(start, start + n) // self.block) % 2
    for k in (0, 1):
      rows = half == k
      self.raw[k] += raw[rows].sum(0)
      self.den[k] += data[rows].sum(0)
      self.count[k] += int(rows.sum())
    self.done += n

  def through(self, blocks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """Each block, once added (for callers that reduce the blocks as they come)."""
    for block in blocks:
      self.add(block)
      yield block

  def fit(self) -> Correction:
    """The correction whose smoothing scores best across the two sets."""
    raw_mean = float(self.raw.sum() / max(self.count.sum(), 1) / self.raw[0].size)
    total = (self.raw.sum(0) - self.den.sum(0)) / max(self.count.sum(), 1)
    if self.count.min() < self.block * MIN_BLOCKS_PER_SET:  # too short to cross-validate
      return Correction(np.full(total.shape, total.mean(), np.float32), "global",
                        {}, raw_mean)
    diff = (self.raw - self.den) / self.count[:, None, None]
    candidates = {"none": lambda d: np.zeros_like(d),
                  "global": lambda d: np.full_like(d, d.mean())}
    for s in SIGMAS:
      if s < max(total.shape):
        candidates[f"sigma {s:g} px"] = lambda d, s=s: gaussian_blur(d, s)
    scores = {name: float(0.5 * (np.mean((f(diff[0]) - diff[1]) ** 2) +
                                 np.mean((f(diff[1]) - diff[0]) ** 2)))
              for name, f in candidates.items()}
    choice = min(scores, key=scores.get)
    return Correction(candidates[choice](total).astype(np.float32), choice, scores,
                      raw_mean)


def correct(blocks: Iterator[np.ndarray], correction: Correction | None, out_dtype,
            stats: DenoiseStats | None = None
            ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
  """Pass two: the stored float32 blocks, in order, with the correction (if any) added
  to the denoised frames (and to the samples, which are values; not to the std), as
  (frames in `out_dtype`, the other channels or None); the rounding and clipping are
  counted afresh in `stats`."""
  field = None if correction is None else correction.field.astype(np.float32)
  if stats is not None:
    stats.clipped, stats.rounding_sq, stats.rounded, stats.spread = 0, 0.0, 0, None
  for block in blocks:
    block = np.array(block, np.float32)
    if field is not None:
      if block.ndim == 3:
        block += field
      else:
        Channels.mean(block)[...] += field
        Channels.samples(block)[...] += field[..., None]
    data, extras = (block, None) if block.ndim == 3 else (Channels.mean(block),
                                                          Channels.extras(block))
    converted = host_convert(data, out_dtype)
    if stats is not None:
      stats.count(converted)
    yield converted.data, extras


def fit(movie: Movie, blocks: Iterator[np.ndarray], model_config,
        store: np.ndarray | None = None) -> Correction:
  """Pass one over the denoised movie's float32 `blocks` (in order, kept in `store` when
  given): the correction for `movie`, with the model's patch as the block."""
  measure = Measure(movie, patch_frames(model_config), store)
  for block in blocks:
    measure.add(block)
  return measure.fit()


def corrected_array(raw: np.ndarray, denoised: np.ndarray, block: int
                    ) -> tuple[np.ndarray, Correction]:
  """`denoised` (T, Y, X) corrected against `raw`, both in memory (for callers that
  hold both, such as the bootstrap's re-estimates)."""
  measure = Measure(ArrayMovie(np.asarray(raw)), block)
  measure.add(np.asarray(denoised, np.float32))
  correction = measure.fit()
  return (np.asarray(denoised, np.float32) + correction.field), correction


def chunks(store: np.ndarray, frames: int = 64) -> Iterator[np.ndarray]:
  """A stored movie, `frames` at a time."""
  for t in range(0, len(store), frames):
    yield store[t:t + frames]


def patch_frames(model_config) -> int:
  """The cross-validation's block: one network patch's length in time (the network
  sees no further, so the two sets' outputs share no frame's noise but at the joins)."""
  return int(model_config.data.patch[0])
