"""Where did denoising remove more than noise? A check for suppressed rare events.

Networks trained to predict one noisy frame from its neighbours tend to treat rare,
brief transients as noise. This check compares the denoised movie with the raw one under
a Poisson-Gaussian noise model estimated from the raw data alone (var = a * mean + b,
`analysis.noise`), so the residual raw - denoised can be judged against the noise.
Over small space-time boxes of n voxels, the summed excess E has variance V: the
model's variances summed, times the box factor of the noise's correlation between
neighbouring pixels (real recordings have it; without it, a real field would light up
with events everywhere); boxes whose standardised excess
z = E / sqrt(V + a E / 3) exceeds a threshold (default 6) are where the raw data hold
signal that the denoised movie lacks. The a E / 3 term is Bernstein's inequality for
counts of photons of size a: P(z > 6) < exp(-18) = 1.5e-8 per box whatever the photon
level, where the Gaussian z alone would flag a few stray photons in a dark movie as
events. The result is a map (the largest z per pixel) and a list of candidate events
(local maxima of z).

The noise model keeps a floor: the variance is at least the smallest measured at any
brightness (the darkest pixels' read and shot noise), so a fit that runs to zero at
low intensities cannot make single photons look significant; a movie with no
frame-to-frame variation at all has no noise model and is refused. Both movies are read
block by block (with a few frames of overlap for the boxes), so memory stays bounded
whatever the length.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Any

import numpy as np

from deepcad_jax.analysis import noise as noise_lib
from deepcad_jax.data.movie import Movie, as_movie, open_movie, refuse_to_overwrite
from deepcad_jax.data.writers import MovieWriter
from deepcad_jax.runtime.files import AtomicFile, os_error, outputs_together
from deepcad_jax.errors import UserError, check_number

BLOCK_BYTES = 32 * 2**20  # float64 bytes of one block of frames
MAX_CANDIDATES = 200_000  # boxes above the threshold kept for the event list


def _read(movie: Movie, t0: int, t1: int, what: str) -> np.ndarray:
  """Frames [t0, t1) as float64, checked for NaN or infinite values."""
  block = movie.read(t0, t1).astype(np.float64)
  if not np.isfinite(block).all():
    raise UserError(f"the {what} movie {movie.name} holds NaN or infinite values "
                    f"(frames {t0} to {t1 - 1}); replace them (e.g. with 0) first.")
  return block


def _block_frames(shape, halo: int = 0) -> int:
  return max(1 + 2 * halo, BLOCK_BYTES // max(1, 8 * shape[1] * shape[2]))


def noise_model(raw, bins: int = noise_lib.BINS) -> tuple[float, float]:
  """(a, b) of var = a * mean + b of the raw movie (an array or a Movie), from
  `analysis.noise`, the one owner of the fit."""
  nm = noise_lib.fit(noise_lib.pixel_statistics(raw, name="the raw movie"), bins=bins)
  return nm.a, nm.b


def _box_sum(x: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
  """The sum over a centred box at every voxel (the box shrinks at the edges)."""
  out = x.astype(np.float64)
  for axis, k in enumerate(size):
    if k > 1:
      n = out.shape[axis]
      lo = np.clip(np.arange(n) - k // 2, 0, n)
      hi = np.clip(np.arange(n) + k - k // 2, 0, n)
      c = np.cumsum(out, axis=axis)
      c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
      out = np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis)
  return out


@dataclasses.dataclass
class EventReport:
  noise: tuple[float, float]        # (a, b) of var = a * mean + b
  z_map: np.ndarray                 # (Y, X): the largest box z over time
  events: list[dict[str, Any]]      # t, y, x, z, excess (raw - denoised, box mean)
  threshold: float
  box: tuple[int, int, int]
  noise_floor: float = 0.0          # the variance is at least this
  output: str | None = None         # the folder of z_map.tif, events.csv, events.json

  def describe(self, shown: int = 10) -> str:
    """The report's lines for the command line (the first `shown` events)."""
    lines = [f"noise model: var = {self.noise[0]:.4g} * mean + {self.noise[1]:.4g}, at "
             f"least {self.noise_floor:.4g} (the darkest pixels' noise)",
             f"{len(self.events)} candidate event(s) where the raw movie exceeds the "
             f"denoised one beyond the noise (z > {self.threshold:g} over {self.box} "
             f"boxes); largest z {float(self.z_map.max()):.1f}"]
    lines += [f"  t={e['t']} y={e['y']} x={e['x']}  z={e['z']:.1f}  excess "
              f"{e['excess']:.3g}" for e in self.events[:shown]]
    if self.output:
      lines.append(f"map and list: {self.output}/z_map.tif, events.csv, events.json")
    return "\n".join(lines)


def box_z(raw: np.ndarray, den: np.ndarray, noise: tuple[float, float, float],
          box: tuple[int, int, int], correlation: float = 1.0
          ) -> tuple[np.ndarray, np.ndarray]:
  """(z, excess) of every box of a block of frames: the summed residual E against its
  variance V with Bernstein's correction, z = E / sqrt(V + a max(E, 0) / 3), and the
  box mean of raw - den."""
  a, b, floor = noise
  var = np.maximum(a * np.clip(den, 0, None) + b, floor)
  e = _box_sum(raw - den, box)
  v = _box_sum(var, box) * correlation
  count = _box_sum(np.ones(raw.shape, np.float32), box)
  return e / np.sqrt(v + a * np.maximum(e, 0) / 3), e / count


