import numpy as np
import pytest

from deepcad_jax.errors import UserError
from deepcad_jax.analysis.metrics import (evaluate, psnr_db, slice_correlations, snr_db,
                                          uncertainty_calibration, wobble)
from deepcad_jax.analysis.simulate import gcamp_kernel, simulate


def test_snr_and_psnr_against_hand_computed_values():
  y = np.array([[[3.0, 4.0]]])
  x = np.array([[[3.0, 5.0]]])
  assert snr_db(x, y) == pytest.approx(10 * np.log10(25 / 1))
  assert psnr_db(x, y) == pytest.approx(10 * np.log10(1**2 / 0.5))  # range 1, mse 0.5
  assert snr_db(y, y) == float("inf")


def test_slice_correlations_against_hand_computed_values():
  rng = np.random.default_rng(0)
  ref = rng.normal(size=(5, 4, 3))
  x = 2 * ref + 1
  for kind in ("xy", "yt", "xt"):
    np.testing.assert_allclose(slice_correlations(x, ref, kind), 1.0)
  np.testing.assert_allclose(slice_correlations(-ref, ref, "xy"), -1.0)
  assert slice_correlations(x, ref, "xy").shape == (5,)
  assert slice_correlations(x, ref, "yt").shape == (3,)  # one per column x
  assert slice_correlations(x, ref, "xt").shape == (4,)  # one per row y
  a, b = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
  expected = np.corrcoef(a[0], b[0])[0, 1]
  got = slice_correlations(a.reshape(2, 2, 3), b.reshape(2, 2, 3), "xy")[0]
  assert got == pytest.approx(expected)
  scores = evaluate(x, ref)
  assert scores["r_xy"]["median"] == pytest.approx(1.0)


@pytest.mark.parametrize("target", [-5.0, 0.0, 8.0])
def test_simulation_hits_the_requested_snr(target):
  noisy, clean, info = simulate(shape=(60, 48, 48), snr_db=target, seed=2)
  assert abs(snr_db(noisy, clean) - target) < 0.5
  assert info["snr_db"] == pytest.approx(snr_db(noisy, clean))
  assert noisy.dtype == clean.dtype == np.float32 and noisy.shape == (60, 48, 48)


def test_simulation_is_reproducible_from_its_seed():
  a = simulate(shape=(20, 32, 32), seed=7)
  b = simulate(shape=(20, 32, 32), seed=7)
  c = simulate(shape=(20, 32, 32), seed=8)
  assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])


def test_simulated_neurons_have_calcium_transients():
  _, clean, info = simulate(shape=(300, 48, 48), snr_db=0, spike_rate=1.0, seed=1)
  assert info["spikes"] > 0 and info["neurons"] == 48 * 48 // 300
  trace = clean.reshape(300, -1)
  assert (trace.max(0) / trace.min(0).clip(1e-6)).max() > 1.5  # transients over baseline


def test_gcamp_kernel_shape():
  k = gcamp_kernel(30.0, 0.05, 0.4)
  assert k.max() == pytest.approx(1.0) and k[0] == 0 and np.argmax(k) < 10
  assert k[-1] < 0.01


def test_wobble_is_the_temporal_std_over_static_pixels():
  from deepcad_jax.analysis.metrics import evaluate, format_table, static_voxels, wobble
  ref = np.full((6, 2, 2), 10.0)
  ref[:, 0, 0] = np.arange(6)  # the only changing pixel
  assert static_voxels(ref).sum() == 3
  movie = ref.copy()
  movie[:, 1, 1] += np.array([1, -1, 1, -1, 1, -1])  # flicker where nothing changes
  w = wobble(movie, ref)
  assert w["static_fraction"] == 0.75
  assert w["wobble"] == pytest.approx(1 / 3)  # std 1 on one of the three static pixels
  assert w["wobble_rel"] == pytest.approx(1 / 30)
  assert wobble(ref, ref)["wobble"] == 0
  assert "wobble over the 75.0% of pixels" in format_table({"denoised": evaluate(movie, ref)})
  moving = ref + np.arange(6)[:, None, None]
  assert np.isnan(wobble(moving, moving)["wobble"]) and "wobble" not in evaluate(moving, moving)


def test_constant_background_simulation():
  from deepcad_jax.analysis.metrics import static_voxels
  _, clean, _ = simulate(shape=(40, 32, 32), neuropil_coupling=0.0, seed=2)
  assert 0.2 < static_voxels(clean).mean() < 0.9
  _, coupled, _ = simulate(shape=(40, 32, 32), seed=2)
  assert static_voxels(coupled).mean() == 0


def test_cli_simulate_with_a_constant_background(tmp_path, capsys):
  from deepcad_jax import cli
  from deepcad_jax.data import open_movie
  from deepcad_jax.analysis.metrics import static_voxels
  assert cli.main(["deepcad-jax", "simulate", "--output", str(tmp_path), "--shape",
                   "20,32,32", "--neuropil-coupling", "0"]) == 0
  clean = open_movie(str(tmp_path / "clean.tif")).read(0, 20)
  assert static_voxels(clean).mean() > 0.2
  assert cli.main(["deepcad-jax", "evaluate", "--denoised", str(tmp_path / "noisy.tif"),
                   "--reference", str(tmp_path / "clean.tif")]) == 0
  assert "wobble over the" in capsys.readouterr().out


def test_every_metric_refuses_non_finite_values():
  ref = np.ones((4, 8, 8), np.float32)
  bad = ref.copy()
  bad[1, 2, 3] = np.nan
  for fn in (snr_db, psnr_db, evaluate, wobble,
             lambda x, y: slice_correlations(x, y, "xy"),
             lambda x, y: uncertainty_calibration(x, ref, y)):
    with pytest.raises(UserError, match=r"1 NaN or infinite value\(s\) \(the first at \(1, 2, 3\)\)"):
      fn(bad, ref)
    with pytest.raises(UserError, match="NaN or infinite"):
      fn(ref, np.where(bad == bad, ref, np.inf))
