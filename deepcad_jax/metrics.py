"""Denoising quality against a reference movie (ground truth).

SNR as in the paper: 10 * log10(|y|^2 / |x - y|^2), y the ground truth; PSNR over the
reference's dynamic range; and the Pearson correlation of every x-y, y-t and x-t slice
with the reference (the paper's three box plots), summarised by quartiles.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deepcad_jax.errors import UserError

SLICES = {"xy": (0, 1, 2), "yt": (2, 0, 1), "xt": (1, 0, 2)}  # slice axis first


def _check(x, y):
  if x.shape != y.shape:
    raise UserError(f"the movies differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}; "
                    "compare a denoised movie with its own reference.")


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


def evaluate(movie: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
  """SNR, PSNR and slice correlations of `movie` against `reference`."""
  return {"snr_db": snr_db(movie, reference), "psnr_db": psnr_db(movie, reference),
          **{f"r_{k}": summarise(slice_correlations(movie, reference, k)) for k in SLICES}}


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """A text table: one row per movie (e.g. raw, denoised)."""
  head = f"{'movie':<10} {'SNR dB':>8} {'PSNR dB':>8} {'r(x-y)':>8} {'r(y-t)':>8} {'r(x-t)':>8}"
  rows = [head, "-" * len(head)]
  for name, r in results.items():
    rows.append(f"{name:<10} {r['snr_db']:>8.2f} {r['psnr_db']:>8.2f} "
                f"{r['r_xy']['median']:>8.3f} {r['r_yt']['median']:>8.3f} "
                f"{r['r_xt']['median']:>8.3f}")
  rows.append("(r: median Pearson correlation of the slices with the reference)")
  return "\n".join(rows)


def evaluate_files(denoised: str, reference: str, raw: str | None = None
                   ) -> dict[str, dict[str, Any]]:
  """Scores of a denoised TIFF (and optionally the raw one) against a reference TIFF."""
  from deepcad_jax.data.movie import open_movie

  def load(path):
    m = open_movie(path)
    return m.read(0, m.shape[0]).astype(np.float32)

  ref = load(reference)
  results = {}
  if raw:
    results["raw"] = evaluate(load(raw), ref)
  results["denoised"] = evaluate(load(denoised), ref)
  return results
