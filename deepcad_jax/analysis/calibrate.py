"""Fit the uncertainty scale of a model on data with ground truth, and store it.

`denoise --uncertainty K` reports the spread of K test-time predictions. That spread
measures how much the network's answer depends on the orientation of its input, not the
error itself, so it is usually too small. `calibrate` denoises a movie whose ground
truth is known (e.g. from `deepcad-jax simulate`), finds the factor that makes 68.3% of
the errors fall within one (scaled) std, and writes it to the model directory
(`calibration.json`); later uncertainty maps from that model are scaled by it.

A scale only helps where the std tracks the error. When the Pearson correlation between
the std and |error| is below `MIN_CORRELATION` (0.1: the std then explains less than 1%
of the error's variance, or runs against it), the scale would make the average coverage
right while pointing at the wrong voxels, so nothing is stored unless the caller accepts
it (`accept_uncorrelated`, `--accept-uncorrelated`), and then with a warning in the
record. An existing calibration is replaced only with `overwrite`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from deepcad_jax.model_io.checkpoint import CALIBRATION
from deepcad_jax.model_io.loading import load_model
from deepcad_jax.data.movie import open_movie
from deepcad_jax.runtime.files import AtomicFile
from deepcad_jax.errors import UserError, check_number
from deepcad_jax.denoising.denoiser import Denoiser, denoise
from deepcad_jax.analysis.metrics import format_calibration, uncertainty_calibration

log = logging.getLogger("deepcad_jax")

MIN_CORRELATION = 0.1  # corr(std, |error|) below which a fitted scale is not stored


def calibrate(model_dir: str, noisy: str, clean: str, symmetries: int = 8, *,
              overwrite: bool = False, accept_uncorrelated: bool = False,
              **denoiser: Any) -> dict:
  """Measure the calibration of `model_dir`'s uncertainty on (noisy, clean), store the
  fitted std scale in the model directory, and return the measurements.

  Args:
    model_dir: a model directory (a training run or a converted model).
    noisy, clean: a noisy movie and its ground truth (TIFF paths).
    symmetries: test-time symmetries K, as for `denoise --uncertainty`.
    overwrite: replace an existing calibration.json.
    accept_uncorrelated: store the scale even when corr(std, |error|) is below
      MIN_CORRELATION (the record then carries a warning).
    **denoiser: more `Denoiser` options.
  """
  check_number("--uncertainty", symmetries, at_least=1, at_most=8, whole=True,
               fix="calibration compares the spread of K test-time symmetries with the "
               "error")
  if not os.path.isdir(model_dir):
    raise UserError(f"{model_dir} is not a model directory; calibration is stored in one "
                    "(convert a .pth first).")
  path = os.path.join(model_dir, CALIBRATION)
  if os.path.exists(path) and not overwrite:
    raise UserError(f"{path} already exists (the model is calibrated); add --overwrite "
                    "to replace it.")
  model = load_model(model_dir)
  model = dataclasses.replace(model, meta=model.meta.replace(calibration=None))
  noisy_movie, clean_movie = open_movie(noisy), open_movie(clean)
  if noisy_movie.shape != clean_movie.shape:
    raise UserError(f"{noisy} {noisy_movie.shape} and {clean} {clean_movie.shape} differ "
                    "in shape; give a noisy movie and its own ground truth.")
  den = Denoiser(model, symmetries=symmetries, **denoiser)
  log.info("calibrate: denoising %s %s under %d symmetries x %d member(s)...", noisy,
           noisy_movie.shape, symmetries, model.config.model.ensemble)
  mean, std = denoise(noisy_movie, den, output_dtype="float32", progress=True)
  result = uncertainty_calibration(mean, std, clean_movie.read(0, clean_movie.shape[0]))
  record = {"std_scale": result["std_scale"], "symmetries": symmetries,
            "members": model.config.model.ensemble,
            "fitted_on": os.path.abspath(noisy), "ground_truth": os.path.abspath(clean),
            "measured": result}
  r = result["corr_std_error"]
  if not r >= MIN_CORRELATION:  # NaN too (a constant std)
    what = (f"the predicted std does not track the error on {noisy} (corr(std, |error|) "
            f"= {r:.2f}, below {MIN_CORRELATION})")
    if not accept_uncorrelated:
      raise UserError(f"{what}, so a scale fitted here ({result['std_scale']:.3g}) would "
                      f"fix the average coverage but not point at the errors; nothing was "
                      f"stored in {path}: calibrate on data closer to the training data, "
                      "or add --accept-uncorrelated to store it anyway.")
    record["warning"] = f"{what}; stored on request (--accept-uncorrelated)."
    log.warning("WARNING: %s; the scale %.3g is stored as asked, but the uncertainty "
                "maps of this model do not show where its errors are.", what,
                result["std_scale"])
  with AtomicFile(path, overwrite=True) as f:
    json.dump(record, f.text(), indent=1)
  return record


def describe(record: dict, model_dir: str) -> str:
  """A calibration record's lines for the command line."""
  return (format_calibration(record["measured"]) + "\n" +
          f"stored std scale {record['std_scale']:.4g} in "
          f"{os.path.join(model_dir, CALIBRATION)}")
