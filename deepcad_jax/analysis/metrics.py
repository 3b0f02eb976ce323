"""Denoising quality against a reference movie (ground truth).

SNR as in the paper: 10 * log10(|y|^2 / |x - y|^2), y the ground truth; PSNR over the
reference's dynamic range; and the Pearson correlation of every x-y, y-t and x-t slice
with the reference (the paper's three box plots), summarised by quartiles.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

import numpy as np

from deepcad_jax.data.movie import open_movie
from deepcad_jax.runtime.files import AtomicFile
from deepcad_jax.errors import UserError

SLICES = {"xy": (0, 1, 2), "yt": (2, 0, 1), "xt": (1, 0, 2)}  # slice axis first


def _check(x, y):
  if x.shape != y.shape:
    raise UserError(f"the movies differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}; "
                    "compare a denoised movie with its own reference.")
  check_finite(x, "the movie")
  check_finite(y, "the reference")


def check_finite(a, name: str) -> None:
  """Refuses NaN or infinite values: every score of such a movie would be meaningless
  (a NaN error once read as SNR = inf)."""
  a = np.asarray(a)
  if a.dtype.kind in "fc":
    bad = ~np.isfinite(a)
    if bad.any():
      where = np.argwhere(bad)[0]
      raise UserError(f"{name} holds {int(bad.sum())} NaN or infinite value(s) (the "
                      f"first at {tuple(int(i) for i in where)}); no score is meaningful: "
                      "replace them (e.g. with 0) or fix what produced them.")


def snr_db(x: np.ndarray, y: np.ndarray) -> float:
  """SNR (dB) of `x` against the ground truth `y`."""
  _check(x, y)
  y = np.asarray(y, np.float64)
  err = np.sum((np.asarray(x, np.float64) - y)**2)
  return float(10 * np.log10(np.sum(y**2) / err)) if err > 0 else float("inf")


def psnr_db(x: np.ndarray, y: np.ndarray, data_range: float | None = None) -> float:
  """Peak SNR (dB); the peak is the reference's range unless `data_range` is given."""
  _check(x, y)
  y = np.asarray(y, np.float64)
  mse = np.mean((np.asarray(x, np.float64) - y)**2)
  peak = float(np.ptp(y)) if data_range is None else float(data_range)
  return float(10 * np.log10(peak**2 / mse)) if mse > 0 else float("inf")


