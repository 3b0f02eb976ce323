"""Does the ground-truth-free quality score tell the truth, and is the brightness kept?

Two tables on simulated movies (`deepcad_jax.analysis.simulate`), each model trained with the
documented CPU recipe (`--config demo --holdout 0.2`):

1. score: at -5, -2 and +3 dB input SNR, with white and spatially correlated noise
   (x-neighbour correlation 0.36, as in real two-photon recordings), the held-out
   estimated MSE (`deepcad-jax score`, which never sees the clean movie) against the true
   MSE of the same predictions against the clean movie; and the same for the baselines.
2. brightness: at 0.1, 1 and 10 photons per voxel, for the default loss (l2) and
   DeepCAD-RT's (deepcad), and for both `--brightness` modes (model: the network's
   output; regional: the per-movie correction, the default), the denoised movie's mean
   over the raw movie's mean, the bias against the truth per 16x16-pixel region
   (time-averaged), in % of the region's clean mean, and the SNR against the truth: the
   bias is measured on the mean of the denoised outputs of several noisy movies of the
   same clean movie (`--redraws`), which averages the noise of each region's mean out.

  python benchmarks/quality.py --output benchmarks/results/quality_cpu --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import tifffile

from deepcad_jax import config as config_lib
from deepcad_jax.analysis import score as score_lib
from deepcad_jax.analysis import simulate
from deepcad_jax.data.movie import ArrayMovie, open_movie
from deepcad_jax.denoising.denoiser import Denoiser, denoise
from deepcad_jax.model_io.loading import load_model
from deepcad_jax.training.loop import train

SCORE_SHAPE = (600, 128, 128)  # 120 held-out frames: the score's noise estimate needs
                               # many voxels where the model's error is 1% of the noise
BRIGHTNESS_SHAPE = (400, 64, 64)
REGION = 16


def _train(noisy: np.ndarray, folder: str, seed: int, loss: str = "l2"):
  path = os.path.join(folder, "noisy.tif")
  tifffile.imwrite(path, noisy)
  cfg = config_lib.override(config_lib.load_config("demo"), **{
      "data.holdout": 0.2, "train.seed": seed, "train.loss": loss})
  result = train(path, os.path.join(folder, "run"), cfg, progress=False)
  if result.interrupted:  # a signal stopped training: no row for a half-trained model
    raise SystemExit(result.exit_code)
  return path, result


def true_mse(den: Denoiser, movie, clean: np.ndarray, frames) -> dict[str, float]:
  """The held-out predictions (model and baselines) against the clean movie."""
  a, b = frames
  seg = movie.read(a, b).astype(np.float64)
  cl = clean[a:b].astype(np.float64)
  norm = den.normalisation(movie)
  even, odd = seg[0::2], seg[1::2]
  n = min(len(even), len(odd))
  pairs = ((even[:n], cl[1::2][:n], True), (odd[:n], cl[0::2][:n], False))
  out = {"model": 0.0, **{k: 0.0 for k in score_lib.BASELINES}}
  for source, truth, later in pairs:
    pred = np.concatenate([f.data for f in den.frames(
        ArrayMovie(source.astype(np.float32)), mean=float(norm.mean),
        scale=float(norm.scale))]).astype(np.float64)
    out["model"] += 0.5 * float(np.mean((pred - truth) ** 2))
    for k, p in score_lib.baseline_predictions(source, later).items():
      out[k] += 0.5 * float(np.mean((p - truth) ** 2))
  return out


def score_table(seeds, folder: str) -> list[dict]:
  rows = []
  for snr in (-5.0, -2.0, 3.0):
    for corr in (0.0, 0.36):
      for seed in seeds:
        noisy, clean, info = simulate.simulate(shape=SCORE_SHAPE, snr_db=snr,
                                               noise_correlation=corr, seed=seed)
        work = tempfile.mkdtemp(dir=folder)
        t0 = time.perf_counter()
        path, result = _train(noisy, work, seed)
        q = result.quality
        den = Denoiser(load_model(os.path.join(work, "run")), tiling="exact")
        truth = true_mse(den, open_movie(path), clean, q.frames)
        row = {"snr_db": snr, "noise_correlation": corr, "seed": seed,
               "photons": info["mean_photons"], "estimated_mse": q.estimated_mse,
               "estimated_mse_ci": list(q.estimated_mse_ci), "true_mse": truth["model"],
               "relative_error": q.estimated_mse / truth["model"] - 1,
               "noise_variance": q.noise_variance,
               "true_noise_variance": float(np.mean((noisy - clean) ** 2)),
               "baselines": {k: {"estimated": v, "true": truth[k]}
                             for k, v in q.baselines.items()},
               "verdict": q.verdict, "seconds": time.perf_counter() - t0}
        print(json.dumps({k: row[k] for k in ("snr_db", "noise_correlation", "seed",
                                               "estimated_mse", "true_mse",
                                               "relative_error", "verdict")}), flush=True)
        rows.append(row)
  return rows


def region_bias(den: np.ndarray, clean: np.ndarray) -> np.ndarray:
  """Per REGION x REGION block: (mean denoised - mean clean) / mean clean."""
  t, y, x = clean.shape
  ny, nx = y // REGION, x // REGION
  crop = (slice(None), slice(0, ny * REGION), slice(0, nx * REGION))

  def blocks(m):
    return m[crop].mean(0).reshape(ny, REGION, nx, REGION).mean((1, 3))
  c = blocks(clean.astype(np.float64))
  return (blocks(den.astype(np.float64)) - c) / c


def redraw(clean: np.ndarray, seed: int, read_noise: float) -> np.ndarray:
  """Another noisy movie of the same clean one (new photon and read noise)."""
  rng = np.random.default_rng(seed)
  noisy = rng.poisson(clean).astype(np.float32)
  return noisy + rng.normal(0, read_noise, size=noisy.shape).astype(np.float32)


def brightness_table(seeds, folder: str, photon_levels, losses, redraws: int) -> list[dict]:
  """Per photon level and loss: the denoised/raw mean ratio, and the bias per region
  against the truth. A region's error on one noisy movie mixes the model's bias with the
  noise of that region's mean; the bias is measured on the mean of the denoised outputs
  of `redraws` more noisy movies of the same clean movie (the same model), which
  averages that noise out. The raw movies' own region error, averaged the same way, is
  reported beside it as the floor the measurement can resolve."""
  rows = []
  read_noise = simulate.SimulationParams().read_noise
  for photons in photon_levels:
    for loss in losses:
      for seed in seeds:
        noisy, clean, _ = simulate.simulate(shape=BRIGHTNESS_SHAPE, photons=photons,
                                            seed=seed)
        work = tempfile.mkdtemp(dir=folder)
        path, result = _train(noisy, work, seed, loss)
        run = os.path.join(work, "run")
        movies = [noisy] + [redraw(clean, 1000 * (seed + 1) + k, read_noise)
                            for k in range(redraws)]
        cm = clean.mean(0, dtype=np.float64)[None]
        raw_mean = np.mean([m.astype(np.float64).mean(0) for m in movies], 0)
        row = {"photons": photons, "loss": loss, "seed": seed, "noisy_movies": len(movies),
               "raw_region_error_median_abs": float(np.median(np.abs(
                   region_bias(raw_mean[None], cm)))),
               "raw_region_error_p95_abs": float(np.percentile(np.abs(
                   region_bias(raw_mean[None], cm)), 95)),
               "verdict": result.quality.verdict}
        for mode in ("model", "regional"):
          outs = [denoise(m, run, output_dtype="float32", brightness=mode) for m in movies]
          bias = region_bias(np.mean([o.astype(np.float64).mean(0) for o in outs], 0)[None],
                             cm)
          one = region_bias(outs[0], clean)
          mse = np.mean([np.mean((o.astype(np.float64) - clean) ** 2) for o in outs])
          row[mode] = {
              "mean_ratio_to_raw": float(outs[0].mean() / noisy.mean()),
              "mean_ratio_to_raw_all": [float(o.mean() / m.mean())
                                        for o, m in zip(outs, movies)],
              "mean_ratio_to_clean": float(outs[0].mean() / clean.mean()),
              "region_error_one_movie_median_abs": float(np.median(np.abs(one))),
              "region_error_one_movie_p95_abs": float(np.percentile(np.abs(one), 95)),
              "region_bias_median_abs": float(np.median(np.abs(bias))),
              "region_bias_p95_abs": float(np.percentile(np.abs(bias), 95)),
              "region_bias_max_abs": float(np.abs(bias).max()),
              "true_mse": float(mse),
              "snr_db": float(10 * np.log10(clean.var() / mse))}
        print(json.dumps(row), flush=True)
        rows.append(row)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True, help="folder for quality.json")
  parser.add_argument("--seeds", default="0", help="comma-separated seeds")
  parser.add_argument("--only", choices=["score", "brightness"], default=None)
  parser.add_argument("--photons", default="0.1,1,10", help="brightness: photons per voxel")
  parser.add_argument("--losses", default="l2,deepcad", help="brightness: losses")
  parser.add_argument("--redraws", type=int, default=3,
                      help="brightness: more noisy movies of the same clean one")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  os.makedirs(args.output, exist_ok=True)
  result = {"machine": platform.platform(), "processor": platform.processor(),
            "score_shape": SCORE_SHAPE, "brightness_shape": BRIGHTNESS_SHAPE, "recipe": "--config demo --holdout 0.2"}
  with tempfile.TemporaryDirectory() as folder:
    if args.only in (None, "score"):
      result["score"] = score_table(seeds, folder)
    if args.only in (None, "brightness"):
      result["brightness"] = brightness_table(
          seeds, folder, [float(p) for p in args.photons.split(",")],
          args.losses.split(","), args.redraws)
  name = "quality.json" if args.only is None else f"quality_{args.only}.json"
  with open(os.path.join(args.output, name), "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
