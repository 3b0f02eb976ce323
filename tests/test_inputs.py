"""Inputs and honest numbers beyond the fault matrix: what calibrate stores, the short
file that shrinks the training patch, and the memory checks."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from conftest import noisy_movie, write_tiff
from deepcad_jax import UserError
from deepcad_jax import calibrate as calibrate_lib


def _fake_denoise(error_tracks: bool):
  """A stand-in for `denoise` returning (mean, std) whose std follows the error, or
  runs against it."""

  def denoise(movie, den, output_dtype=None):
    clean = noisy_movie(movie.shape)[1]
    err = np.random.default_rng(0).normal(0, 1, clean.shape).astype(np.float32)
    std = np.abs(err) + 0.1 if error_tracks else 1 / (np.abs(err) + 0.1)
    return clean + err, std.astype(np.float32)

  return denoise


def test_calibrate_refuses_a_std_that_does_not_track_the_error(tmp_path, trained_model,
                                                               monkeypatch, caplog):
  import shutil
  model = str(tmp_path / "model")
  shutil.copytree(trained_model, model)
  noisy, clean = noisy_movie((24, 24, 24), seed=1)
  src = write_tiff(tmp_path / "noisy.tif", noisy)
  ref = write_tiff(tmp_path / "clean.tif", clean)
  monkeypatch.setattr(calibrate_lib, "denoise", _fake_denoise(error_tracks=False))
  with pytest.raises(UserError, match=r"corr\(std, \|error\|\) = -0\.\d+, below 0\.1"):
    calibrate_lib.calibrate(model, src, ref)
  assert not (tmp_path / "model" / "calibration.json").exists()
  with caplog.at_level(logging.WARNING, logger="deepcad_jax"):
    record = calibrate_lib.calibrate(model, src, ref, accept_uncorrelated=True)
  assert "does not track the error" in caplog.text
  assert record["measured"]["corr_std_error"] < 0 and "warning" in record
  stored = json.load(open(tmp_path / "model" / "calibration.json"))
  assert stored["warning"] == record["warning"]
  monkeypatch.setattr(calibrate_lib, "denoise", _fake_denoise(error_tracks=True))
  with pytest.raises(UserError, match="already exists"):
    calibrate_lib.calibrate(model, src, ref)
  record = calibrate_lib.calibrate(model, src, ref, overwrite=True)
  assert record["measured"]["corr_std_error"] > 0.5 and "warning" not in record
  assert "warning" not in json.load(open(tmp_path / "model" / "calibration.json"))
  assert not list((tmp_path / "model").glob("*.tmp"))
