"""Fit the uncertainty scale of a model on data with ground truth, and store it.

`denoise --uncertainty K` reports the spread of K test-time predictions. That spread
measures how much the network's answer depends on the orientation of its input, not the
error itself, so it is usually too small. `calibrate` denoises a movie whose ground
truth is known (e.g. from `deepcad-jax simulate`), finds the factor that makes 68.3% of
the errors fall within one (scaled) std, and writes it to the model directory
(`calibration.json`); later uncertainty maps from that model are scaled by it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any


from deepcad_jax.checkpoint import CALIBRATION, load_model
from deepcad_jax.data.movie import open_movie
from deepcad_jax.errors import UserError
from deepcad_jax.infer import Denoiser, denoise
from deepcad_jax.metrics import uncertainty_calibration

log = logging.getLogger("deepcad_jax")


def calibrate(model_dir: str, noisy: str, clean: str, samples: int = 8,
              **denoiser: Any) -> dict:
  """Measure the calibration of `model_dir`'s uncertainty on (noisy, clean), store the
  fitted std scale in the model directory, and return the measurements."""
  if not os.path.isdir(model_dir):
    raise UserError(f"{model_dir} is not a model directory; calibration is stored in one "
                    "(convert a .pth first).")
  model = load_model(model_dir)
  model = dataclasses.replace(model, meta={k: v for k, v in model.meta.items()
                                           if k != "calibration"})
  noisy_movie, clean_movie = open_movie(noisy), open_movie(clean)
  if noisy_movie.shape != clean_movie.shape:
    raise UserError(f"{noisy} {noisy_movie.shape} and {clean} {clean_movie.shape} differ "
                    "in shape; give a noisy movie and its own ground truth.")
  den = Denoiser(model, uncertainty=samples, **denoiser)
  log.info("calibrate: denoising %s %s under %d symmetries x %d member(s)...", noisy,
           noisy_movie.shape, samples, model.config.model.ensemble)
  mean, std = denoise(noisy_movie, den, output_dtype="float32", progress=True)
  result = uncertainty_calibration(mean, std, clean_movie.read(0, clean_movie.shape[0]))
  record = {"std_scale": result["std_scale"], "samples": samples,
            "members": model.config.model.ensemble,
            "fitted_on": os.path.abspath(noisy), "ground_truth": os.path.abspath(clean),
            "measured": result}
  with open(os.path.join(model_dir, CALIBRATION), "w") as f:
    json.dump(record, f, indent=1)
  return record
