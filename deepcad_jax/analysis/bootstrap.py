"""Error-calibrated uncertainty from the recording alone: a parametric, equivariant
bootstrap, checked and scaled on the recording's own held-out frames.

`denoise --uncertainty K` reports how much the network's answer depends on the
orientation of its input; that spread is several times smaller than the error. This
module estimates the error itself, without ground truth (Tachella & Pereyra, "Equivariant
bootstrapping for uncertainty quantification in imaging inverse problems", 2023):

1. New noisy movies are drawn from the denoised estimate with the recording's fitted
   noise model (`analysis.noise`: Poisson-Gaussian variance, neighbour correlation),
   each under a random symmetry of the (y, x) plane that the network is trained with.
2. Each is denoised by the same network and the symmetry is inverted.
3. The root mean square of these re-estimates around the estimate, per voxel (lightly
   smoothed over 3x3x3 voxels), estimates the error: it holds the estimator's spread and
   its bias (a re-estimate that shrinks a transient shows it), which the symmetry spread
   misses.

The check: one frame in `holdout_every` is replaced by the mean of its two neighbours,
the movie is denoised once more, and at those frames the squared difference between the
raw frame and the denoised one, minus the raw frame's noise variance, estimates the true
squared error (the raw frame's noise is independent of an estimate that never saw it).
Per intensity bin, the ratio of this to the bootstrap's mean square is reported. Over
all bins, the std is scaled by the ratio only where the two differ by more than the
check can tell: twice its standard error plus UNCERTAINTY_NOISE_TOLERANCE (5%) of the
noise variance. At low SNR the noise variance is many times the error, so a few percent
of error in the fitted noise model would decide the scale; there the check reports
"consistent" and the bootstrap stands as it is. The check measures the error of an
estimate made without the held-out frame, slightly larger than that of the estimate.

Cost: `draws` + 1 network passes per voxel beyond the denoising itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax.numpy as jnp
import numpy as np

from deepcad_jax import config as config_lib
from deepcad_jax.analysis import noise as noise_lib
from deepcad_jax.core.augment import apply_symmetry, invert_symmetry, symmetries_for
from deepcad_jax.data.movie import as_movie
from deepcad_jax.data.writers import MovieWriter
from deepcad_jax.denoising import brightness as brightness_lib
from deepcad_jax.denoising.denoiser import Denoiser, as_denoiser
from deepcad_jax.denoising.outputs import sample_path, std_path
from deepcad_jax.data.spec import with_name_suffix
from deepcad_jax.errors import UserError
from deepcad_jax.runtime.files import AtomicFile, outputs_together

log = logging.getLogger("deepcad_jax")

SCALE_MODES = ("heldout", "bins", "none")
MIN_FRAMES = 12  # the check needs held-out frames with neighbours on both sides


@dataclasses.dataclass
class Uncertainty:
  """Calibrated uncertainty of one denoised movie.

  std: (T, Y, X) float32, the estimated error std in intensity units (scaled).
  samples: (S, T, Y, X) float32 plausible truths (estimate + scaled deviation of each
    re-estimate), or None.
  record: what was done and checked (draws, scale, per-bin check, cost).
  """

  std: np.ndarray
  samples: np.ndarray | None
  record: dict


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


def heldout_check(raw: np.ndarray, estimate: np.ndarray, bootstrap_var: np.ndarray,
                  den: Denoiser, nm: noise_lib.NoiseModel, mean: float, scale: float,
                  every: int, bins: int) -> tuple[list[dict], float]:
  """The check per intensity bin, then its verdict over all bins (the last row), and
  the scale to apply: 1 unless the held-out error and the bootstrap differ by more than
  twice the check's standard error plus UNCERTAINTY_NOISE_TOLERANCE of the noise
  variance (a few percent of error in the noise model would otherwise decide it)."""
  t = raw.shape[0]
  held = np.arange(every // 2 + 1, t - 1, every)
  if not len(held):
    held = np.array([t // 2])
  probe = raw.copy()
  probe[held] = 0.5 * (raw[held - 1] + raw[held + 1])
  d = denoise_normalised(den, probe, mean, scale)[held].astype(np.float64)
  r = raw[held].astype(np.float64)
  err2 = (r - d) ** 2 - nm.variance(np.clip(d, 0, None))
  pred = bootstrap_var[held].astype(np.float64)
  level = estimate[held].ravel()
  edges = np.unique(np.quantile(level, np.linspace(0, 1, bins + 1)))
  idx = np.clip(np.searchsorted(edges, level, side="right") - 1, 0, max(0, len(edges) - 2))
  rows = []
  for b in range(max(1, len(edges) - 1)):  # the last row is the total (`verdict`)
    m = idx == b
    if not m.any():
      continue
    e, p = float(err2.ravel()[m].mean()), float(pred.ravel()[m].mean())
    rows.append({"intensity_lo": float(edges[b]), "intensity_hi": float(edges[b + 1]),
                 "voxels": int(m.sum()), "heldout_error_var": e,
                 "bootstrap_var": p,
                 "scale": float(np.sqrt(max(e, 0.0) / p)) if p > 0 else None})
  total_e, total_p = float(err2.mean()), float(pred.mean())
  noise_var = float(nm.variance(np.clip(d, 0, None)).mean())
  tolerance = (2 * float(err2.std()) / np.sqrt(err2.size)
               + config_lib.UNCERTAINTY_NOISE_TOLERANCE * noise_var)
  verdict = {"heldout_error_var": total_e, "bootstrap_var": total_p,
             "noise_var": noise_var, "tolerance": tolerance}
  if abs(total_e - total_p) <= tolerance:
    verdict["verdict"], overall = "consistent with the bootstrap", 1.0
  elif total_e <= 0:
    verdict["verdict"], overall = ("inconclusive: the held-out error is below zero, so "
                                   "the noise model is overestimated"), 1.0
  else:
    verdict["verdict"] = "scaled: the bootstrap disagrees with the held-out error"
    overall = float(np.sqrt(total_e / total_p)) if total_p > 0 else 1.0
  verdict["scale"] = overall
  rows.append(verdict)
  return rows, overall


def bin_scales(estimate: np.ndarray, rows: list[dict], overall: float) -> np.ndarray:
  """The per-voxel scale of the check's intensity bins (`rows`) at `estimate`'s
  intensities; a bin without a scale gets `overall`."""
  rows = [r for r in rows if "intensity_lo" in r]
  edges = np.array([r["intensity_lo"] for r in rows] + [rows[-1]["intensity_hi"]])
  scales = np.array([r["scale"] if r["scale"] else overall for r in rows], np.float32)
  idx = np.clip(np.searchsorted(edges, estimate, side="right") - 1, 0, len(scales) - 1)
  return scales[idx]


def plain_recording(model: Any, movie: Any, what: str, min_frames: int, why: str
                    ) -> tuple[Denoiser, Any, np.ndarray, noise_lib.NoiseModel, float, float]:
  """(denoiser, movie, raw frames in memory, noise model, mean, scale): what a check that
  denoises new movies drawn from the recording's noise model starts from (the
  calibrated uncertainty, the audit). The network runs plain (no symmetries)."""
  den = as_denoiser(model)
  if den.symmetries:
    raise UserError(f"{what} runs the plain network; build the Denoiser without "
                    "symmetries.")
  mv = as_movie(movie, "the raw movie")
  if mv.shape[0] < min_frames:
    raise UserError(f"{mv.name}: {what} needs at least {min_frames} frames {why}; got "
                    f"{mv.shape[0]}.")
  raw = mv.read(0, mv.shape[0]).astype(np.float32)
  norm = den.normalisation(mv)
  nm = noise_lib.fit_movie(raw, name=mv.name)
  return den, mv, raw, nm, float(norm.mean), float(norm.scale)


def calibrated_uncertainty(movie: Any, model: Any, estimate: Any = None, *,
                           draws: int = config_lib.UNCERTAINTY_DRAWS, seed: int = 0,
                           scale_mode: str = "heldout", keep_samples: bool = False,
                           holdout_every: int = config_lib.UNCERTAINTY_HOLDOUT_EVERY,
                           bins: int = config_lib.UNCERTAINTY_BINS,
                           brightness: str = "regional",
                           progress: bool = False) -> Uncertainty:
  """The calibrated error std of a denoised movie, from the raw recording alone.

  Args:
    movie: the raw recording (array, path or `Movie`); held in memory.
    model: a `Model`, model directory or `Denoiser` (without uncertainty symmetries).
    estimate: its denoised movie (default: denoised here, one more network pass).
    draws: bootstrap draws (network passes); at least 2.
    seed: the draws' random seed.
    scale_mode: 'heldout' (one scale from the held-out check), 'bins' (a scale per
      intensity bin of the check) or 'none' (the bootstrap as it is).
    keep_samples: also return the plausible truths (for `traces` bands).
    holdout_every: one held-out frame in this many, for the check.
    bins: intensity bins of the check.
    brightness: how the estimate was made ('regional': `denoising.brightness`, the
      default of `denoise`; 'model': the network's output); each re-estimate is made
      the same way, so the correction's own error is part of the spread.
    progress: log each draw.
  """
  if draws < 2:
    raise UserError(f"--draws takes at least 2 bootstrap draws; got {draws}.")
  if scale_mode not in SCALE_MODES:
    raise UserError(f"the uncertainty scale is one of {', '.join(SCALE_MODES)}; got "
                    f"{scale_mode!r}.")
  regional = brightness_lib.check_mode(brightness) == "regional"
  den, mv, raw, nm, mean, nscale = plain_recording(
      model, movie, "calibrated uncertainty", MIN_FRAMES, "for its held-out check")
  block = brightness_lib.patch_frames(den.model.config)

  def estimator(noisy: np.ndarray, s: int = 0) -> np.ndarray:
    """The estimate of `noisy` as `denoise` makes it (under symmetry s, inverted)."""
    out = _sym(denoise_normalised(den, _sym(noisy, s), mean, nscale), s, inverse=True)
    return brightness_lib.corrected_array(noisy, out, block)[0] if regional else out

  est = (estimator(raw) if estimate is None else
         as_movie(estimate, "the denoised movie").read(0, mv.shape[0]).astype(np.float32))
  if est.shape != raw.shape:
    raise UserError(f"the denoised movie is {est.shape} but {mv.name} is {raw.shape}; "
                    "give the denoised version of this recording.")
  rng = np.random.default_rng(seed)
  syms = symmetries_for(raw.shape)
  acc = np.zeros(raw.shape, np.float64)
  devs = np.empty((draws,) + raw.shape, np.float32) if keep_samples else None
  for k in range(draws):
    s = int(syms[rng.integers(len(syms))])
    noisy = est + nm.sample(est, rng)
    again = estimator(noisy, s)
    dev = again - est
    acc += dev.astype(np.float64) ** 2
    if devs is not None:
      devs[k] = dev
    if progress:
      log.info("bootstrap draw %d/%d (symmetry %d)", k + 1, draws, s)
  var = smooth3((acc / draws).astype(np.float32))
  rows, overall = heldout_check(raw, est, var, den, nm, mean, nscale, holdout_every, bins)
  level = np.ones(raw.shape, np.float32)
  if scale_mode == "heldout":
    level *= np.float32(overall)
  elif scale_mode == "bins":
    level = bin_scales(est, rows, overall)
  std = (np.sqrt(var) * level).astype(np.float32)
  samples = None
  if devs is not None:
    samples = est[None] + devs * level[None]
  record = {"method": "parametric equivariant bootstrap, checked on held-out frames",
            "draws": draws, "seed": seed, "scale_mode": scale_mode,
            "brightness": brightness,
            "scale": overall if scale_mode == "heldout" else (
                None if scale_mode == "bins" else 1.0),
            "heldout_scale": overall, "heldout_every": holdout_every,
            "check": rows[:-1], "verdict": rows[-1], "noise_model": nm.to_json(),
            "network_passes_per_voxel": draws + 1 + (estimate is None),
            "mean_std": float(std.mean()), "shape": list(raw.shape),
            "samples": 0 if samples is None else draws}
  return Uncertainty(std, samples, record)


def record_path(output: str) -> str:
  """Where the record of `output`'s calibrated uncertainty goes: `*_uncertainty.json`
  beside it."""
  path = with_name_suffix(output, "_uncertainty")
  stem = path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path
  return stem + ".json"


def write_uncertainty(result: Uncertainty, output: str, *, overwrite: bool = False
                      ) -> list[str]:
  """`*_std.tif` (float32), `*_uncertainty.json` and, with samples, `*_sample00.tif`...
  beside `output`, all together once complete; returns their paths."""
  paths = [std_path(output), record_path(output)]
  with outputs_together() as files:
    w = MovieWriter(paths[0], result.std.shape[1:], np.float32,
                    frames=len(result.std), overwrite=overwrite)
    files.append(w)
    w.write(result.std)
    if result.samples is not None:
      for i, s in enumerate(result.samples):
        paths.append(sample_path(output, i))
        files.append(MovieWriter(paths[-1], s.shape[1:], np.float32, frames=len(s),
                                 overwrite=overwrite))
        files[-1].write(s)
    record = dict(result.record, std=paths[0], samples_files=paths[2:])
    files.append(AtomicFile(paths[1], overwrite=overwrite))
    json.dump(record, files[-1].text(), indent=1)
  return paths


def describe(record: dict, paths: list[str]) -> str:
  """One line for the command line."""
  return (f"  calibrated uncertainty ({record['draws']} bootstrap draws; held-out check: "
          f"{record['verdict']['verdict']}, scale {record['heldout_scale']:.3g}; "
          f"{record['network_passes_per_voxel']} network passes per voxel): {paths[0]}, "
          f"{paths[1]}" + (f", {len(paths) - 2} samples" if len(paths) > 2 else ""))