def slice_correlations(x: np.ndarray, y: np.ndarray, kind: str) -> np.ndarray:
  """Pearson r of each slice of `x` with the same slice of `y`.

  kind 'xy': one value per frame; 'yt': per column x; 'xt': per row y.
  """
  _check(x, y)
  order = SLICES[kind]
  a = np.transpose(np.asarray(x, np.float64), order).reshape(x.shape[order[0]], -1)
  b = np.transpose(np.asarray(y, np.float64), order).reshape(y.shape[order[0]], -1)
  a = a - a.mean(1, keepdims=True)
  b = b - b.mean(1, keepdims=True)
  denom = np.sqrt((a * a).sum(1) * (b * b).sum(1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denom > 0, (a * b).sum(1) / denom, np.nan)


def summarise(values: np.ndarray) -> dict[str, float]:
  v = values[np.isfinite(values)]
  if not v.size:
    return {"median": float("nan"), "q1": float("nan"), "q3": float("nan"),
            "mean": float("nan"), "n": 0}
  q1, med, q3 = np.percentile(v, [25, 50, 75])
  return {"median": float(med), "q1": float(q1), "q3": float(q3),
          "mean": float(v.mean()), "n": int(v.size)}


def static_voxels(reference: np.ndarray, rel_tol: float = 1e-3) -> np.ndarray:
  """(Y, X) pixels whose ground truth is constant in time: temporal std at most
  `rel_tol` times their temporal mean (or 0 where the mean is 0)."""
  ref = np.asarray(reference, np.float64)
  return ref.std(0) <= rel_tol * np.abs(ref.mean(0))


def wobble(movie: np.ndarray, reference: np.ndarray, rel_tol: float = 1e-3
           ) -> dict[str, float]:
  """Made-up motion: the temporal standard deviation of `movie` over pixels whose
  ground truth does not change (a perfect denoiser gives 0 there), averaged over those
  pixels; also relative to their mean intensity. NaN when no pixel is static."""
  _check(movie, reference)
  static = static_voxels(reference, rel_tol)
  if not static.any():
    return {"wobble": float("nan"), "wobble_rel": float("nan"), "static_fraction": 0.0}
  m = np.asarray(movie, np.float64)[:, static]
  level = float(np.abs(np.asarray(reference, np.float64)[:, static]).mean())
  w = float(m.std(0).mean())
  return {"wobble": w, "wobble_rel": w / level if level > 0 else float("nan"),
          "static_fraction": float(static.mean())}


def evaluate(movie: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
  """SNR, PSNR and slice correlations of `movie` against `reference`, and its wobble
  over pixels whose ground truth is constant (when there are any)."""
  out = {"snr_db": snr_db(movie, reference), "psnr_db": psnr_db(movie, reference),
         **{f"r_{k}": summarise(slice_correlations(movie, reference, k)) for k in SLICES}}
  if movie.shape[0] > 1:
    w = wobble(movie, reference)
    if w["static_fraction"] > 0:
      out.update(w)
  return out


GAUSSIAN_COVERAGE = {1: 0.6827, 2: 0.9545}  # what a calibrated std would give


def uncertainty_calibration(movie: np.ndarray, std: np.ndarray, reference: np.ndarray
                            ) -> dict[str, float]:
  """How well a predicted std covers the actual error |movie - reference|.

  Coverage: the fraction of voxels whose error is within 1 and 2 std (calibrated
  Gaussian errors give 68.3% and 95.4%); the Pearson correlation between std and |error|;
  and the factor that scales std so the 1-std coverage is 68.3% (with the coverages it
  then gives).
  """
  _check(movie, reference)
  _check(std, reference)
  err = np.abs(np.asarray(movie, np.float64) - np.asarray(reference, np.float64)).ravel()
  s = np.asarray(std, np.float64).ravel()
  out = {f"coverage_{k}std": float(np.mean(err <= k * s)) for k in (1, 2)}
  a, b = s - s.mean(), err - err.mean()
  denom = np.sqrt((a * a).sum() * (b * b).sum())
  out["corr_std_error"] = float((a * b).sum() / denom) if denom > 0 else float("nan")
  with np.errstate(divide="ignore", invalid="ignore"):  # std 0 covers only error 0
    ratio = np.where(s > 0, err / s, np.where(err > 0, np.inf, 0.0))
  scale = float(np.quantile(ratio, GAUSSIAN_COVERAGE[1]))
  out["std_scale"] = scale
  out.update({f"coverage_{k}std_rescaled": float(np.mean(err <= k * scale * s))
              for k in (1, 2)})
  out["mean_std"] = float(s.mean())
  out["mean_abs_error"] = float(err.mean())
  return out


def format_calibration(c: dict[str, float]) -> str:
  return (f"uncertainty: error within 1 std {100 * c['coverage_1std']:.1f}% (calibrated: "
          f"68.3%), within 2 std {100 * c['coverage_2std']:.1f}% (95.4%); "
          f"corr(std, |error|) {c['corr_std_error']:.3f}; mean std {c['mean_std']:.3g} vs "
          f"mean |error| {c['mean_abs_error']:.3g}.\n"
          f"  std x {c['std_scale']:.3g} would give {100 * c['coverage_1std_rescaled']:.1f}% "
          f"and {100 * c['coverage_2std_rescaled']:.1f}% ('deepcad-jax calibrate' stores it "
          "with the model).")


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """A text table: one row per movie (e.g. raw, denoised)."""
  head = f"{'movie':<10} {'SNR dB':>8} {'PSNR dB':>8} {'r(x-y)':>8} {'r(y-t)':>8} {'r(x-t)':>8}"
  rows = [head, "-" * len(head)]
  for name, r in results.items():
    if "snr_db" not in r:
      continue
    rows.append(f"{name:<10} {r['snr_db']:>8.2f} {r['psnr_db']:>8.2f} "
                f"{r['r_xy']['median']:>8.3f} {r['r_yt']['median']:>8.3f} "
                f"{r['r_xt']['median']:>8.3f}")
  rows.append("(r: median Pearson correlation of the slices with the reference)")
  static = [(name, r) for name, r in results.items() if "wobble" in r]
  if static:
    rows.append(f"wobble over the {100 * static[0][1]['static_fraction']:.1f}% of pixels "
                "whose ground truth is constant (temporal std; 0 is perfect): " +
                ", ".join(f"{name} {r['wobble']:.3g} ({100 * r['wobble_rel']:.2f}% of "
                          "their mean)" for name, r in static))
  return "\n".join(rows)


def evaluate_files(denoised: str, reference: str, raw: str | None = None,
                   std: str | None = None, output: str | None = None,
                   overwrite: bool = False) -> dict[str, dict[str, Any]]:
  """Scores of a denoised movie (and optionally the raw one) against a reference; with
  `std` (the *_std.tif of `denoise --uncertainty`), its calibration too; with `output`,
  the results are also written there as JSON (an existing file is replaced only with
  `overwrite`, and refused before anything is read)."""
  if output and os.path.lexists(output) and not overwrite:
    raise UserError(f"{output} already exists; add --overwrite to replace it or choose "
                    "another --output.")

  def load(path):
    m = open_movie(path)
    data = m.read(0, m.shape[0]).astype(np.float32)
    check_finite(data, path)
    return data

  ref = load(reference)
  for name, path in (("--denoised", denoised), ("--raw", raw), ("--std", std)):
    if path and open_movie(path).shape != ref.shape:
      raise UserError(f"{name} {path} {open_movie(path).shape} and --reference {reference} "
                      f"{ref.shape} differ in shape; compare a movie with its own "
                      "reference.")
  results = {}
  if raw:
    results["raw"] = evaluate(load(raw), ref)
  den = load(denoised)
  results["denoised"] = evaluate(den, ref)
  if std:
    results["uncertainty"] = uncertainty_calibration(den, load(std), ref)
  if output:
    with AtomicFile(output, overwrite=overwrite) as f:
      json.dump(results, f.text(), indent=1)
  return results


def describe(results: dict[str, dict[str, Any]], output: str | None = None) -> str:
  """`evaluate_files`'s results for the command line."""
  lines = [format_table(results)]
  if "uncertainty" in results:
    lines.append(format_calibration(results["uncertainty"]))
  if output:
    lines.append(f"results: {output}")
  return "\n".join(lines)


def student_t_quantile(p: float, dof: int) -> float:
  """The p-quantile of Student's t with `dof` degrees of freedom (Cornish-Fisher
  expansion around the normal quantile; within 1% for dof >= 3)."""
  z = statistics.NormalDist().inv_cdf(min(max(p, 1e-9), 1 - 1e-9))
  v = float(max(dof, 1))
  return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
          + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))
