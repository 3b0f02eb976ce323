"""The documented CPU recipe on real recordings: does it train without collapse, beat the
baselines on the ground-truth-free score, and keep the brightness?

For each recording and seed: `train --config demo --holdout 0.2 --seed S`, then
`denoise` of the whole recording (as the command does: the default regional brightness
correction, whose cross-validated choice is recorded), and a row with the held-out estimated MSE (with its
95% interval), the baselines and the gain over the best, the verdict, the brightness
ratio (denoised mean / raw mean), the output's temporal std against the raw one's and
the noise std, and the time. The recordings are not part of the repository (their
licences do not all allow it): `benchmarks/real_data/SOURCES.md` says where each comes
from and how to make the file used here.

  python benchmarks/real_data.py --recording allen=movie_100x100x100.h5 \
      --recording thunder=thunder_mouse.tif --seeds 0,1,2 --output benchmarks/results/real
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from deepcad_jax import config as config_lib
from deepcad_jax.data.movie import open_movie
from deepcad_jax.denoising.files import denoise_files
from deepcad_jax.training.loop import train

RECIPE = {"config": "demo", "data.holdout": 0.2}


def temporal_std(movie: np.ndarray) -> float:
  """RMS over pixels of each pixel's temporal standard deviation."""
  return float(np.sqrt(np.mean(movie.astype(np.float64).var(0))))


def run_one(name: str, path: str, seed: int, folder: str) -> dict:
  cfg = config_lib.override(config_lib.load_config(RECIPE["config"]), **{
      "data.holdout": RECIPE["data.holdout"], "train.seed": seed})
  work = os.path.join(folder, f"{name}_seed{seed}")
  t0 = time.perf_counter()
  result = train(path, work, cfg, progress=False)
  if result.interrupted:  # a signal stopped training: no row for a half-trained model
    raise SystemExit(result.exit_code)
  train_s = time.perf_counter() - t0
  raw = open_movie(path)
  frames = raw.read(0, raw.shape[0]).astype(np.float64)
  t1 = time.perf_counter()
  dst = os.path.join(folder, f"{name}_seed{seed}_denoised.tif")
  report, = denoise_files(path, dst, work, progress=False)  # as `deepcad-jax denoise`
  out = open_movie(dst).read(0, raw.shape[0]).astype(np.float64)
  q = result.quality
  best, best_mse = q.best_baseline
  return {"recording": name, "path": path, "shape": list(raw.shape),
          "dtype": str(raw.dtype), "seed": seed, "verdict": q.verdict,
          "estimated_mse": q.estimated_mse, "estimated_mse_ci": list(q.estimated_mse_ci),
          "heldout_mse": q.heldout_mse, "noise_variance": q.noise_variance,
          "baselines": q.baselines, "best_baseline": best, "gain_db": q.gain_db,
          "brightness_ratio": float(out.mean() / frames.mean()),
          "brightness_correction": report.brightness,
          "output_temporal_std": temporal_std(out), "raw_temporal_std": temporal_std(frames),
          "noise_std": float(np.sqrt(max(q.noise_variance, 0.0))),
          "noise_model": None if q.noise is None else q.noise.to_json(),
          "train_seconds": train_s, "denoise_seconds": time.perf_counter() - t1}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--recording", action="append", required=True,
                      help="NAME=PATH (any format deepcad-jax reads); repeat")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--output", required=True, help="folder for real_data.json")
  args = parser.parse_args()
  recordings = [r.split("=", 1) for r in args.recording]
  seeds = [int(s) for s in args.seeds.split(",")]
  os.makedirs(args.output, exist_ok=True)
  rows = []
  result = {"machine": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "recipe": "train --config demo --holdout 0.2",
            "rows": rows}
  with tempfile.TemporaryDirectory() as folder:
    for name, path in recordings:
      for seed in seeds:
        row = run_one(name, path, seed, folder)
        rows.append(row)
        print(f"{name} seed {seed}: {row['verdict']}; estimated MSE "
              f"{row['estimated_mse']:.4g} vs {row['best_baseline']} "
              f"{row['baselines'][row['best_baseline']]:.4g} ({row['gain_db']:+.2f} dB); "
              f"brightness {row['brightness_ratio']:.4f} "
              f"({(row['brightness_correction'] or {}).get('choice')}); temporal std "
              f"{row['output_temporal_std']:.4g} (raw {row['raw_temporal_std']:.4g}, noise "
              f"{row['noise_std']:.4g}); {row['train_seconds']:.0f} s", flush=True)
        with open(os.path.join(args.output, "real_data.json"), "w") as f:
          json.dump(result, f, indent=1)  # after every row: a long run keeps its rows


if __name__ == "__main__":
  main()
