"""Measure the seams of DeepCAD-RT's overlap scheme against exact (seamless) tiling.

On a simulated movie with ground truth it trains a network (the `demo` config by
default, or --features 16 for DeepCAD-RT's width), denoises the movie with exact tiling
(one forward pass over the whole padded movie, in tiles) and with the overlap scheme at
several patch sizes, and reports for each: how far the overlap output is from the exact
one (relative RMS, largest deviation and where it is: its distance to the nearest
kept-region border on each axis), the mean deviation as a function of the distance to
that border, the time, the recompute factor, and the SNR of each against the ground
truth. Also the stream's lower-latency option (shorter lookahead) against exact.
Everything goes through the public API.

  python benchmarks/seams.py --output benchmarks/results/seams_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from deepcad_jax import Denoiser, config as config_lib, denoise, load_model

from deepcad_jax import train
from deepcad_jax.data.movie import write_movie
from deepcad_jax.analysis.metrics import snr_db
from deepcad_jax.analysis.simulate import simulate
from deepcad_jax.stream import StreamDenoiser


def border_distance(plan, shape) -> np.ndarray:
  """(T, Y, X) distance of every voxel to the nearest interior kept-region border of
  `plan` (the minimum over the three axes; borders at the movie's ends do not count)."""
  dists = []
  for axis, n in enumerate(shape):
    borders = sorted({t.keep_lo for t in plan.axes[axis]} - {0})
    pos = np.arange(n)[:, None] + 0.5
    d = np.min(np.abs(pos - np.array(borders)[None]), axis=1) - 0.5 if borders else \
        np.full(n, np.inf)
    dists.append(d)
  t, y, x = np.meshgrid(*dists, indexing="ij")
  return np.minimum(np.minimum(t, y), x)


def compare(got: np.ndarray, exact: np.ndarray, plan) -> dict:
  diff = np.abs(got - exact)
  signal = float(np.std(exact))
  where = np.unravel_index(int(np.argmax(diff)), diff.shape)
  borders = [sorted({t.keep_lo for t in plan.axes[a]} - {0}) for a in range(3)]
  nearest = [int(min((abs(w - b) for b in bs), default=-1)) for w, bs in zip(where, borders)]
  dist = border_distance(plan, got.shape)
  profile = {}
  for d in (0, 1, 2, 4, 8, 16, 32):
    sel = (dist >= d) & (dist < max(d + 1, 2 * d))
    if sel.any():
      profile[f"{d}-{max(d, 2 * d - 1)}"] = float(diff[sel].mean())
  return {"relative_rms": float(np.sqrt(np.mean(diff ** 2)) / signal),
          "max_abs": float(diff.max()), "max_abs_relative_to_signal_std":
          float(diff.max() / signal), "max_at": [int(w) for w in where],
          "max_distance_to_border_per_axis": nearest,
          "mean_abs_by_distance_to_border": profile}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--output", required=True)
  ap.add_argument("--shape", default="256,128,128")
  ap.add_argument("--features", type=int, default=8)
  ap.add_argument("--steps-epochs", type=int, default=4)
  ap.add_argument("--patches", default="16x32x32,32x64x64,64x64x64")
  ap.add_argument("--snr", type=float, default=-2.0)
  args = ap.parse_args()
  os.makedirs(args.output, exist_ok=True)
  shape = tuple(int(v) for v in args.shape.split(","))
  noisy, clean, info = simulate(shape=shape, snr_db=args.snr, seed=0)
  noisy_path = os.path.join(args.output, "noisy.tif")
  write_movie(noisy_path, noisy.astype(np.float32))
  cfg = config_lib.override(config_lib.load_config("demo"), **{
      "model.features": args.features, "train.epochs": args.steps_epochs})
  t0 = time.perf_counter()
  train(noisy_path, os.path.join(args.output, "model"), cfg, progress=False)
  train_s = time.perf_counter() - t0
  os.remove(noisy_path)
  model = load_model(os.path.join(args.output, "model"))
  results = {"shape": list(shape), "features": args.features, "train_s": train_s,
             "input_snr_db": snr_db(noisy, clean), "machine": platform.processor() or
             platform.machine(), "cpu_count": os.cpu_count(), "device":
             jax.devices()[0].device_kind, "jax": jax.__version__, "runs": {}}

  def run(name, den):
    denoise(noisy[:16], den, output_dtype="float32")  # compile outside the timing
    t = time.perf_counter()
    out = denoise(noisy, den, output_dtype="float32")
    seconds = time.perf_counter() - t
    plan = den.plan(shape, noisy.dtype, np.float32)
    return out, plan, {"tiling": plan.describe(), "recompute": plan.recompute,
                       "seconds": seconds, "snr_db": snr_db(out, clean)}

  exact, exact_plan, rec = run("exact", Denoiser(model, tiling="exact"))
  results["runs"]["exact"] = rec
  print(f"exact: {rec}", flush=True)
  for text in args.patches.split(","):
    patch = tuple(int(v) for v in text.split("x"))
    out, plan, rec = run(text, Denoiser(model, patch=patch, overlap=0.4, tiling="overlap"))
    rec.update(compare(out, exact, plan))
    results["runs"][f"overlap {text}"] = rec
    print(f"overlap {text}: {rec}", flush=True)
  mean = float(noisy.mean())
  den = Denoiser(model, tiling="exact")
  for lookahead in (0, 16, 32, 48):
    s = StreamDenoiser(den, mean=mean, lookahead=lookahead)
    for t in range(0, shape[0], 16):
      s.push(noisy[t:t + 16])
    s.close()
    out = s.pull()
    diff = out - exact  # the same mean: the movie's
    rec = {"tiling": s.describe(), "wait_frames": list(s.latency_frames()),
           "relative_rms": float(np.sqrt(np.mean(diff ** 2)) / np.std(exact)),
           "max_abs": float(np.abs(diff).max()), "snr_db": snr_db(out, clean)}
    results["runs"][f"stream lookahead {lookahead}"] = rec
    print(f"stream lookahead {lookahead}: {rec}", flush=True)
  with open(os.path.join(args.output, "seams.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(f"results: {os.path.join(args.output, 'seams.json')}")


if __name__ == "__main__":
  main()
