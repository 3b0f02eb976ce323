"""The hallucination audit: control scenes from the recording's statistics."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import noisy_movie, write_tiff
from deepcad_jax import Denoiser, cli
from deepcad_jax.analysis.audit import audit, find_blobs
from deepcad_jax.denoising.step import identity_tiles


def test_audit_writes_maps_summary_and_figure(capsys, tmp_path, trained_model):
  movie, _ = noisy_movie((24, 24, 24), seed=2)
  src = write_tiff(tmp_path / "raw.tif", movie)
  out = tmp_path / "audit"
  assert cli.main(["deepcad-jax", "audit", "--model", trained_model, "--movie", src,
                   "--output", str(out)]) == 0
  assert "invented wobble" in capsys.readouterr().out
  for name in ("wobble_ratio.tif", "event_z.tif", "flat_contrast.tif", "flat_blobs.tif",
               "audit.png", "audit.json"):
    assert os.path.getsize(out / name) > 0
  summary = json.load(open(out / "audit.json"))
  numbers = [summary["static"][k] for k in ("wobble_rms", "wobble_over_noise_median",
                                            "largest_event_z")]
  numbers += [summary["flat"][k] for k in ("contrast_mean_image_over_noise",
                                           "contrast_frames_over_noise")]
  assert np.all(np.isfinite(numbers)) and summary["frames"] == 24
  assert open(out / "audit.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_model_that_outputs_the_mean_invents_nothing(trained_model):
  movie, _ = noisy_movie((24, 24, 24), seed=2)
  flat = Denoiser(trained_model, network=lambda params, tiles, prior: jnp.zeros_like(tiles))
  a = audit(movie, flat)
  assert a.summary["flat"]["contrast_mean_image_over_noise"] < 1e-4
  assert a.summary["static"]["wobble_rms"] < 1e-3
  assert a.summary["flat"]["blobs_mean_image"] == 0
  assert a.summary["flat"]["blobs_per_frame"] == 0


def test_a_network_that_copies_its_input_shows_the_noise_and_no_cells(trained_model):
  movie, _ = noisy_movie((32, 24, 24), seed=4)
  a = audit(movie, Denoiser(trained_model, network=identity_tiles()))
  # Copying the noise: wobble = the noise std, mean-image contrast about 1/sqrt(frames).
  assert a.summary["static"]["wobble_over_noise_median"] == pytest.approx(1.0, abs=0.2)
  assert a.summary["flat"]["contrast_mean_image_over_noise"] * np.sqrt(32) == \
      pytest.approx(1.0, abs=0.4)
  assert a.summary["flat"]["blobs_mean_image"] == 0


def test_the_cell_finder_finds_a_bright_disc():
  yy, xx = np.mgrid[:40, :40]
  image = np.zeros((40, 40), np.float32) + 10 * ((yy - 20) ** 2 + (xx - 15) ** 2 < 16)
  labels = find_blobs(image, noise_std=1.0)
  assert labels.max() == 1 and labels[20, 15] == 1
  assert find_blobs(image, noise_std=10.0).max() == 0
