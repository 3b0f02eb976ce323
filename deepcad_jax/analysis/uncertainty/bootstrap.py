"""Error-calibrated uncertainty from the recording alone: a parametric, equivariant
bootstrap, checked and scaled on the recording's own held-out frames.

`denoise --uncertainty K` reports how much the network's answer depends on the
orientation of its input; that spread is several times smaller than the error. This
module estimates the error itself, without ground truth (Tachella & Pereyra, "Equivariant
bootstrapping for uncertainty quantification in imaging inverse problems", 2023):

1. New noisy movies are drawn from the denoised estimate with the recording's fitted
   noise model (`analysis.noise`: Poisson-Gaussian variance, neighbour correlation),
   each under a random symmetry of the (y, x) plane that the network is trained with.
   With `denoise`'s regional brightness correction they are drawn from the network's
   output before it, whose mean image lacks the correction's static noise (a pattern
   of the raw mean that no truth has and that the network smooths away in every draw).
2. Each is denoised as the estimate was (the same network, then the correction) and the
   symmetry is inverted.
3. The root mean square of these re-estimates around what they were drawn from, per
   voxel (lightly smoothed over 3x3x3 voxels), estimates the error: it holds the
   estimator's spread and its bias (a re-estimate that shrinks a transient shows it),
   which the symmetry spread misses.
4. The bias split. The re-estimates' mean deviation m holds that bias, but also the
   estimate's own random error: the draws are made from the estimate, which carries it,
   and the network takes much of it out again in every draw, so it would count twice
   (the std ran 1.04 to 1.11 times the RMS error on simulated movies). `bias_probes`
   more passes measure it: a draw's random part (its deviation less m, an error like the
   estimate's own) is added to another draw's input, denoised again with that draw's
   noise and symmetry, and what the network takes out of it, squared, is the share of
   m^2 to drop, with m's own sampling noise (spread / draws). What is left (smoothed,
   at least 0) is the bias^2; each deviation becomes its random part plus m scaled down
   to it (`Deviations`).

The check and its scaling are `heldout`'s; the segmented writing of long recordings
is `files`'s.

Cost: `draws` + `bias_probes` + 1 network passes per voxel beyond the denoising itself.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax.numpy as jnp
import numpy as np

from deepcad_jax import config as config_lib
from deepcad_jax.analysis import noise as noise_lib
from deepcad_jax.analysis.uncertainty.heldout import (bin_scales, box_mean, heldout_check,
                                                      pair_probe, scale_deviation)
from deepcad_jax.core.augment import apply_symmetry, invert_symmetry, symmetries_for
from deepcad_jax.data.movie import as_movie
from deepcad_jax.denoising import brightness as brightness_lib
from deepcad_jax.denoising.denoiser import Denoiser, as_denoiser
from deepcad_jax.errors import UserError
from deepcad_jax.runtime import resources

log = logging.getLogger("deepcad_jax")

SCALE_MODES = ("heldout", "bins", "none")
MIN_FRAMES = 12  # the check needs held-out frames with neighbours on both sides
# Host bytes per voxel of the recording that the calibrated uncertainty's arrays peak at
# (measured with tracemalloc, 600x64x64, 2 probes: 145; with 8 samples kept: 185): the
# raw movie, the network's output, the estimate and the check's probe (float32), the
# running sums (2 float64, 2 float32), the probes' measure and a draw's temporaries
# (float64 box means included). Each probe keeps 2 draws (float32); each kept sample
# takes 5 bytes (float32 and its share of the temporaries).
BYTES_PER_VOXEL = 132


@dataclasses.dataclass
class Uncertainty:
  """Calibrated uncertainty of one denoised movie.

  std: (T, Y, X) float32, the estimated error std in intensity units (scaled).
  samples: (S, T, Y, X) float32 plausible truths (estimate + scaled deviation of each
    re-estimate), or None.
  record: what was done and checked (draws, scale, per-bin check, cost).
  estimate: (T, Y, X) float32, the denoised movie the error is of (as given, or made
    here as `denoise` makes it).
  """

  std: np.ndarray
  samples: np.ndarray | None
  record: dict
  estimate: np.ndarray | None = None


def smooth3(x: np.ndarray) -> np.ndarray:
  """The mean over a 3x3x3 box around every voxel (edges repeated)."""
  out = np.asarray(x, np.float32)
  for axis in range(out.ndim):
    if out.shape[axis] < 2:
      continue
    n = out.shape[axis]
    lo = np.take(out, np.r_[0, np.arange(n - 1)], axis=axis)
    hi = np.take(out, np.r_[np.arange(1, n), n - 1], axis=axis)
    out = (lo + out + hi) / np.float32(3)
  return out


def denoise_normalised(den: Denoiser, movie: np.ndarray, mean: float, scale: float) -> np.ndarray:
  """`movie` denoised in float32 with a fixed normalisation (that of the recording)."""
  out = np.empty(movie.shape, np.float32)
  for f in den.frames(as_movie(movie), mean=mean, scale=scale):
    out[f.start:f.start + len(f.data)] = f.data
  return out


def _sym(x: np.ndarray, s: int, inverse: bool = False) -> np.ndarray:
  f = invert_symmetry if inverse else apply_symmetry
  return np.asarray(f(jnp.asarray(x), s))




class Deviations:
  """Running sums over the bootstrap deviations d_k (T, Y, X) and their `box` means
  B(d_k) (of d_k and d_k^2 in float64): what the std, the held-out check and the bias
  split need without keeping every draw."""

  def __init__(self, box: int):
    self.box, self.n = box, 0
    self.total = self.square = self.cross = self.low = None

  def add(self, dev: np.ndarray) -> None:
    d = np.asarray(dev, np.float64)
    b = box_mean(d, self.box)
    if self.n == 0:
      self.total, self.square = np.zeros_like(d), np.zeros_like(d)
      self.cross, self.low = (np.zeros(d.shape, np.float32) for _ in range(2))
    self.total += d
    self.square += d * d
    self.cross += d * b
    self.low += b * b
    self.n += 1

  @property
  def mean(self) -> np.ndarray:
    """The mean deviation m (float32)."""
    return (self.total / self.n).astype(np.float32)

  def spread(self) -> np.ndarray:
    """The draws' variance about their own mean, per voxel (n - 1 in the denominator)."""
    m = self.total / self.n
    return np.maximum(self.square - self.n * m * m, 0) / max(self.n - 1, 1)

  def bias_gain(self, removed: np.ndarray) -> np.ndarray:
    """The share g (T, Y, X), in [0, 1], of the mean deviation m kept as the estimator's
    bias. m^2 holds the bias^2, the draws' own sampling noise (spread / n) and what the
    network takes out again of the estimate's own random error (`removed`); the bias^2
    is m^2 less the other two, smoothed over 3x3x3 voxels and at least 0, and
    g = sqrt(bias^2 / smoothed m^2)."""
    m2 = (self.total / self.n) ** 2
    bias2 = np.maximum(smooth3((m2 - self.spread() / self.n - removed).astype(np.float32)),
                       0)
    m2 = smooth3(m2.astype(np.float32))
    ratio = np.divide(bias2, m2, out=np.zeros_like(m2), where=m2 > 0)
    return np.sqrt(np.clip(ratio, 0, 1)).astype(np.float32)

  def adjust(self, dev: np.ndarray, gain: np.ndarray, centre: bool) -> np.ndarray:
    """Deviation d_k with its mean part m scaled by `gain`: c (d_k - m) + gain m, where
    c = sqrt(n / (n - 1)) keeps the draws' spread unbiased; `dev` itself unless
    `centre`."""
    if not centre:
      return dev
    m = self.mean
    c = np.float32(np.sqrt(self.n / (self.n - 1)))
    return (c * (dev - m) + gain * m).astype(np.float32)

  def adjusted(self, gain: np.ndarray, centre: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sums over the adjusted deviations d'_k (see `adjust`) of d'^2, d' B(d') and
    B(d')^2, from the running sums alone (B is linear and the centred parts sum to 0)."""
    if not centre:
      return self.square, self.cross, self.low
    n = self.n
    m = self.total / n
    bm = box_mean(m, self.box)
    g = gain.astype(np.float64) * m
    bg = box_mean(g, self.box)
    c2 = n / (n - 1)
    return (c2 * (self.square - n * m * m) + n * g * g,
            c2 * (self.cross - n * m * bm) + n * g * bg,
            c2 * (self.low - n * bm * bm) + n * bg * bg)

  def summary(self, gain: np.ndarray, removed: np.ndarray) -> dict:
    """The bias split's means over all voxels, for the record."""
    m2 = (self.total / self.n) ** 2
    return {"mean_deviation_sq": float(m2.mean()), "spread": float(self.spread().mean()),
            "own_error_removed": float(np.mean(removed, dtype=np.float64)),
            "bias_sq": float(np.mean(gain.astype(np.float64) ** 2 * m2))}


def open_recording(model: Any, movie: Any, what: str, min_frames: int, why: str
                   ) -> tuple[Denoiser, Any, float, float]:
  """(denoiser, movie, mean, scale) of a check that denoises new movies drawn from the
  recording's noise model, with the recording's normalisation; the network runs plain
  (no symmetries)."""
  den = as_denoiser(model)
  if den.symmetries:
    raise UserError(f"{what} runs the plain network; build the Denoiser without "
                    "symmetries.")
  mv = as_movie(movie, "the raw movie")
  check_frames(mv, what, min_frames, why)
  norm = den.normalisation(mv)
  return den, mv, float(norm.mean), float(norm.scale)


def check_frames(movie: Any, what: str, min_frames: int, why: str, fix: str = "") -> None:
  """One sentence when `movie` has fewer than `min_frames` frames (`fix`: what to do)."""
  if movie.shape[0] < min_frames:
    raise UserError(f"{movie.name}: {what} needs at least {min_frames} frames {why}; got "
                    f"{movie.shape[0]}" + (f"; {fix}." if fix else "."))


def check_memory(movie: Any, what: str, bytes_per_voxel: float, fix: str) -> None:
  """One sentence when `bytes_per_voxel` of `movie` (its shape and name) exceed the
  host's available memory."""
  shape = tuple(int(n) for n in movie.shape)
  resources.check_fits(float(np.prod(shape)) * bytes_per_voxel,
                       resources.host_available_bytes(), "this machine",
                       f"{what} of {movie.name} {shape}", fix)


def plain_recording(model: Any, movie: Any, what: str, min_frames: int, why: str,
                    bytes_per_voxel: float = 0.0, fix: str = "run it on fewer frames (a "
                    "cropped copy) or a machine with more memory"
                    ) -> tuple[Denoiser, Any, np.ndarray, noise_lib.NoiseModel, float, float]:
  """`open_recording` with the raw frames in memory (float32) and their noise model:
  (denoiser, movie, raw, noise model, mean, scale). Refused in one sentence when
  `bytes_per_voxel` of the recording exceed the host's available memory."""
  den, mv, mean, scale = open_recording(model, movie, what, min_frames, why)
  check_memory(mv, what, bytes_per_voxel, fix)
  raw = mv.read(0, mv.shape[0]).astype(np.float32)
  nm = noise_lib.fit_movie(raw, name=mv.name)
  return den, mv, raw, nm, mean, scale


def check_settings(draws: int, bias_probes: int = 0, scale_mode: str = "bins",
                   holdout_every: int = config_lib.UNCERTAINTY_HOLDOUT_EVERY,
                   box: int = config_lib.UNCERTAINTY_CHECK_BOX,
                   bins: int = config_lib.UNCERTAINTY_BINS) -> None:
  """One sentence for settings `calibrated_uncertainty` cannot run with (the CLI asks
  before it denoises anything)."""
  if draws < 2:
    raise UserError(f"--draws takes at least 2 bootstrap draws; got {draws}.")
  if scale_mode not in SCALE_MODES:
    raise UserError(f"the uncertainty scale is one of {', '.join(SCALE_MODES)}; got "
                    f"{scale_mode!r}.")
  if bias_probes < 0:
    raise UserError(f"--bias-probes takes 0 or more network passes; got {bias_probes}.")
  if holdout_every < 4 or box < 1 or bins < 1:
    raise UserError(f"the held-out check needs holdout_every >= 4 (a pair and its two "
                    f"neighbours), box >= 1 and bins >= 1; got {holdout_every}, {box}, "
                    f"{bins}.")


@dataclasses.dataclass(frozen=True)
class Settings:
  """How the calibrated uncertainty runs (see `calibrated_uncertainty`'s Args)."""
  draws: int = config_lib.UNCERTAINTY_DRAWS
  seed: int = 0
  scale_mode: str = "bins"
  keep_samples: bool = False
  holdout_every: int = config_lib.UNCERTAINTY_HOLDOUT_EVERY
  bins: int = config_lib.UNCERTAINTY_BINS
  box: int = config_lib.UNCERTAINTY_CHECK_BOX
  bias_probes: int = config_lib.UNCERTAINTY_BIAS_PROBES
  brightness: str = "regional"
  progress: bool = False

  def check(self) -> "Settings":
    check_settings(self.draws, self.bias_probes, self.scale_mode, self.holdout_every,
                   self.box, self.bins)
    brightness_lib.check_mode(self.brightness)
    return self

  @property
  def probes(self) -> int:
    """The bias probes that run: at most draws // 2 (donors and hosts are apart)."""
    return min(self.bias_probes, self.draws // 2)

  @property
  def regional(self) -> bool:
    return self.brightness == "regional"

  def bytes_per_voxel(self) -> float:
    return BYTES_PER_VOXEL + 8 * self.probes + (5 * self.draws if self.keep_samples else 0)


def calibrated_uncertainty(movie: Any, model: Any, estimate: Any = None, *,
                           draws: int = config_lib.UNCERTAINTY_DRAWS, seed: int = 0,
                           scale_mode: str = "bins", keep_samples: bool = False,
                           holdout_every: int = config_lib.UNCERTAINTY_HOLDOUT_EVERY,
                           bins: int = config_lib.UNCERTAINTY_BINS,
                           box: int = config_lib.UNCERTAINTY_CHECK_BOX,
                           bias_probes: int = config_lib.UNCERTAINTY_BIAS_PROBES,
                           brightness: str = "regional",
                           progress: bool = False) -> Uncertainty:
  """The calibrated error std of a denoised movie, from the raw recording alone, in
  memory (`write_calibrated_uncertainty` writes it for recordings of any length).

  Args:
    movie: the raw recording (array, path or `Movie`); held in memory.
    model: a `Model`, model directory or `Denoiser` (without uncertainty symmetries).
    estimate: its denoised movie (default: denoised here, one more network pass).
    draws: bootstrap draws (network passes); at least 2.
    seed: the draws' random seed.
    scale_mode: 'bins' (a scale per activity bin of the held-out check), 'heldout' (one
      scale from the check over all pixels) or 'none' (the bootstrap as it is).
    keep_samples: also return the plausible truths (for `traces` bands).
    holdout_every: one held-out pair of frames in this many, for the check.
    bins: activity bins of the check.
    box: the check's square, in pixels across.
    bias_probes: extra network passes that measure how much of the estimate's own
      random error the network takes out again (it would pass for bias); at most
      draws // 2. 0 keeps the re-estimates' mean deviation whole.
    brightness: how the estimate was made ('regional': `denoising.brightness`, the
      default of `denoise`; 'model': the network's output); each re-estimate is made
      the same way, so the correction's own error is part of the spread.
    progress: log each draw.
  """
  settings = Settings(draws, seed, scale_mode, keep_samples, holdout_every, bins, box,
                      bias_probes, brightness, progress).check()
  den, mv, raw, nm, mean, nscale = plain_recording(
      model, movie, "calibrated uncertainty", MIN_FRAMES, "for its held-out check",
      settings.bytes_per_voxel(), "run it on fewer frames, or write it with "
      "write_calibrated_uncertainty (what denoise --uncertainty calibrated does), which "
      "works in segments")
  est = None if estimate is None else as_movie(estimate, "the denoised movie")
  if est is not None and tuple(est.shape) != tuple(raw.shape):
    raise UserError(f"the denoised movie is {tuple(est.shape)} but {mv.name} is "
                    f"{tuple(raw.shape)}; give the denoised version of this recording.")
  return calibrate_arrays(den, raw, None if est is None else est.read(0, mv.shape[0]), nm,
                          mean, nscale, settings)


def calibrate_arrays(den: Denoiser, raw: np.ndarray, estimate: np.ndarray | None,
                     nm: noise_lib.NoiseModel, mean: float, nscale: float, settings: Settings
                     ) -> Uncertainty:
  """The calibrated uncertainty of `raw` (T, Y, X, float32, in memory) and its
  `estimate` (or None: denoised here), with the recording's normalisation."""
  draws, box, probes, regional = (settings.draws, settings.box, settings.probes,
                                  settings.regional)
  block = brightness_lib.patch_frames(den.model.config)

  def estimator(noisy: np.ndarray, s: int = 0) -> np.ndarray:
    """The estimate of `noisy` as `denoise` makes it (under symmetry s, inverted): the
    draws and the check's probe are made as the estimate is."""
    out = _sym(denoise_normalised(den, _sym(noisy, s), mean, nscale), s, inverse=True)
    return brightness_lib.corrected_array(noisy, out, block)[0] if regional else out

  network = denoise_normalised(den, raw, mean, nscale) if (
      regional or estimate is None) else None
  if estimate is None:
    est = brightness_lib.corrected_array(raw, network, block)[0] if regional else network
  else:
    est = np.asarray(estimate, np.float32)
  # The draws' truth: the estimate, or with the regional correction the network's own
  # output, which lacks the correction's static noise (a pattern of the raw movie's
  # mean that no real truth has and that the network would smooth away in every draw).
  truth = network if regional else est
  syms = symmetries_for(raw.shape)

  def draw(k: int) -> tuple[int, np.ndarray]:
    """Draw k's symmetry and noisy movie (its own seed, so it can be drawn again)."""
    rng = np.random.default_rng([settings.seed, k])
    s = int(syms[rng.integers(len(syms))])
    return s, truth + nm.sample(truth, rng)

  probe, held = pair_probe(raw, settings.holdout_every)
  pairs = np.concatenate([held, held + 1])
  moments = Deviations(box)
  kept = {}  # the draws the bias split pairs up: donors 0.. and hosts ..draws - 1
  devs = np.empty((draws,) + raw.shape, np.float32) if settings.keep_samples else None
  for k in range(draws):
    s, noisy = draw(k)
    dev = estimator(noisy, s) - truth
    moments.add(dev)
    if k < probes or k >= draws - probes:
      kept[k] = dev
    if devs is not None:
      devs[k] = dev
    if settings.progress:
      log.info("bootstrap draw %d/%d (symmetry %d)", k + 1, draws, s)
  removed = np.zeros(raw.shape, np.float32)
  for j in range(probes):
    # donor j's random part, added to host k's input: what the network takes out of it
    host = draws - 1 - j
    zeta = kept[j] - moments.mean
    s, noisy = draw(host)
    response = estimator(noisy + zeta, s) - truth - kept[host]
    removed += ((response - zeta) ** 2).astype(np.float32) / np.float32(probes)
    if settings.progress:
      log.info("bias probe %d/%d", j + 1, probes)
  gain = moments.bias_gain(removed) if probes else np.ones(raw.shape, np.float32)
  square, cross, low = moments.adjusted(gain, centre=probes > 0)
  rows = heldout_check(raw, est, estimator(probe), held, low[pairs] / draws, box,
                       settings.bins)
  pooled = rows[-1]["scale"]
  scale_mode = settings.scale_mode
  level = (bin_scales(est, rows, box) if scale_mode == "bins" else
           np.full(raw.shape[1:], pooled if scale_mode == "heldout" else 1.0, np.float32))
  # each deviation's box-mean part is scaled, the rest (finer than the check) is not:
  # mean of (dev + (level - 1) box_mean(dev))^2
  extra = (level - np.float32(1))[None]
  var = smooth3(((square + 2 * extra * cross + extra ** 2 * low) / draws).astype(np.float32))
  std = np.sqrt(np.maximum(var, 0)).astype(np.float32)
  samples = devs  # each deviation becomes its plausible truth, in place
  for k in range(len(devs) if devs is not None else 0):
    devs[k] = est + scale_deviation(moments.adjust(devs[k], gain, probes > 0), level, box)
  record = {"method": "parametric equivariant bootstrap"
                      + (", its mean deviation split into bias and the estimate's own "
                         "error" if probes else "")
                      + ", its box means checked on held-out frame pairs per activity bin",
            "draws": draws, "seed": settings.seed, "scale_mode": scale_mode,
            "brightness": settings.brightness,
            "scale": {"bins": None, "heldout": pooled, "none": 1.0}[scale_mode],
            "heldout_scale": pooled, "heldout_every": settings.holdout_every,
            "check_box": box, "check": rows[:-1], "verdict": rows[-1],
            "noise_model": nm.to_json(),
            "bias_probes": probes, "bias_split": moments.summary(gain, removed),
            "network_passes_per_voxel": draws + probes + 1 + (estimate is None or regional),
            "mean_std": float(std.mean()), "shape": list(raw.shape),
            "samples": 0 if samples is None else draws}
  return Uncertainty(std, samples, record, est)