def _pick(cand: np.ndarray, z: np.ndarray, excess: np.ndarray,
          separation: tuple[int, int, int], max_events: int) -> list[dict[str, Any]]:
  """Local maxima: the strongest candidates first, kept apart by `separation`."""
  order = np.argsort(-z, kind="stable")
  taken: list[np.ndarray] = []
  events = []
  sep = np.array(separation)
  for i in order:
    p = cand[i]
    if any(np.all(np.abs(p - q) < sep) for q in taken):
      continue
    taken.append(p)
    t, y, x = (int(v) for v in p)
    events.append({"t": t, "y": y, "x": x, "z": float(z[i]), "excess": float(excess[i])})
    if len(events) >= max_events:
      break
  return events


def find_suppressed_events(raw, denoised, threshold: float = 6.0,
                           box: tuple[int, int, int] = (3, 5, 5),
                           separation: tuple[int, int, int] = (5, 8, 8),
                           max_events: int = 1000,
                           noise: noise_lib.NoiseModel | None = None) -> EventReport:
  """Candidate events where `raw` exceeds `denoised` beyond what the noise explains.

  Args:
    raw, denoised: movies (arrays, `Movie`s or TIFF paths) of the same shape.
    threshold: the z above which a box is a candidate.
    box: the box (T, Y, X) summed over.
    separation: candidates closer than this (on every axis) to a stronger one are
      the same event.
    max_events: the most events listed.
    noise: the noise model of the raw movie's noise (default: fitted on `raw`); give it
      when `raw` is not a raw recording, e.g. a denoised movie checked against a known
      truth (`analysis.audit`).
  """
  check_number("--threshold", threshold, above=0)
  if len(box) != 3:
    raise UserError(f"--box takes three sizes T,Y,X (e.g. 3,5,5); got {tuple(box)}.")
  for axis, size in zip("TYX", box):
    check_number(f"--box ({axis})", size, at_least=1, whole=True)
  raw_m, den_m = as_movie(raw, "the raw movie"), as_movie(denoised, "the denoised movie")
  if raw_m.shape != den_m.shape:
    raise UserError(f"raw {raw_m.name} {raw_m.shape} and denoised {den_m.name} "
                    f"{den_m.shape} differ in shape; give the denoised version of this raw "
                    "movie.")
  nm = noise if noise is not None else noise_lib.fit(
      noise_lib.pixel_statistics(raw_m, name=raw_m.name, what="the raw movie"),
      name=raw_m.name)
  a, b, floor = nm.a, nm.b, nm.floor
  correlation = nm.box_factor(tuple(box))  # correlated neighbours sum to more
  t_all = raw_m.shape[0]
  halo = max(box[0], 1)
  step = _block_frames(raw_m.shape, halo) - 2 * halo
  z_map = np.full(raw_m.shape[1:], -np.inf)
  found = {"cand": [], "z": [], "excess": []}
  for c0 in range(0, t_all, step):
    c1 = min(t_all, c0 + step)
    e0, e1 = max(0, c0 - halo), min(t_all, c1 + halo)
    z, excess = box_z(_read(raw_m, e0, e1, "raw"), _read(den_m, e0, e1, "denoised"),
                      (a, b, floor), box, correlation)
    z, excess = z[c0 - e0:c1 - e0], excess[c0 - e0:c1 - e0]
    z_map = np.maximum(z_map, z.max(0))
    cand = np.argwhere(z > threshold)
    if len(cand):
      found["z"].append(z[tuple(cand.T)])
      found["excess"].append(excess[tuple(cand.T)])
      found["cand"].append(cand + np.array([c0, 0, 0]))
    if sum(len(v) for v in found["z"]) > MAX_CANDIDATES:  # keep the strongest
      zs = np.concatenate(found["z"])
      keep = np.argsort(-zs, kind="stable")[:MAX_CANDIDATES]
      found = {k: [np.concatenate(v)[keep]] for k, v in found.items()}
  events = []
  if found["z"]:
    events = _pick(np.concatenate(found["cand"]), np.concatenate(found["z"]),
                   np.concatenate(found["excess"]), separation, max_events)
  return EventReport((a, b), z_map.astype(np.float32), events, threshold, tuple(box),
                     floor)


def check_files(raw: str, denoised: str, output: str, threshold: float = 6.0,
                box: tuple[int, int, int] = (3, 5, 5), overwrite: bool = False
                ) -> EventReport:
  """Run the check on two TIFFs (read block by block); write z_map.tif, events.csv and
  events.json to `output`, together once complete.

  Args:
    raw, denoised: the raw movie and its denoised version (paths of the same shape).
    output: the folder written (made if missing).
    threshold: the z above which a box is a candidate.
    box: the box (T, Y, X) summed over.
    overwrite: replace existing outputs.

  Returns:
    The `find_suppressed_events` report, with `output` set.
  """
  paths = [os.path.join(output, n) for n in ("z_map.tif", "events.csv", "events.json")]
  refuse_to_overwrite(paths, overwrite)
  r = open_movie(raw)
  report = find_suppressed_events(r, open_movie(denoised), threshold, box)
  try:
    os.makedirs(output, exist_ok=True)
  except OSError as e:
    raise os_error(e, paths[0]) from None
  with outputs_together() as files:
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
               "noise_b": report.noise[1], "noise_floor": report.noise_floor,
               "threshold": threshold, "box": list(box), "events": report.events},
              files[-1].text(), indent=1)
  return dataclasses.replace(report, output=output)
