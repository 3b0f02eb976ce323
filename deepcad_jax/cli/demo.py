"""`deepcad-jax demo`: simulate, train, denoise, and measure, in one command."""

from __future__ import annotations

import json
import logging
import os
import time


from deepcad_jax.model_io import checkpoint as ckpt
from deepcad_jax.config import load_config
from deepcad_jax.config.demo import SIMULATIONS
from deepcad_jax.runtime.files import AtomicFile
from deepcad_jax.errors import UserError
from deepcad_jax.denoising.files import denoise_files
from deepcad_jax.analysis.metrics import evaluate_files, format_table
from deepcad_jax.analysis.simulate import write_simulation
from deepcad_jax.training.loop import train

log = logging.getLogger("deepcad_jax")



def run_demo(workdir: str = "deepcad-jax-demo", quick: bool = False, seed: int = 0,
             overwrite: bool = False) -> dict:
  """Run the whole loop on a simulated movie and return the measured results."""
  sim_dir = os.path.join(workdir, "sim")
  run_dir = os.path.join(workdir, "model")
  denoised = os.path.join(workdir, "denoised.tif")
  results_path = os.path.join(workdir, "results.json")
  if os.path.exists(workdir) and os.listdir(workdir) and not overwrite:
    raise UserError(f"{workdir} already holds files; add --overwrite to redo the demo "
                    "there, or choose another --workdir.")
  if overwrite:
    ckpt.clear(run_dir)
  t0 = time.perf_counter()
  sim = SIMULATIONS["quick" if quick else "full"]
  log.info("1/4 simulating a %s movie at %.1f dB SNR in %s", sim["shape"], sim["snr_db"],
           sim_dir)
  info = write_simulation(sim_dir, overwrite=True, seed=seed, **sim)
  cfg = load_config("demo:quick" if quick else "demo")
  log.info("2/4 training %s (f=%d) in %s", cfg.name, cfg.model.features, run_dir)
  result = train(info["noisy"], run_dir, cfg)
  result.stop_if_interrupted()
  log.info("3/4 denoising -> %s", denoised)
  report = denoise_files(info["noisy"], denoised, run_dir, overwrite=True,
                         output_dtype="float32")[0]
  if report.brightness_note:
    log.info("    %s", report.brightness_note)
  log.info("4/4 scoring against the ground truth")
  scores = evaluate_files(denoised, info["clean"], raw=info["noisy"])
  summary = {"input_snr_db": scores["raw"]["snr_db"],
             "output_snr_db": scores["denoised"]["snr_db"],
             "improvement_db": scores["denoised"]["snr_db"] - scores["raw"]["snr_db"],
             "train_steps": result.step, "final_loss": result.losses[-1][1]
             if result.losses else None,
             "inference_voxels_per_s": report.voxels_per_s,
             "brightness_correction": report.brightness,
             "seconds": time.perf_counter() - t0, "scores": scores,
             "files": {"noisy": info["noisy"], "clean": info["clean"],
                       "model": run_dir, "denoised": denoised, "results": results_path}}
  with AtomicFile(results_path, overwrite=True) as f:
    json.dump(summary, f.text(), indent=1)
  print()
  print(format_table(scores))
  print(f"\nSNR {summary['input_snr_db']:.2f} dB -> {summary['output_snr_db']:.2f} dB "
        f"({summary['improvement_db']:+.2f} dB) after {result.step} training steps; "
        f"whole demo {summary['seconds']:.0f}s.")
  print("files:")
  for k, v in summary["files"].items():
    print(f"  {k:<9} {v}")
  return summary
