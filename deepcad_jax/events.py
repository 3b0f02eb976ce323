"""Where did denoising remove more than noise? A check for suppressed rare events.

Networks trained to predict one noisy frame from its neighbours tend to treat rare,
brief transients as noise. This check compares the denoised movie with the raw one under
a Poisson-Gaussian noise model estimated from the raw data alone (var = a * mean + b,
fitted from frame-to-frame differences), so the residual raw - denoised can be
standardised. Averaged over small space-time boxes (n voxels), unit noise has standard
deviation 1 / sqrt(n); boxes whose standardised excess z = sqrt(n) * mean exceeds a
threshold (default 6: about 1e-9 per box for Gaussian noise, so a megavoxel movie gives
no false alarm from noise alone) are where the raw data hold signal that the denoised
movie lacks. The result
is a map (the largest z per pixel) and a list of candidate events (local maxima of z).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Any

import numpy as np

from deepcad_jax.data.movie import open_movie, refuse_to_overwrite
from deepcad_jax.data.output import AtomicFile, MovieWriter, os_error, outputs_together
from deepcad_jax.errors import UserError


def noise_model(raw: np.ndarray, bins: int = 32) -> tuple[float, float]:
  """(a, b) of var = a * mean + b, from temporal differences of the raw movie.

  Differences of consecutive frames remove slow signal; per pixel their variance / 2
  estimates the noise variance at that pixel's mean. Pixels are binned by mean and a
  line is fitted through the bins' medians.
  """
  raw = np.asarray(raw, np.float32)
  if raw.shape[0] < 3:
    raise UserError(f"the noise model needs at least 3 frames; got {raw.shape[0]}.")
  mean = raw.mean(0).ravel()
  var = (np.diff(raw, axis=0).var(0) / 2).ravel()
  edges = np.quantile(mean, np.linspace(0, 1, bins + 1))
  idx = np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, bins - 1)
  mu = np.array([np.median(mean[idx == i]) for i in range(bins) if np.any(idx == i)])
  vv = np.array([np.median(var[idx == i]) for i in range(bins) if np.any(idx == i)])
  if len(mu) < 2 or np.ptp(mu) == 0:
    return 0.0, float(np.median(var))
  a, b = np.polyfit(mu, vv, 1)
  return float(max(a, 0.0)), float(max(b, 1e-6))


def _box_mean(x: np.ndarray, size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(mean, count) over a centred box at every voxel (the box shrinks at the edges)."""
  out = x.astype(np.float64)
  count = np.ones((1,) * x.ndim)
  for axis, k in enumerate(size):
    n = out.shape[axis]
    lo = np.clip(np.arange(n) - k // 2, 0, n)
    hi = np.clip(np.arange(n) + k - k // 2, 0, n)
    shape = [1] * out.ndim
    shape[axis] = n
    if k > 1:
      c = np.cumsum(out, axis=axis)
      c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
      out = (np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis)) / (hi - lo).reshape(shape)
    count = count * (hi - lo).reshape(shape)
  return out, count


@dataclasses.dataclass
class EventReport:
  noise: tuple[float, float]        # (a, b) of var = a * mean + b
  z_map: np.ndarray                 # (Y, X): the largest box z over time
  events: list[dict[str, Any]]      # t, y, x, z, excess (raw - denoised, box mean)
  threshold: float
  box: tuple[int, int, int]


def find_suppressed_events(raw: np.ndarray, denoised: np.ndarray, threshold: float = 6.0,
                           box: tuple[int, int, int] = (3, 5, 5),
                           separation: tuple[int, int, int] = (5, 8, 8),
                           max_events: int = 1000) -> EventReport:
  """Candidate events where `raw` exceeds `denoised` beyond what the noise explains."""
  raw = np.asarray(raw, np.float32)
  den = np.asarray(denoised, np.float32)
  if raw.shape != den.shape:
    raise UserError(f"raw {raw.shape} and denoised {den.shape} differ in shape; give the "
                    "denoised version of this raw movie.")
  a, b = noise_model(raw)
  sigma = np.sqrt(a * np.clip(den, 0, None) + b)
  r = (raw - den) / sigma
  mean_r, count = _box_mean(r, box)
  z = mean_r * np.sqrt(count)  # unit noise averaged over `count` voxels: std 1/sqrt(count)
  excess, _ = _box_mean(raw - den, box)
  z_map = z.max(0).astype(np.float32)
  # Local maxima above the threshold, strongest first, kept apart by `separation`.
  cand = np.argwhere(z > threshold)
  order = np.argsort(-z[tuple(cand.T)]) if len(cand) else []
  taken: list[np.ndarray] = []
  events = []
  sep = np.array(separation)
  for i in order:
    p = cand[i]
    if any(np.all(np.abs(p - q) < sep) for q in taken):
      continue
    taken.append(p)
    t, y, x = (int(v) for v in p)
    events.append({"t": t, "y": y, "x": x, "z": float(z[t, y, x]),
                   "excess": float(excess[t, y, x])})
    if len(events) >= max_events:
      break
  return EventReport((a, b), z_map, events, threshold, tuple(box))


def check_files(raw: str, denoised: str, output: str, threshold: float = 6.0,
                box: tuple[int, int, int] = (3, 5, 5), overwrite: bool = False
                ) -> EventReport:
  """Run the check on two TIFFs; write z_map.tif, events.csv and events.json to `output`."""
  paths = [os.path.join(output, n) for n in ("z_map.tif", "events.csv", "events.json")]
  refuse_to_overwrite(paths, overwrite)
  r, d = open_movie(raw), open_movie(denoised)
  report = find_suppressed_events(r.read(0, r.shape[0]), d.read(0, d.shape[0]), threshold,
                                  box)
  try:
    os.makedirs(output, exist_ok=True)
  except OSError as e:
    raise os_error(e, paths[0]) from None
  with outputs_together() as files:  # the three appear together, once complete
    files.append(MovieWriter(paths[0], report.z_map.shape, np.float32, frames=1,
                             metadata=r.metadata, overwrite=overwrite))
    files[-1].write(report.z_map)
    files.append(AtomicFile(paths[1], overwrite=overwrite))
    w = csv.DictWriter(files[-1].text(newline=""), fieldnames=["t", "y", "x", "z",
                                                                "excess"])
    w.writeheader()
    w.writerows(report.events)
    files.append(AtomicFile(paths[2], overwrite=overwrite))
    json.dump({"raw": raw, "denoised": denoised, "noise_a": report.noise[0],
               "noise_b": report.noise[1], "threshold": threshold, "box": list(box),
               "events": report.events}, files[-1].text(), indent=1)
  return report
