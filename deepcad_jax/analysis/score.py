"""How good is a model on a recording without ground truth: the held-out quality score.

Training predicts odd frames from even frames (and, swapped, even from odd). The score
does the same on frames training never saw, without augmentation: the network is
applied to the even frames of a segment and its output compared with the odd frames,
and the other way round. The noise of a frame is independent of its neighbours', so

  E (prediction - raw target)^2 = E (prediction - truth)^2 + noise variance.

The noise variance of the segment comes from its noise model (`noise.py`: third
temporal differences, which keep the noise and drop the smooth signal), so its
subtraction gives the **estimated MSE against the truth**, in the movie's units. The
same is done for three baselines that anyone could compute from the same frames (the
temporal mean image of the other sub-movie, the average of the two neighbouring frames,
and a four-frame moving average), and the model is judged against the best of them:

- `better than baselines`: its estimated MSE is below every baseline's;
- `no better than a baseline`: it is not;
- `collapsed`: its output hardly changes over time (temporal std below 1% of the noise
  std) and it does not beat the baselines: a constant movie, a run that diverged or
  died (a still output that beats them is a still scene, denoised).

The confidence interval resamples blocks of pixels (a bootstrap over an 8x8 grid of
the frame), which carries both the frames' error and the noise estimate's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from deepcad_jax.analysis import noise as noise_lib
from deepcad_jax.data.movie import ArrayMovie, Movie, as_movie
from deepcad_jax.runtime.files import AtomicFile
from deepcad_jax.errors import UserError
from deepcad_jax.denoising.denoiser import Denoiser, as_denoiser

MIN_FRAMES = 16  # a segment gives two sub-movies of at least 8 frames
GRID = 8         # blocks per axis for the bootstrap
RESAMPLES = 1000
COLLAPSE_RATIO = 0.01  # output temporal std / noise std below this: collapsed
BETTER, NO_BETTER, COLLAPSED = ("better than baselines", "no better than a baseline",
                                "collapsed")
VERDICTS = (BETTER, NO_BETTER, COLLAPSED)
BASELINES = ("temporal mean", "neighbour average", "moving average 4")
NOISE_TOO_HIGH = (
    "  note: the estimated MSE is below zero, so the noise variance is overestimated: "
    "the recording changes faster than its frame rate resolves (motion between frames, "
    "or a filtered or interpolated movie); the MSEs are then lower bounds, and the "
    "comparison with the baselines (which does not depend on the noise) still holds")
ADVICE = {
    COLLAPSED: "its output hardly changes over time: train again with --fresh (another "
               "--seed, or a lower --lr), and check the loss curve",
    NO_BETTER: "a simple temporal filter does as well: train longer (--epochs), on more "
               "data, or with a larger --patch; check that frames are independent noisy "
               "samples (not already filtered or interpolated)",
}


def parse_frames(text: str | None, n: int, name: str = "the movie") -> tuple[int, int]:
  """'a:b' (Python slice bounds, negative from the end; either may be empty) -> (a, b)
  within [0, n); None means all frames."""
  if text is None:
    return 0, n
  try:
    a, b = (t.strip() for t in str(text).split(":"))
    lo, hi, _ = slice(int(a) if a else None, int(b) if b else None).indices(n)
  except ValueError:
    raise UserError(f"--frames takes a range a:b of frames (e.g. 900:1000 or -100:); got "
                    f"{text!r}.") from None
  if hi - lo < MIN_FRAMES:
    raise UserError(f"--frames {text} selects {max(0, hi - lo)} frames of {name} ({n} "
                    f"frames); the score needs at least {MIN_FRAMES}.")
  return lo, hi


def holdout_range(n: int, holdout: float | str) -> tuple[int, int] | None:
  """The frames held out of training: the last `holdout` fraction (a float in (0, 1)) or
  an explicit range 'a:b'; None when nothing is held out (0)."""
  if isinstance(holdout, str):
    return parse_frames(holdout, n)
  if not holdout:
    return None
  count = int(round(n * float(holdout)))
  if count < MIN_FRAMES or n - count < MIN_FRAMES:
    raise UserError(f"holding out {holdout:g} of {n} frames leaves {count} for the score "
                    f"and {n - count} for training; each needs at least {MIN_FRAMES} (use "
                    "a longer movie or another --holdout).")
  return n - count, n


@dataclasses.dataclass
class Blocks:
  """Sums per pixel block of one or more segments: the raw material of a `Score`."""

  squared: dict[str, np.ndarray]  # method -> (blocks,) sum of (prediction - target)^2
  noise: np.ndarray               # (blocks,) sum of the targets' noise variance
  count: np.ndarray               # (blocks,) target voxels
  residual: np.ndarray            # (blocks,) sum of (target - model prediction)
  scale: np.ndarray               # (blocks,) the movie's scale (normalise.py)
  output_var: float = 0.0         # sum over pixels of the model output's temporal variance
  raw_var: float = 0.0            # the same of the raw targets
  pixels: int = 0

  @staticmethod
  def join(parts: Sequence["Blocks"]) -> "Blocks":
    return Blocks({k: np.concatenate([p.squared[k] for p in parts]) for k in parts[0].squared},
                  np.concatenate([p.noise for p in parts]),
                  np.concatenate([p.count for p in parts]),
                  np.concatenate([p.residual for p in parts]),
                  np.concatenate([p.scale for p in parts]),
                  sum(p.output_var for p in parts), sum(p.raw_var for p in parts),
                  sum(p.pixels for p in parts))


@dataclasses.dataclass
class Score:
  """The held-out quality of a model on a segment (see the module doc); intensities
  are in the movie's units, MSEs in its units squared."""

  heldout_mse: float          # mean (prediction - raw target)^2, both directions
  noise_variance: float       # the targets' average noise variance (noise model)
  estimated_mse: float        # heldout_mse - noise_variance: the error against the truth
  estimated_mse_ci: tuple[float, float]  # 95% (block bootstrap)
  baselines: dict[str, float]  # name -> estimated MSE
  verdict: str                # one of VERDICTS
  output_temporal_std: float  # the model output's temporal std (RMS over pixels)
  raw_temporal_std: float     # the raw targets'
  frames: tuple[int, int] | None = None
  movie: str = ""
  noise: noise_lib.NoiseModel | None = None
  even_to_odd: float | None = None
  odd_to_even: float | None = None
  brightness_offset: float = 0.0  # network units the model's output was low by on
                                  # these frames; the MSEs above are after it

  @property
  def score(self) -> float:
    """The raw held-out MSE (what `score` reported before the noise correction); the
    estimated MSE is `estimated_mse`, the checkpoint metric."""
    return self.heldout_mse

  @property
  def best_baseline(self) -> tuple[str, float]:
    name = min(self.baselines, key=self.baselines.get)
    return name, self.baselines[name]

  @property
  def gain_db(self) -> float:
    """10 log10(best baseline's estimated MSE / the model's): > 0 is better."""
    best = self.best_baseline[1]
    if best <= 0 or self.estimated_mse <= 0:
      return math.inf if best > 0 >= self.estimated_mse else -math.inf
    return 10 * math.log10(best / self.estimated_mse)

  @property
  def warning(self) -> str | None:
    """One line naming a collapsed model or one no better than a baseline, with what
    to try; None for a good one."""
    if self.verdict == BETTER:
      return None
    return (f"WARNING: the model is {self.verdict} on held-out frames of {self.movie}: "
            f"{ADVICE[self.verdict]}.")

  def to_json(self) -> dict:
    d = {"heldout_mse": self.heldout_mse, "noise_variance": self.noise_variance,
         "estimated_mse": self.estimated_mse, "estimated_mse_ci": list(self.estimated_mse_ci),
         "baselines": dict(self.baselines), "best_baseline": self.best_baseline[0],
         "gain_db": _finite(self.gain_db), "verdict": self.verdict,
         "output_temporal_std": self.output_temporal_std,
         "raw_temporal_std": self.raw_temporal_std, "movie": self.movie,
         "frames": None if self.frames is None else list(self.frames),
         "even_to_odd": self.even_to_odd, "odd_to_even": self.odd_to_even,
         "brightness_offset": self.brightness_offset}
    if self.noise is not None:
      d["noise_model"] = self.noise.to_json()
    return d

  def describe(self, model: str = "the model") -> str:
    """The score in a few lines for the command line."""
    where = self.movie + (f" frames {self.frames[0]}:{self.frames[1]}" if self.frames else "")
    lo, hi = self.estimated_mse_ci
    best, value = self.best_baseline
    lines = [
        f"held-out score of {model} on {where}: estimated MSE against the truth "
        f"{self.estimated_mse:.4g} (95% CI {lo:.4g} to {hi:.4g}; raw held-out MSE "
        f"{self.heldout_mse:.4g} minus noise variance {self.noise_variance:.4g})",
        "  baselines (estimated MSE): " + ", ".join(
            f"{k} {v:.4g}" for k, v in self.baselines.items()),
        f"  gain over the best baseline ({best}, {value:.4g}): {self.gain_db:+.2f} dB; "
        f"output temporal std {self.output_temporal_std:.4g} (raw "
        f"{self.raw_temporal_std:.4g}, noise {math.sqrt(max(self.noise_variance, 0)):.4g})",
        f"  verdict: {self.verdict}"]
    if self.noise is not None:
      lines.insert(1, "  " + self.noise.describe())
    if self.estimated_mse_ci[1] < 0:
      lines.append(NOISE_TOO_HIGH)
    if self.warning:
      lines.append(self.warning)
    return "\n".join(lines)

  def write_json(self, path: str, overwrite: bool = False) -> None:
    """The report as JSON at `path`, written atomically."""
    with AtomicFile(path, overwrite=overwrite) as f:
      json.dump(self.to_json(), f.text(), indent=1)


