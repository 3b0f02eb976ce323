"""Measure what docs/trust.md "Did the network remove real events?" reports.

On simulated movies (300x64x64 at -2 dB by default) it plants brief transients in the
raw movie (3 frames of 6x6 pixels, Poisson counts at --amplitude times the movie's
mean photon level), denoises the raw movie with a trained model (e.g. the demo's), and runs the
event check: which planted events are found, with their z, and what else is listed;
then the same on noise alone (the raw movie without transients), and on a dark, sparse
movie (about 0.02 photons per voxel, no read noise) against its ground truth, where
every excess is noise.

  deepcad-jax demo --workdir /tmp/demo
  python benchmarks/events_check.py --model /tmp/demo/model --amplitude 2 \
      --output benchmarks/results/events_cpu_a2.json
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import numpy as np

from deepcad_jax import denoise, load_model
from deepcad_jax.analysis.events import find_suppressed_events
from deepcad_jax.analysis.simulate import simulate


def _plant(noisy: np.ndarray, clean: np.ndarray, n: int, seed: int, amplitude: float
           ) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
  rng = np.random.default_rng(1000 + seed)
  t, y, x = noisy.shape
  raw, places = noisy.copy(), []
  while len(places) < n:
    p = (int(rng.integers(10, t - 10)), int(rng.integers(8, y - 8)),
         int(rng.integers(8, x - 8)))
    if any(abs(p[0] - q[0]) < 20 and abs(p[1] - q[1]) < 12 and abs(p[2] - q[2]) < 12
           for q in places):
      continue
    places.append(p)
    raw[p[0] - 1:p[0] + 2, p[1] - 3:p[1] + 3, p[2] - 3:p[2] + 3] += rng.poisson(
        amplitude * clean.mean(), (3, 6, 6)).astype(np.float32)
  return raw, places


def _summary(report) -> dict:
  return {"noise_a": report.noise[0], "noise_b": report.noise[1],
          "noise_floor": report.noise_floor, "events": len(report.events),
          "largest_z": float(report.z_map.max())}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", required=True, help="a trained model directory")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--shape", default="300,64,64")
  ap.add_argument("--snr", type=float, default=-2.0)
  ap.add_argument("--events", type=int, default=5)
  ap.add_argument("--amplitude", type=float, default=2.0,
                  help="planted photons per voxel, in units of the movie's mean")
  ap.add_argument("--output", default=None, help="JSON file for the results")
  args = ap.parse_args()
  shape = tuple(int(v) for v in args.shape.split(","))
  model = load_model(args.model)
  records = []
  for seed in (int(s) for s in args.seeds.split(",")):
    noisy, clean, _ = simulate(shape=shape, snr_db=args.snr, seed=seed)
    raw, places = _plant(noisy, clean, args.events, seed, args.amplitude)
    with_events = find_suppressed_events(raw, denoise(raw, model, output_dtype="float32"))
    found = [(e["t"], e["y"], e["x"], e["z"]) for e in with_events.events]
    hits = [min((f for f in found if max(abs(f[0] - p[0]), abs(f[1] - p[1]),
                                         abs(f[2] - p[2])) <= 2),
                key=lambda f: -f[3], default=None) for p in places]
    alone = find_suppressed_events(noisy, denoise(noisy, model, output_dtype="float32"))
    dark_noisy, dark_clean, info = simulate(shape=shape, snr_db=-15, read_noise=0.0,
                                            seed=seed)
    dark = find_suppressed_events(dark_noisy, dark_clean)
    record = {"seed": seed, "planted": places,
              "found_planted": sum(h is not None for h in hits),
              "z_of_planted": [None if h is None else round(h[3], 2) for h in hits],
              "other_events": len(found) - sum(h is not None for h in hits),
              "with_events": _summary(with_events), "noise_alone": _summary(alone),
              "dark_sparse": {**_summary(dark), "photons_per_voxel": info["mean_photons"]}}
    records.append(record)
    print(json.dumps(record))
  result = {"model": args.model, "shape": shape, "snr_db": args.snr,
            "amplitude": args.amplitude,
            "device": jax.devices()[0].device_kind, "machine": platform.processor() or
            platform.machine(), "jax": jax.__version__, "records": records}
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
