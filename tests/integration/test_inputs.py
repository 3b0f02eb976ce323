"""Inputs and honest numbers beyond the fault matrix: what calibrate stores, the short
file that shrinks the training patch, the memory checks, good TIFFs still opening on
both read paths, and a memory-mapped file that shrinks while it is read."""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile

from tests.helpers import noisy_movie, tiny_config, write_tiff
from deepcad_jax import UserError
from deepcad_jax.runtime import parallel, resources
from deepcad_jax.analysis import calibrate as calibrate_lib
from deepcad_jax.data.movie import open_movie
from deepcad_jax.denoising.memory import compiled_bytes

from deepcad_jax.training import loop as train_lib
from deepcad_jax.training import step as step_lib


def _fake_denoise(error_tracks: bool):
  """A stand-in for `denoise` returning (mean, std) whose std follows the error, or
  runs against it."""

  def denoise(movie, den, output_dtype=None, progress=False):
    clean = noisy_movie(movie.shape)[1]
    err = np.random.default_rng(0).normal(0, 1, clean.shape).astype(np.float32)
    std = np.abs(err) + 0.1 if error_tracks else 1 / (np.abs(err) + 0.1)
    return clean + err, std.astype(np.float32)

  return denoise


def test_calibrate_refuses_a_std_that_does_not_track_the_error(tmp_path, trained_model,
                                                               monkeypatch, caplog):
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


@pytest.mark.slow
def test_one_short_file_in_a_folder_is_named_with_its_cost(tmp_path, devices, caplog):
  data = tmp_path / "movies"
  data.mkdir()
  write_tiff(data / "a.tif", noisy_movie((40, 24, 24))[0])
  write_tiff(data / "thin.tif", noisy_movie((40, 12, 24))[0])
  with caplog.at_level(logging.WARNING, logger="deepcad_jax"):
    result = train_lib.train(str(data), str(tmp_path / "run"), tiny_config(**{"train.epochs": 1}),
                   devices=devices[:1], progress=False)
  assert result.patch == (8, 8, 16)
  lines = [r.getMessage() for r in caplog.records if "patch reduced" in r.getMessage()]
  assert len(lines) == 1, lines
  assert "for all 2 files because" in lines[0] and "thin.tif (40, 12, 24)" in lines[0]
  assert "50% of the configured voxels" in lines[0]
  assert "leave it out of --data to keep (8, 16, 16)" in lines[0]


def test_running_out_of_memory_is_one_sentence():

  @resources.device_memory("the test", "ask for less")
  def greedy():
    return jnp.zeros((10**7, 10**6))  # 40 TB: XLA refuses at once

  with pytest.raises(UserError, match=r"^the test ran out of device memory "
                                      r"\(RESOURCE_EXHAUSTED.*\); ask for less\.$"):
    greedy()

  @resources.device_memory("the test", "ask for less")
  def other():
    raise RuntimeError("not memory")

  with pytest.raises(RuntimeError, match="not memory"):
    other()


@pytest.mark.slow
def test_training_memory_estimate_is_a_lower_bound_of_xla_analysis(devices):
  """The refusal must never refuse what fits: the estimate stays below what XLA's own
  analysis of the compiled step says."""
  for features, patch in ((4, (8, 16, 16)), (8, (16, 32, 32))):
    cfg = tiny_config(**{"model.features": features, "data.patch": patch})
    n, state, activations = step_lib.training_bytes(cfg, 1)
    step = step_lib.compile_step(step_lib.make_model(cfg),
                                 parallel.data_mesh(devices[:1]))
    abstract = jax.eval_shape(lambda: step_lib.create_state(cfg))
    batch = {k: jax.ShapeDtypeStruct((1,) + patch, jnp.float32) for k in ("input", "target")}
    key = jax.eval_shape(lambda: jax.random.key(0))
    measured = compiled_bytes(step.lower(abstract, batch, key).compile())
    assert n > 0 and measured is not None
    assert state + activations <= measured, (features, patch, state + activations, measured)


def test_good_tiffs_still_open_on_both_paths(tmp_path):
  """The checks at opening refuse damaged files only: plain (memory-mapped), compressed
  (page by page), ImageJ, BigTIFF and shaped files open and read back exactly."""
  movie = noisy_movie((40, 24, 24))[0]
  variants = {"plain.tif": {}, "zlib.tif": {"compression": "zlib"},
              "big.tif": {"bigtiff": True}, "pages.tif": {"metadata": None}}
  for name, kwargs in variants.items():
    path = write_tiff(tmp_path / name, movie, **kwargs)
    m = open_movie(path)
    np.testing.assert_array_equal(m.read(0, 40), movie)
    assert m.memory_mapped == (name != "zlib.tif"), name
  tifffile.imwrite(tmp_path / "ij.tif", movie, imagej=True, metadata={"axes": "TYX"})
  np.testing.assert_array_equal(open_movie(str(tmp_path / "ij.tif")).read(0, 40), movie)


def test_a_memory_mapped_file_that_shrinks_is_refused_not_read(tmp_path):
  path = write_tiff(tmp_path / "m.tif", noisy_movie((40, 24, 24))[0])
  m = open_movie(path)
  assert m.memory_mapped
  size = os.path.getsize(path)
  os.truncate(path, size // 2)  # e.g. the file is being replaced by a copy in progress
  with pytest.raises(UserError, match=r"m\.tif shrank to \d+ bytes while being read"):
    m.read(30, 40)
