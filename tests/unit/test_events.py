import json

import numpy as np
import pytest

from tests.helpers import write_tiff
from deepcad_jax import UserError, cli
from deepcad_jax.analysis import events
from deepcad_jax.analysis.events import find_suppressed_events, noise_model
from deepcad_jax.analysis.simulate import simulate


def _planted(seed=3):
  noisy, clean, _ = simulate(shape=(80, 48, 48), snr_db=0, seed=seed)
  rng = np.random.default_rng(seed)
  raw = noisy.copy()
  places = [(20, 12, 12), (55, 30, 34)]
  for t, y, x in places:  # brief bright transients, absent from the "denoised" movie
    raw[t - 1:t + 2, y - 3:y + 3, x - 3:x + 3] += rng.poisson(
        2 * clean.mean(), (3, 6, 6)).astype(np.float32)
  return raw, noisy, clean, places


def test_noise_model_recovers_poisson_gaussian_parameters():
  noisy, _, _ = simulate(shape=(100, 48, 48), snr_db=0, seed=1, read_noise=2.0)
  a, b = noise_model(noisy)
  assert a == pytest.approx(1.0, abs=0.1) and b == pytest.approx(4.0, rel=0.2)


def test_planted_events_are_found_and_noise_alone_gives_none():
  raw, noisy, clean, places = _planted()
  report = find_suppressed_events(raw, clean)
  found = [(e["t"], e["y"], e["x"]) for e in report.events]
  assert len(found) == len(places)
  for p in places:
    assert any(np.all(np.abs(np.array(f) - p) <= 2) for f in found), (p, found)
  assert find_suppressed_events(noisy, clean).events == []
  assert report.z_map.shape == (48, 48)
  with pytest.raises(UserError, match="differ in shape"):
    find_suppressed_events(raw, clean[:10])


def test_events_cli(capsys, tmp_path):
  raw, _, clean, places = _planted(4)
  r = write_tiff(tmp_path / "raw.tif", raw)
  d = write_tiff(tmp_path / "den.tif", clean)
  assert cli.main(["deepcad-jax", "events", "--raw", r, "--denoised", d, "--output",
                   str(tmp_path / "check")]) == 0
  out = capsys.readouterr().out
  assert "2 candidate event(s)" in out and "noise model" in out
  data = json.load(open(tmp_path / "check" / "events.json"))
  assert len(data["events"]) == 2
  assert (tmp_path / "check" / "events.csv").read_text().startswith("t,y,x,z,excess")
  assert cli.main(["deepcad-jax", "events", "--raw", r, "--denoised", d, "--output",
                   str(tmp_path / "check")]) == 2


def test_dark_sparse_movie_pure_noise_flags_nothing():
  # About 0.02 photons per voxel, 98% of voxels zero, no read noise: the old fit let
  # the variance run to zero (b floored to 1e-6) and flagged stray photons with huge z.
  noisy, clean, info = simulate(shape=(200, 48, 48), snr_db=-15, read_noise=0.0, seed=2)
  assert info["mean_photons"] < 0.05 and (noisy == 0).mean() > 0.95
  report = find_suppressed_events(noisy, clean)
  assert report.events == []
  assert report.noise[0] == pytest.approx(1.0, abs=0.1)  # photons: var = mean
  assert report.noise_floor > 1e-3 and float(report.z_map.max()) < 6


def test_a_movie_without_noise_is_refused():
  flat = np.full((10, 16, 16), 7.0, np.float32)
  with pytest.raises(UserError, match="no frame-to-frame variation"):
    find_suppressed_events(flat, flat)


def test_events_in_blocks_equal_one_pass(monkeypatch):
  raw, _, clean, _ = _planted()
  whole = find_suppressed_events(raw, clean)
  monkeypatch.setattr(events, "BLOCK_BYTES", 8 * 48 * 48 * 9)  # 9 frames: 3 + 2 halos
  blocks = find_suppressed_events(raw, clean)
  assert len(whole.events) == 2 and len(blocks.events) == 2
  for b, w in zip(blocks.events, whole.events):  # the same boxes, sums in another order
    assert (b["t"], b["y"], b["x"]) == (w["t"], w["y"], w["x"])
    assert b["z"] == pytest.approx(w["z"], rel=1e-9)
  np.testing.assert_allclose(blocks.z_map, whole.z_map, rtol=1e-5)
  assert blocks.noise == pytest.approx(whole.noise, rel=1e-9)
