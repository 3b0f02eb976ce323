"""The held-out check of the calibrated uncertainty: how large the estimate's error is
on the recording's own frames, with no noise model and no ground truth.

The check: one pair of frames (h, h + 1) in `holdout_every` is
replaced by the straight line between h - 1 and h + 2 and the movie is denoised once
more. The raw frames' noises are independent of each other and of that probe estimate,
so the product of their residuals from it, averaged over a `box` x `box` square
(UNCERTAINTY_CHECK_BOX: 3, the std map's own resolution), has the mean of the probe's
box-mean error at h times that at h + 1, about its variance. Less the mean square gap
between the probe and the estimate (the error the two missing frames add), it estimates
the estimate's box-mean error variance. Per bin of activity (each pixel's temporal std
in the estimate), its ratio to the bootstrap's box-mean variance is reported; where the
two differ by more than twice the check's standard error (from disjoint squares), the
box-mean part of every deviation in that bin is scaled by the ratio's square root. The
finer rest, which the check cannot resolve at low SNR, stays as the bootstrap has it.
The old check compared single voxels with the noise variance subtracted: at low SNR that
variance is 100 times the error, so 1% of error in the fitted noise model decided it.
"""

from __future__ import annotations

import numpy as np


def box_mean(x: np.ndarray, box: int) -> np.ndarray:
  """The mean over a `box` x `box` square around every pixel of (..., Y, X) frames
  (edges repeated)."""
  out = np.asarray(x, np.float64)
  for axis in (-2, -1):
    lo = box // 2
    pad = [(0, 0)] * out.ndim
    pad[axis] = (lo + 1, box - 1 - lo)
    c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis)
    n = out.shape[axis]
    out = (np.take(c, np.arange(box, box + n), axis=axis)
           - np.take(c, np.arange(n), axis=axis)) / box
  return out


def pair_probe(raw: np.ndarray, every: int) -> tuple[np.ndarray, np.ndarray]:
  """(probe, held): `raw` with one pair of frames (h, h + 1) in `every` replaced by the
  straight line between their neighbours h - 1 and h + 2, and the first frames h."""
  t = raw.shape[0]
  held = np.arange(max(1, every // 2), t - 2, every)
  if not len(held):
    held = np.array([max(1, t // 2 - 1)])
  probe = raw.copy()
  before, after = raw[held - 1], raw[held + 2]
  probe[held] = (2 * before + after) / np.float32(3)
  probe[held + 1] = (before + 2 * after) / np.float32(3)
  return probe, held


def heldout_check(raw: np.ndarray, estimate: np.ndarray, probe_estimate: np.ndarray,
                  held: np.ndarray, bootstrap_box_var: np.ndarray, box: int, bins: int
                  ) -> list[dict]:
  """The check of `box` x `box` means, per bin of `activity` (the last row: over all
  pixels).

  At held-out pairs (h, h + 1), the product of the raw frames' box-mean residuals from
  `probe_estimate` (the movie denoised without them) has the mean of the probe's error
  at h times that at h + 1: the two frames' noises are independent of each other and of
  the probe, so no noise model enters. Less the mean square box-mean gap between the
  probe and `estimate` (the error the held-out frames add), it estimates the estimate's
  box-mean error variance, compared with the bootstrap's (`bootstrap_box_var`, at the
  frames (held, held + 1)). A bin is scaled by sqrt(held-out / bootstrap) only where
  they differ by more than twice the check's standard error (from disjoint boxes)."""
  pairs = (held, held + 1)
  res = [box_mean(raw[h].astype(np.float64) - probe_estimate[h], box) for h in pairs]
  gap = [box_mean(probe_estimate[h].astype(np.float64) - estimate[h], box) for h in pairs]
  err2 = res[0] * res[1] - 0.5 * (gap[0] ** 2 + gap[1] ** 2)
  pred = 0.5 * (bootstrap_box_var[:len(held)] + bootstrap_box_var[len(held):])
  level = activity(estimate, box)
  edges = np.unique(np.quantile(level, np.linspace(0, 1, bins + 1)))
  idx = np.clip(np.searchsorted(edges, level, side="right") - 1, 0, max(0, len(edges) - 2))
  disjoint = np.zeros(level.shape, bool)
  disjoint[box // 2::box, box // 2::box] = True
  rows = []

  def row(m: np.ndarray) -> dict:
    e, p = float(err2[:, m].mean()), float(pred[:, m].mean())
    sample = err2[:, m & disjoint] if (m & disjoint).any() else err2[:, m]
    se = float(sample.std() / np.sqrt(sample.size))
    out = {"pixels": int(m.sum()), "heldout_error_var": e, "bootstrap_var": p,
           "standard_error": se}
    if abs(e - p) <= 2 * se:
      out["verdict"], out["scale"] = "consistent with the bootstrap", 1.0
    elif e <= 0:
      out["verdict"], out["scale"] = "inconclusive: the held-out error is below zero", 1.0
    else:
      out["verdict"] = "scaled: the bootstrap disagrees with the held-out error"
      out["scale"] = float(np.sqrt(e / p)) if p > 0 else 1.0
    return out
  for b in range(max(1, len(edges) - 1)):
    m = idx == b
    if m.any():
      rows.append({"activity_lo": float(edges[b]), "activity_hi": float(edges[b + 1]),
                   **row(m)})
  rows.append(row(np.ones(level.shape, bool)))  # the last row: all pixels (`verdict`)
  return rows


def activity(estimate: np.ndarray, box: int) -> np.ndarray:
  """The (Y, X) activity the check bins by: each pixel's temporal std in `estimate`,
  averaged over a `box` x `box` square."""
  return box_mean(np.asarray(estimate).std(0, dtype=np.float64), box)


def bin_scales(estimate: np.ndarray, rows: list[dict], box: int) -> np.ndarray:
  """The (Y, X) scale of the check's activity bins (`rows`) at `estimate`'s pixels."""
  rows = [r for r in rows if "activity_lo" in r]
  edges = np.array([r["activity_lo"] for r in rows] + [rows[-1]["activity_hi"]])
  scales = np.array([r["scale"] for r in rows], np.float32)
  idx = np.clip(np.searchsorted(edges, activity(estimate, box), side="right") - 1, 0,
                len(scales) - 1)
  return scales[idx]


def scale_deviation(dev: np.ndarray, level: np.ndarray, box: int) -> np.ndarray:
  """A (T, Y, X) bootstrap deviation with its `box`-mean part scaled by `level` (Y, X)
  and its finer rest as it is."""
  return (dev + (level - np.float32(1))[None] * box_mean(dev, box)).astype(np.float32)
