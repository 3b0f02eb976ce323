"""Coverage of the calibrated uncertainty (docs/trust.md), scored against ground truth.

On movies made by `simulate` at several SNRs, with white noise and a constant background
("white") and with noise correlated between x-neighbours and a neuropil that follows the
population ("correlated"), it trains the demo network (CPU, short), runs the calibrated
uncertainty (which uses no ground truth: `analysis.uncertainty`; also with its bias split
off, `bias_probes=0`, as `without_bias_split`) and measures where the
truth lies: within 1 and 2 std of the denoised movie, per scaling of the bootstrap
(none, the held-out check's one scale, its per-activity-bin scales, each applied to the
deviations' box-mean part as `calibrated_uncertainty` does), against the symmetry spread
(K = 8); and for 8 ROIs on the most active cells, the fraction of frames whose true
trace lies inside the 90% band of `traces` (Student-t from the calibrated samples),
beside the share of ROIs in 85-95% that an exactly calibrated band would get with the
ROIs' own lasting errors (`exact_band_share`).

  python benchmarks/coverage.py --output benchmarks/results/coverage_cpu_2026-12-06
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from deepcad_jax import calibrated_uncertainty, config as config_lib, denoise, train
from deepcad_jax.analysis.uncertainty.bootstrap import smooth3
from deepcad_jax.analysis.uncertainty.heldout import (activity, bin_scales, box_mean, pair_probe,
                                                      scale_deviation)
from deepcad_jax.analysis.simulate import simulate
from deepcad_jax.analysis.rois import rois_from_json
from deepcad_jax.analysis.traces import extract, student_t_quantile
from deepcad_jax.data.movie import write_movie

from trust import active_rois  # benchmarks/trust.py: square ROIs on active cells

CASES = {"white": {"noise_correlation": 0.0, "neuropil_coupling": 0.0},
         "correlated": {"noise_correlation": 0.36, "neuropil_coupling": 0.5}}


def coverage(est: np.ndarray, std: np.ndarray, clean: np.ndarray) -> dict:
  err = np.abs(est.astype(np.float64) - clean)
  return {"within_1std": float(np.mean(err <= std)),
          "within_2std": float(np.mean(err <= 2 * std)),
          "rms_error": float(np.sqrt(np.mean(err ** 2))),
          "rms_std": float(np.sqrt(np.mean(std.astype(np.float64) ** 2)))}


def check_truth(est: np.ndarray, clean: np.ndarray, rec: dict) -> list[dict]:
  """The held-out check's rows beside the truth they estimate: the estimate's true
  box-mean error variance at the held-out frames, per activity bin and over all."""
  box = rec["check_box"]
  held = pair_probe(est, rec["heldout_every"])[1]
  frames = np.r_[held, held + 1]
  err2 = box_mean(est[frames].astype(np.float64) - clean[frames], box) ** 2
  level = activity(est, box)
  out = []
  for r in rec["check"] + [rec["verdict"]]:
    m = ((level >= r["activity_lo"]) & (level <= r["activity_hi"]) if "activity_lo" in r
         else np.ones(level.shape, bool))
    out.append({k: r.get(k) for k in ("activity_lo", "activity_hi", "heldout_error_var",
                                       "standard_error", "bootstrap_var", "scale")}
               | {"true_error_var": float(err2[:, m].mean())})
  return out


def score(u, est: np.ndarray, clean: np.ndarray, roi_list: list) -> dict:
  """Coverage per scaling of the check (none, its one scale, its bins) of the per-voxel
  std and of the ROI bands from the calibrated samples."""
  rec = u.record
  box = rec["check_box"]
  levels = {"none": np.ones(est.shape[1:], np.float32),
            "heldout": np.full(est.shape[1:], rec["heldout_scale"], np.float32),
            "bins": bin_scales(est, rec["check"], box)}
  devs = {k: np.stack([scale_deviation(s - est, v, box) for s in u.samples])
          for k, v in levels.items()}
  out = {"coverage": {k: coverage(est, np.sqrt(smooth3(np.mean(d.astype(np.float64) ** 2,
                                                               0))), clean)
                      for k, d in devs.items()}, "rois": {}}
  truth = extract(clean, roi_list)
  err = extract(est, roi_list).denoised - truth.denoised
  lag1 = [float(np.corrcoef(e[1:], e[:-1])[0, 1]) for e in err.T]
  for k, dev in devs.items():
    tr = extract(est, roi_list, list(est[None] + dev), band=(5, 95), band_shape="auto")
    lo, hi = tr.f_band
    inside = np.mean((truth.denoised >= lo) & (truth.denoised <= hi), axis=0)
    out["rois"][k] = {"inside_90_band": [float(v) for v in inside],
                      "rois_85_to_95": int(np.sum((inside >= 0.85) & (inside <= 0.95))),
                      "median_inside": float(np.median(inside)),
                      "mean_inside": float(np.mean(inside)),
                      "error_lag1": lag1,
                      "expected_85_to_95_if_exact": float(np.mean(
                          [exact_band_share(r, len(est), len(dev)) for r in lag1]))}
  return out


def exact_band_share(lag1: float, frames: int, samples: int, runs: int = 2000,
                     seed: int = 0) -> float:
  """The chance that an exactly calibrated band holds the truth in 85-95% of `frames`,
  for an ROI whose error lasts (an AR(1) series with this lag-1 correlation), the band
  being Student-t from `samples` sample movies whose deviations last alike: the share of
  ROIs in 85-95% that a perfect method would get, since lasting errors make the share of
  frames inside a band vary from ROI to ROI."""
  rng = np.random.default_rng(seed)
  rho = float(np.clip(lag1, 0.0, 0.999))

  def series(shape):
    z = rng.standard_normal(shape)
    out = np.empty(shape)
    out[..., 0] = z[..., 0]
    for t in range(1, shape[-1]):
      out[..., t] = rho * out[..., t - 1] + np.sqrt(1 - rho ** 2) * z[..., t]
    return out
  err = series((runs, frames))
  width = student_t_quantile(0.95, samples) * np.sqrt(
      np.mean(series((runs, samples, frames)) ** 2, axis=1))
  inside = np.mean(np.abs(err) <= width, axis=1)
  return float(np.mean((inside >= 0.85) & (inside <= 0.95)))


def run_case(name: str, snr: float, shape, workdir: str, draws: int, rois: int,
             reuse: bool = False, movie_seed: int = 1) -> dict:
  noisy, clean, info = simulate(shape=shape, snr_db=snr, seed=movie_seed, **CASES[name])
  base = os.path.join(workdir, f"{name}_snr{snr:+g}")
  os.makedirs(base, exist_ok=True)
  path = os.path.join(base, "noisy.tif")
  write_movie(path, noisy)
  t0 = time.perf_counter()
  model = os.path.join(base, "model")
  reused = reuse and os.path.isdir(os.path.join(model, "checkpoints"))
  if not reused:
    train(path, model, config_lib.load_config("demo"), progress=False)
  row = {"case": name, "snr_target_db": snr, "snr_in_db": info["snr_db"],
         "movie_seed": movie_seed,
         "train_seconds": None if reused else time.perf_counter() - t0,
         "model_reused": reused}
  est = denoise(noisy, model, output_dtype="float32")
  roi_list = rois_from_json(active_rois(clean, rois), shape[1:])
  for probes in (config_lib.UNCERTAINTY_BIAS_PROBES, 0):
    t0 = time.perf_counter()
    u = calibrated_uncertainty(noisy, model, est, draws=draws, scale_mode="none",
                               keep_samples=True, bias_probes=probes)
    seconds = time.perf_counter() - t0
    scored = score(u, est, clean, roi_list)
    if probes == 0:
      row["without_bias_split"] = scored
      continue
    rec = u.record
    row["uncertainty_seconds"] = seconds
    row["network_passes_per_voxel"] = rec["network_passes_per_voxel"]
    row["bias_split"] = rec["bias_split"]
    row["heldout_scale"] = rec["heldout_scale"]
    row["check"] = rec["check"]
    row["verdict"] = rec["verdict"]
    row["check_truth"] = check_truth(est, clean, rec)
    row.update(scored)
  _, sym_std = denoise(noisy, model, output_dtype="float32", symmetries=8)
  row["coverage"]["symmetry_spread_k8"] = coverage(est, sym_std, clean)
  print(json.dumps({k: row[k] for k in ("case", "snr_target_db", "heldout_scale")}),
        json.dumps({k: (round(v["within_1std"], 3), round(v["within_2std"], 3))
                    for k, v in row["coverage"].items()}),
        json.dumps({k: v["rois_85_to_95"] for k, v in row["rois"].items()}),
        json.dumps({k: (round(v["within_1std"], 3), round(v["within_2std"], 3))
                    for k, v in row["without_bias_split"]["coverage"].items()}), flush=True)
  return row


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--output", default="benchmarks/results/coverage_cpu")
  ap.add_argument("--snrs", default="-5,-2,3")
  ap.add_argument("--cases", default="white,correlated")
  ap.add_argument("--shape", default="300,64,64")
  ap.add_argument("--draws", type=int, default=8)
  ap.add_argument("--rois", type=int, default=8)
  ap.add_argument("--workdir", default="/tmp/deepcad-jax-coverage")
  ap.add_argument("--reuse-models", action="store_true",
                  help="use a model already trained in the workdir (same recipe)")
  ap.add_argument("--movie-seed", type=int, default=1,
                  help="seed of the simulated movies (a model reused from the workdir "
                       "was trained on seed 1's: a new recording for it)")
  args = ap.parse_args()
  shape = tuple(int(v) for v in args.shape.split(","))
  os.makedirs(args.output, exist_ok=True)
  record = {"device": jax.devices()[0].device_kind, "platform": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "shape": shape, "config": "demo", "draws": args.draws, "runs": []}
  for name in args.cases.split(","):
    for snr in (float(s) for s in args.snrs.split(",")):
      record["runs"].append(run_case(name, snr, shape, args.workdir, args.draws,
                                     args.rois, args.reuse_models, args.movie_seed))
      with open(os.path.join(args.output, "coverage.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
  main()
