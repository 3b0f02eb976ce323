"""Measure what docs/trust.md "How much can I trust the result?" reports.

On simulated movies with ground truth (several photon levels; a constant background so
that wobble can be measured), it trains the demo network with and without the
mean-image prior, and a 3-member ensemble, then reports SNR, wobble (temporal std over
pixels whose ground truth is constant) and the coverage of the uncertainty maps; it
also draws the example trace plot. Everything goes through the public API.

  python benchmarks/trust.py --output benchmarks/results/trust_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from deepcad_jax import config as config_lib
from deepcad_jax import denoise, load_model
from deepcad_jax import train
from deepcad_jax.data.movie import write_movie
from deepcad_jax.analysis.metrics import snr_db, uncertainty_calibration, wobble
from deepcad_jax.analysis.simulate import simulate
from deepcad_jax.analysis.rois import rois_from_json
from deepcad_jax.analysis.traces import extract, plot, write_csv


def _train(noisy_path: str, workdir: str, **changes) -> tuple[str, float]:
  cfg = config_lib.override(config_lib.load_config("demo"), **changes)
  t0 = time.perf_counter()
  train(noisy_path, workdir, cfg, progress=False)
  return workdir, time.perf_counter() - t0


def _scores(noisy, clean, model_dir: str, k: int = 8) -> dict:
  t0 = time.perf_counter()
  mean, std = denoise(noisy, model_dir, output_dtype="float32", symmetries=k)
  seconds = time.perf_counter() - t0
  plain = denoise(noisy, model_dir, output_dtype="float32")
  cal = uncertainty_calibration(mean, std, clean)
  return {"snr_db": snr_db(plain, clean), "snr_db_tta_mean": snr_db(mean, clean),
          **{f"{k_}": v for k_, v in wobble(plain, clean).items()},
          "wobble_tta_mean": wobble(mean, clean)["wobble"],
          "coverage_1std": cal["coverage_1std"], "coverage_2std": cal["coverage_2std"],
          "corr_std_error": cal["corr_std_error"], "std_scale": cal["std_scale"],
          "uncertainty_seconds": seconds, "samples": k * load_model(
              model_dir).config.model.ensemble}


def active_rois(clean: np.ndarray, n: int = 4, half: int = 2) -> list[dict]:
  """Square ROIs on the n most active, well separated spots of the ground truth."""
  activity = clean.std(0)
  rois, taken = [], np.zeros(activity.shape, bool)
  for flat in np.argsort(activity, axis=None)[::-1]:
    y, x = np.unravel_index(flat, activity.shape)
    if taken[y, x] or not (half <= y < activity.shape[0] - half and
                           half <= x < activity.shape[1] - half):
      continue
    rois.append({"name": f"cell{len(rois) + 1}", "polygon": [
        [y - half - 0.5, x - half - 0.5], [y - half - 0.5, x + half + 0.5],
        [y + half + 0.5, x + half + 0.5], [y + half + 0.5, x - half - 0.5]]})
    taken[max(0, y - 4 * half):y + 4 * half + 1, max(0, x - 4 * half):x + 4 * half + 1] = True
    if len(rois) == n:
      break
  return rois


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--output", default="benchmarks/results/trust_cpu")
  ap.add_argument("--snrs", default="-5,-2,3")
  ap.add_argument("--shape", default="300,64,64")
  ap.add_argument("--members", type=int, default=3)
  ap.add_argument("--workdir", default="/tmp/deepcad-jax-trust")
  ap.add_argument("--neuropil-coupling", type=float, default=0.0,
                  help="0: constant background (wobble measurable); 0.5: simulate's default")
  args = ap.parse_args()
  shape = tuple(int(v) for v in args.shape.split(","))
  os.makedirs(args.output, exist_ok=True)
  os.makedirs(args.workdir, exist_ok=True)
  record = {"device": jax.devices()[0].device_kind, "platform": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "shape": shape, "config": "demo (f=8, 400 steps, lr 1e-3)",
            "neuropil_coupling": args.neuropil_coupling, "runs": []}
  for snr in (float(s) for s in args.snrs.split(",")):
    noisy, clean, info = simulate(shape=shape, snr_db=snr, seed=1,
                                  neuropil_coupling=args.neuropil_coupling)
    base = os.path.join(args.workdir, f"snr{snr:+g}")
    os.makedirs(base, exist_ok=True)
    noisy_path = os.path.join(base, "noisy.tif")
    write_movie(noisy_path, noisy)
    row = {"snr_target_db": snr, "snr_in_db": info["snr_db"], "raw_wobble": wobble(noisy, clean)["wobble"],
           "mean_photons": info["mean_photons"]}
    variants = [("plain", {}), ("mean_prior", {"model.mean_prior": True})]
    if snr == -2.0 and args.members > 1:
      variants.append((f"ensemble{args.members}", {"model.ensemble": args.members}))
    for name, changes in variants:
      run, seconds = _train(noisy_path, os.path.join(base, name), **changes)
      row[name] = {"train_seconds": seconds, **_scores(noisy, clean, run)}
      print(f"SNR {snr:+g} dB {name}: {json.dumps(row[name])}", flush=True)
    record["runs"].append(row)
    if snr == -2.0:  # the example trace plot
      model = os.path.join(base, "plain")
      mean, _, samples = denoise(noisy, model, output_dtype="float32", symmetries=8,
                                 save_samples=True)
      rois = rois_from_json(active_rois(clean), shape[1:])
      traces = extract(mean, rois, list(samples), raw=noisy, f0="percentile:8")
      plot(traces, os.path.join(args.output, "traces_example.png"), frame_rate=30.0)
      write_csv(traces, os.path.join(args.output, "traces_example.csv"))
      truth = extract(clean, rois, f0="percentile:8")
      lo, hi = traces.f_band
      record["traces_example"] = {
          **traces.summary(),
          "truth_inside_f_band": float(np.mean((truth.denoised >= lo) &
                                               (truth.denoised <= hi)))}
  with open(os.path.join(args.output, "trust.json"), "w") as f:
    json.dump(record, f, indent=1)
  print(json.dumps(record, indent=1))


if __name__ == "__main__":
  main()
