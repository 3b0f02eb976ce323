"""Measure what docs/denoising.md "Output precision" reports: what rounding the output costs.

On photon-limited simulated movies (noise std about 1 count) stored as a camera would
(uint16 counts), it trains the demo network, denoises through the public API into the
default output (float32) and into the input's type (`output_dtype="input"`: uint16,
rounded on the device), and scores both against the ground truth. It also scores two
scaled 16-bit integers (x = offset + scale * n, the alternative to float32): with the
scale fitted to the denoised movie's own range (known only after the whole movie is
denoised) and with the scale fixed before writing from the input's range (what a writer
that streams frames could use). File sizes are those of the files written.

  python benchmarks/precision.py --output benchmarks/results/precision_cpu
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
from deepcad_jax import train
from deepcad_jax.data.movie import open_movie
from deepcad_jax.data.writers import write_movie
from deepcad_jax.denoising.files import denoise_files
from deepcad_jax.analysis.metrics import snr_db
from deepcad_jax.analysis.simulate import simulate


def scaled_uint16(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """x stored as uint16 n with x = lo + n * (hi - lo) / 65535, read back as float."""
  scale = (hi - lo) / 65535.0
  n = np.clip(np.rint((x.astype(np.float64) - lo) / scale), 0, 65535)
  return lo + n * scale


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--output", default="benchmarks/results/precision_cpu")
  ap.add_argument("--snrs", default="-5,-2")
  ap.add_argument("--seeds", default="1,2")
  ap.add_argument("--shape", default="300,64,64")
  ap.add_argument("--workdir", default="/tmp/deepcad-jax-precision")
  args = ap.parse_args()
  shape = tuple(int(v) for v in args.shape.split(","))
  os.makedirs(args.output, exist_ok=True)
  os.makedirs(args.workdir, exist_ok=True)
  record = {"device": jax.devices()[0].device_kind, "platform": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "shape": shape, "config": "demo (f=8, 400 steps, lr 1e-3)", "runs": []}
  for snr in (float(s) for s in args.snrs.split(",")):
    for seed in (int(s) for s in args.seeds.split(",")):
      noisy, clean, info = simulate(shape=shape, snr_db=snr, seed=seed)
      counts = np.clip(np.rint(noisy), 0, 65535).astype(np.uint16)  # a camera's counts
      base = os.path.join(args.workdir, f"snr{snr:+g}_seed{seed}")
      os.makedirs(base, exist_ok=True)
      src = os.path.join(base, "noisy.tif")
      write_movie(src, counts)
      cfg = config_lib.override(config_lib.load_config("demo"), **{"train.seed": seed})
      t0 = time.perf_counter()
      run = os.path.join(base, "run")
      train(src, run, cfg, progress=False, fresh=True)
      train_s = time.perf_counter() - t0
      outs = {}
      for name, dtype in (("float32", None), ("uint16", "input")):
        path = os.path.join(base, f"den_{name}.tif")
        [report] = denoise_files(src, path, run, output_dtype=dtype, overwrite=True,
                                 progress=False)
        outs[name] = (path, report)
      f32 = open_movie(outs["float32"][0]).read(0, shape[0])
      u16 = open_movie(outs["uint16"][0]).read(0, shape[0])
      own = scaled_uint16(f32, float(f32.min()), float(f32.max()))
      ahead = scaled_uint16(f32, 0.0, 2.0 * float(counts.max()))
      row = {
          "snr_target_db": snr, "seed": seed, "snr_in_db": snr_db(counts, clean),
          "mean_photons": info["mean_photons"],
          "noise_std": float(np.std(counts.astype(np.float64) - clean)),
          "train_seconds": train_s,
          "snr_db": {"float32": snr_db(f32, clean), "uint16_rounded": snr_db(u16, clean),
                     "scaled_uint16_own_range": snr_db(own, clean),
                     "scaled_uint16_input_range": snr_db(ahead, clean)},
          "rounding_rms_counts": outs["uint16"][1].rounding_rms,
          "scaled_own_step": float((f32.max() - f32.min()) / 65535),
          "scaled_input_step": float(2.0 * counts.max() / 65535),
          "residual_rms_float32": float(np.sqrt(np.mean((f32 - clean) ** 2))),
          "denoised_temporal_std": float(np.sqrt(np.mean(f32.astype(np.float64).var(0)))),
          "bytes": {"input_uint16": os.path.getsize(src),
                    "float32": os.path.getsize(outs["float32"][0]),
                    "uint16": os.path.getsize(outs["uint16"][0])}}
      record["runs"].append(row)
      print(json.dumps(row), flush=True)
  with open(os.path.join(args.output, "precision.json"), "w") as f:
    json.dump(record, f, indent=1)


if __name__ == "__main__":
  main()