def _finite(x: float) -> float | None:
  return x if math.isfinite(x) else None


def _block_index(shape: tuple[int, int]) -> np.ndarray:
  """(Y, X) -> block number on a GRID x GRID grid (fewer where the frame is small)."""
  rows = np.minimum(np.arange(shape[0]) * GRID // max(1, shape[0]), GRID - 1)
  cols = np.minimum(np.arange(shape[1]) * GRID // max(1, shape[1]), GRID - 1)
  return rows[:, None] * GRID + cols[None, :]


def baseline_predictions(source: np.ndarray, target_is_later: bool) -> dict[str, np.ndarray]:
  """The baselines' predictions of the targets from the source sub-movie (n, Y, X):
  target k lies between source frames k and k+1 (`target_is_later`: even -> odd) or
  k-1 and k (odd -> even)."""
  n = len(source)
  k = np.arange(n)
  lo = k if target_is_later else k - 1
  around = [np.clip(lo + d, 0, n - 1) for d in (-1, 0, 1, 2)]
  return {"temporal mean": np.broadcast_to(source.mean(0), source.shape),
          "neighbour average": 0.5 * (source[around[1]] + source[around[2]]),
          "moving average 4": sum(source[i] for i in around) / 4.0}


def segment_blocks(denoiser: Denoiser, movie: Movie, frames: tuple[int, int],
                   mean: float | None = None, scale: float | None = None,
                   fixed: tuple[Blocks, noise_lib.NoiseModel] | None = None
                   ) -> tuple[Blocks, noise_lib.NoiseModel]:
  """The block sums of the model on frames [a, b) of `movie`, normalised as the
  denoiser normalises the whole movie (or by `mean` and `scale`), and the segment's
  noise model. What does not depend on the model (the baselines, the noise, the raw
  variation) is computed unless `fixed` (an earlier call's result) gives it.

  The noise subtracted is each pixel's own high-pass estimate (`noise.py`), which the
  fitted line reproduces on average: unlike the line with its floor, it adds no bias
  where the error to estimate is a small fraction of the noise.
  """
  a, b = frames
  norm = denoiser.normalisation(movie, mean, scale)
  segment = movie.read(a, b).astype(np.float64)
  if not np.isfinite(segment).all():
    raise UserError(f"{movie.name} holds NaN or infinite values in frames {a}:{b}; "
                    "replace them (e.g. with 0) first.")
  even, odd = segment[0::2], segment[1::2]
  n = min(len(even), len(odd))
  even, odd = even[:n], odd[:n]
  index = _block_index(segment.shape[1:]).ravel()
  blocks = GRID * GRID
  if fixed is None:
    stats = noise_lib.pixel_statistics(ArrayMovie(segment, movie.name))
    noise = noise_lib.fit(stats, name=movie.name, frames=(a, b))
    per_block = np.bincount(index, minlength=blocks).astype(np.float64)
    noise_sum = np.bincount(index, stats.variance.ravel(), minlength=blocks) * 2 * n
    count = per_block * 2 * n
  else:
    noise, noise_sum, count = fixed[1], fixed[0].noise, fixed[0].count

  def block_sums(residual_pairs) -> np.ndarray:
    total = np.zeros(blocks)
    for pred, target in residual_pairs:
      total += np.bincount(index, ((pred - target) ** 2).sum(0).ravel(), minlength=blocks)
    return total

  outputs = []
  for source in (even, odd):
    out = np.concatenate([f.data for f in denoiser.frames(
        ArrayMovie(source.astype(np.float32), movie.name), mean=float(norm.mean),
        scale=float(norm.scale))]).astype(np.float64)
    outputs.append(out)
  squared = {"model": block_sums(zip(outputs, (odd, even)))}
  residual = sum(np.bincount(index, (t - o).sum(0).ravel(), minlength=blocks)
                 for o, t in zip(outputs, (odd, even)))
  output_var = sum(float(o.var(0).sum()) for o in outputs) / 2
  if fixed is None:
    raw_var = sum(float(t.var(0).sum()) for t in (odd, even)) / 2
    preds = [baseline_predictions(even, True), baseline_predictions(odd, False)]
    for name in BASELINES:
      squared[name] = block_sums(zip((preds[0][name], preds[1][name]), (odd, even)))
  else:
    raw_var = fixed[0].raw_var
    squared.update({k: v for k, v in fixed[0].squared.items() if k != "model"})
  if not np.isfinite(squared["model"]).all():
    output_var = float("nan")
  return Blocks(squared, noise_sum, count, residual, np.full(blocks, float(norm.scale)),
                output_var, raw_var, int(np.prod(segment.shape[1:]))), noise


def summarise(blocks: Blocks, movie: str = "", frames: tuple[int, int] | None = None,
              noise: noise_lib.NoiseModel | None = None, seed: int = 0,
              correct_brightness: bool = True) -> Score:
  """The `Score` of block sums (bootstrap over blocks for the interval). With
  `correct_brightness`, the model's mean residual (in network units, so one number
  fits movies of any units) is fitted and taken out first: the brightness correction
  training stores with the model (`RunMeta.output_offset`)."""
  used = blocks.count > 0
  count, noise_sum = blocks.count[used], blocks.noise[used]
  squared = {k: v[used] for k, v in blocks.squared.items()}
  offset = 0.0
  if correct_brightness:
    res, scale = blocks.residual[used], blocks.scale[used]
    offset = float((res / scale).sum() / count.sum())
    if np.isfinite(offset):  # sum (r - b s)^2 = sum r^2 - 2 b s sum r + b^2 s^2 n
      squared["model"] = squared["model"] - 2 * offset * scale * res + \
          offset ** 2 * scale ** 2 * count
    else:
      offset = 0.0
  total = count.sum()
  noise_var = float(noise_sum.sum() / total)
  heldout = float(squared["model"].sum() / total)
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, len(count), size=(RESAMPLES, len(count)))
  boot = (squared["model"][picks].sum(1) - noise_sum[picks].sum(1)) / count[picks].sum(1)
  lo, hi = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
  baselines = {k: float(v.sum() / total) - noise_var for k, v in squared.items()
               if k != "model"}
  pixels = max(1, blocks.pixels)
  out_std = math.sqrt(blocks.output_var / pixels) if np.isfinite(blocks.output_var) else \
      float("nan")
  raw_std = math.sqrt(blocks.raw_var / pixels)
  estimated = heldout - noise_var
  still = not out_std >= COLLAPSE_RATIO * math.sqrt(max(noise_var, 0.0))
  if math.isfinite(estimated) and estimated < min(baselines.values()):
    verdict = BETTER  # a still output that beats them all is a still scene, well denoised
  elif not math.isfinite(estimated) or still:
    verdict = COLLAPSED
  else:
    verdict = NO_BETTER
  return Score(heldout, noise_var, estimated, (lo, hi), baselines, verdict, out_std,
               raw_std, frames, movie, noise, brightness_offset=offset)


def default_frames(model: Any, movie: Movie) -> tuple[int, int]:
  """The frames to score by default: the model's held-out frames of `movie` when it was
  trained on a movie of that name and shape (training never saw them), else all."""
  name = os.path.basename(movie.name)
  for data, held in zip(model.meta.data, model.meta.holdout or ()):
    if held is not None and data.get("name") == name and \
        tuple(data.get("shape", ())) == tuple(movie.shape):
      return int(held[0]), int(held[1])
  return 0, movie.shape[0]


def score(denoiser: Denoiser | Any, movie: Movie | np.ndarray | str,
          frames: tuple[int, int] | None = None, mean: float | None = None,
          scale: float | None = None) -> Score:
  """The held-out quality of a model (a `Denoiser`, `Model` or model path) on frames
  [a, b) of `movie` (default: all of it). The movie is normalised as a whole, as in
  training (`mean`, `scale` override that)."""
  den = as_denoiser(denoiser, tiling="exact") if not isinstance(denoiser, Denoiser) \
      else denoiser
  movie = as_movie(movie)
  a, b = frames or (0, movie.shape[0])
  if b - a < MIN_FRAMES:
    raise UserError(f"{movie.name}: frames {a}:{b} are too few for the score (at least "
                    f"{MIN_FRAMES}).")
  blocks, nm = segment_blocks(den, movie, (a, b), mean, scale)
  return summarise(blocks, movie.name, (a, b), nm)


class HeldOutScorer:
  """Scores parameters on fixed held-out segments of several movies, as training does
  every epoch: the noise models and the baselines are computed once."""

  def __init__(self, movies: Sequence[Movie], segments: Sequence[tuple[int, int]],
               means: Sequence[float], scales: Sequence[float]):
    self.movies, self.segments = list(movies), list(segments)
    self.means, self.scales = list(means), list(scales)
    self._fixed: list[tuple[Blocks, noise_lib.NoiseModel]] | None = None

  def __call__(self, den: Denoiser) -> Score:
    parts, fixed = [], []
    for i, (m, seg) in enumerate(zip(self.movies, self.segments)):
      known = None if self._fixed is None else self._fixed[i]
      blocks, nm = segment_blocks(den, m, seg, self.means[i], self.scales[i], known)
      parts.append(blocks)
      fixed.append((blocks, nm))
    if self._fixed is None:
      self._fixed = fixed
    name = ", ".join(m.name for m in self.movies)
    single = len(self.movies) == 1
    return summarise(Blocks.join(parts), name, self.segments[0] if single else None,
                     fixed[0][1] if single else None)
