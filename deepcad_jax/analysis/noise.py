"""The noise model of a recording: one fit, used by scoring, events, training and the
uncertainty estimates.

Shot noise plus read noise is Poisson-Gaussian: the variance of a voxel is linear in its
mean, var = a * mean + b (a: the intensity units of one photon; b: read noise and
offset), kept above a floor. Real recordings also carry noise correlated between
neighbouring pixels (amplifier bandwidth along the scan line, resampling), which a box
of pixels sums to more than its pixels' variances.

The fit needs no ground truth. Noise is independent from frame to frame while the
signal (calcium transients, slow drift) is smooth in time, so a high-pass along time
keeps the noise and drops the signal: the third difference
(x[t] - 3 x[t+1] + 3 x[t+2] - x[t+3]) / sqrt(20) has exactly the noise variance for
white noise of any distribution, and suppresses a smooth signal by the sixth power of
its frequency. Its mean square per pixel estimates that pixel's noise variance; pixels
are binned by their mean intensity and a line is fitted through the bins' means,
weighted by their pixels, so the line also reproduces the movie's average noise
variance exactly. The same residuals, compared between neighbouring pixels, give the
spatial correlation of the noise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from deepcad_jax.data.movie import Movie, as_movie
from deepcad_jax.errors import UserError

# The third temporal difference, scaled to unit gain for white noise (1+9+9+1 = 20).
HIGH_PASS = np.array([1.0, -3.0, 3.0, -1.0]) / np.sqrt(20.0)
MIN_FRAMES = len(HIGH_PASS) + 1
BINS = 32
LAGS = 3                       # spatial lags of the correlation, per axis
BLOCK_BYTES = 32 * 2**20       # float64 bytes of one block of frames


@dataclasses.dataclass(frozen=True)
class NoiseModel:
  """var = max(a * mean + b, floor) in the recording's units, and the noise's
  correlation between pixels `k` apart along x (`corr_x[k - 1]`) and along y."""

  a: float
  b: float
  floor: float
  corr_x: tuple[float, ...] = ()
  corr_y: tuple[float, ...] = ()
  mean_variance: float = 0.0   # the average noise variance of the frames fitted
  mean: float = 0.0            # their mean intensity
  frames: tuple[int, int] | None = None
  source: str = ""

  def variance(self, mean: Any) -> Any:
    """The noise variance of voxels whose expected intensity is `mean`."""
    return np.maximum(self.a * np.asarray(mean, np.float64) + self.b, self.floor)

  def box_factor(self, box: tuple[int, int, int]) -> float:
    """Var(sum over a (T, Y, X) box) / (sum of its voxels' variances): 1 for white
    noise, more where neighbours' noise is positively correlated (separable model)."""
    factor = 1.0
    for size, corr in ((box[2], self.corr_x), (box[1], self.corr_y)):
      factor *= 1.0 + 2.0 * sum((1 - k / size) * r for k, r in enumerate(corr, 1)
                                if k < size)
    return max(factor, 1e-3)

  def sample(self, mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A float32 noise draw for a (T, Y, X) movie whose expected intensity is `mean`:
    Gaussian, of this model's variance per voxel, with its neighbour correlation along
    x and y (lag 1, as a moving average of two pixels)."""
    white = rng.standard_normal(np.shape(mean), dtype=np.float32)
    for axis, corr in ((-1, self.corr_x), (-2, self.corr_y)):
      white = _correlate(white, corr[0] if corr else 0.0, axis)
    return white * np.sqrt(self.variance(np.clip(mean, 0, None))).astype(np.float32)

  def describe(self) -> str:
    """The model in a line for the command line."""
    where = self.source + (f" frames {self.frames[0]}:{self.frames[1]}" if self.frames
                           else "")
    corr = ""
    if self.corr_x or self.corr_y:
      corr = (f"; neighbour correlation x {self.corr_x[0] if self.corr_x else 0:.2f}, "
              f"y {self.corr_y[0] if self.corr_y else 0:.2f}")
    photons = "" if self.a <= 0 else f"; one photon is about {self.a:.4g} units"
    return (f"noise model of {where}: variance = {self.a:.4g} x intensity + {self.b:.4g} "
            f"(at least {self.floor:.4g}); average {self.mean_variance:.4g} at mean "
            f"intensity {self.mean:.4g}{photons}{corr}")

  def to_json(self) -> dict:
    return {"a": self.a, "b": self.b, "floor": self.floor, "corr_x": list(self.corr_x),
            "corr_y": list(self.corr_y), "mean_variance": self.mean_variance,
            "mean": self.mean, "frames": None if self.frames is None else list(self.frames),
            "source": self.source}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "NoiseModel":
    frames = d.get("frames")
    return cls(float(d["a"]), float(d["b"]), float(d["floor"]),
               tuple(float(r) for r in d.get("corr_x") or ()),
               tuple(float(r) for r in d.get("corr_y") or ()),
               float(d.get("mean_variance") or 0.0), float(d.get("mean") or 0.0),
               None if frames is None else (int(frames[0]), int(frames[1])),
               str(d.get("source") or ""))


def _correlate(noise: np.ndarray, r: float, axis: int) -> np.ndarray:
  """Unit-variance noise whose neighbours along `axis` correlate by `r` (clipped to
  [-0.49, 0.49]): (n[i] + k n[i-1]) / sqrt(1 + k^2) with k / (1 + k^2) = r."""
  r = float(np.clip(r, -0.49, 0.49))
  if abs(r) < 1e-6:
    return noise
  k = (1 - np.sqrt(1 - 4 * r * r)) / (2 * r)
  head = np.take(noise, [0], axis=axis)
  shifted = np.concatenate([head, np.take(noise, np.arange(noise.shape[axis] - 1),
                                          axis=axis)], axis=axis)
  # the first pixel's neighbour is itself, so give it unit variance separately
  out = (noise + np.float32(k) * shifted) / np.float32(np.sqrt(1 + k * k))
  first = [slice(None)] * noise.ndim
  first[axis] = slice(0, 1)
  out[tuple(first)] = np.take(noise, [0], axis=axis)
  return out.astype(np.float32)


@dataclasses.dataclass
class PixelStatistics:
  """Per-pixel temporal mean and noise variance, and the residuals' lagged products
  summed over the movie (for the spatial correlation)."""

  mean: np.ndarray            # (Y, X)
  variance: np.ndarray        # (Y, X): mean square of the high-passed series
  corr_x: tuple[float, ...]
  corr_y: tuple[float, ...]


def high_pass(block: np.ndarray) -> np.ndarray:
  """The unit-gain third difference along time of (T, Y, X) frames: T - 3 frames."""
  h = HIGH_PASS
  n = block.shape[0] - len(h) + 1
  return sum(h[i] * block[i:i + n] for i in range(len(h)))


def _lag_sums(r: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per lag k: sum r[p] r[p+k], sum r[p]^2, sum r[p+k]^2 along `axis` of (T, Y, X)."""
  n = r.shape[axis]
  prod, left, right = (np.zeros(LAGS) for _ in range(3))
  for k in range(1, min(LAGS, n - 1) + 1):
    a = np.take(r, np.arange(0, n - k), axis=axis)
    b = np.take(r, np.arange(k, n), axis=axis)
    prod[k - 1], left[k - 1], right[k - 1] = (a * b).sum(), (a * a).sum(), (b * b).sum()
  return prod, left, right


def pixel_statistics(movie: Movie | np.ndarray, frames: tuple[int, int] | None = None,
                     name: str = "the movie", what: str = "") -> PixelStatistics:
  """One pass over frames [a, b) of `movie` (default all), block by block; `what`
  names the movie's role in messages (e.g. 'the raw movie')."""
  movie = as_movie(movie, name)
  a, b = frames or (0, movie.shape[0])
  if b - a < MIN_FRAMES:
    raise UserError(f"{movie.name}: the noise model needs at least {MIN_FRAMES} frames; "
                    f"got {b - a}.")
  shape = movie.shape[1:]
  total, square = np.zeros(shape), np.zeros(shape)
  sums = {ax: [np.zeros(LAGS) for _ in range(3)] for ax in (1, 2)}
  halo = len(HIGH_PASS) - 1
  step = max(halo + 1, BLOCK_BYTES // max(1, 8 * shape[0] * shape[1]))
  tail = None
  for t0 in range(a, b, step):
    block = movie.read(t0, min(b, t0 + step)).astype(np.float64)
    if not np.isfinite(block).all():
      raise UserError(f"{what + ' ' if what else ''}{movie.name} holds NaN or infinite "
                      f"values (frames {t0} to "
                      f"{t0 + len(block) - 1}); replace them (e.g. with 0) first.")
    total += block.sum(0)
    series = block if tail is None else np.concatenate([tail, block])
    if len(series) >= len(HIGH_PASS):
      r = high_pass(series)
      square += (r * r).sum(0)
      for ax in (1, 2):
        for acc, part in zip(sums[ax], _lag_sums(r, ax)):
          acc += part
    tail = series[-halo:]
  n = b - a - halo

  def corr(ax: int) -> tuple[float, ...]:
    prod, left, right = sums[ax]
    return tuple(float(p / np.sqrt(l * r)) if l > 0 and r > 0 else 0.0
                 for p, l, r in zip(prod, left, right))
  return PixelStatistics(total / (b - a), square / n, corr(2), corr(1))


def fit(stats: PixelStatistics, bins: int = BINS, name: str = "the movie",
        frames: tuple[int, int] | None = None) -> NoiseModel:
  """The Poisson-Gaussian line through per-pixel statistics (see the module doc)."""
  mean, var = np.ravel(stats.mean), np.ravel(stats.variance)
  if not np.any(var > 0):
    raise UserError(f"{name} has no frame-to-frame variation, so its noise cannot be "
                    "estimated; give the raw recording (not a constant or processed "
                    "movie).")
  edges = np.unique(np.quantile(mean, np.linspace(0, 1, bins + 1)))
  idx = np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, max(0, len(edges) - 2))
  count = np.bincount(idx, minlength=len(edges) - 1).astype(np.float64)
  used = count > 0
  mu = np.bincount(idx, mean, minlength=len(count))[used] / count[used]
  vv = np.bincount(idx, var, minlength=len(count))[used] / count[used]
  w = count[used]
  floor = float(vv[vv > 0].min())
  if len(mu) < 2 or np.ptp(mu) <= 0:
    a, b = 0.0, float(np.average(vv, weights=w))
  else:
    mbar, vbar = np.average(mu, weights=w), np.average(vv, weights=w)
    a = float(np.sum(w * (mu - mbar) * (vv - vbar)) / np.sum(w * (mu - mbar) ** 2))
    if a <= 0:
      a = 0.0
    b = float(vbar - a * mbar)
  return NoiseModel(a, b, floor, stats.corr_x, stats.corr_y,
                    mean_variance=float(var.mean()), mean=float(mean.mean()),
                    frames=frames, source=name)


def fit_movie(movie: Movie | np.ndarray | str, frames: tuple[int, int] | None = None,
              name: str = "the movie") -> NoiseModel:
  """The noise model of frames [a, b) of a movie (an array, `Movie` or path)."""
  movie = as_movie(movie, name)
  return fit(pixel_statistics(movie, frames), name=movie.name, frames=frames)
