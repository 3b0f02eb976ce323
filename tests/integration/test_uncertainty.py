import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import noisy_movie, write_tiff
from deepcad_jax import Denoiser, UserError, cli, denoise, load_model
from deepcad_jax.core.augment import apply_symmetry, invert_symmetry
from deepcad_jax.data import open_movie
from deepcad_jax.denoising.step import symmetry_samples
from deepcad_jax.denoising.outputs import std_path
from deepcad_jax.analysis.metrics import uncertainty_calibration


def test_symmetry_samples_invert_exactly():
  batch = jax.random.normal(jax.random.key(0), (2, 4, 8, 8))
  out = symmetry_samples(lambda b, p: b[None], batch, 8)  # identity network
  assert out.shape == (8, 2, 4, 8, 8)
  for sample in out:
    np.testing.assert_array_equal(sample, batch)
  # A network that is not equivariant (it weights X positions) gives different samples,
  # each its answer for that orientation brought back.
  ramp = jnp.arange(8.0)
  out = symmetry_samples(lambda b, p: (b * ramp)[None], batch, 8)
  assert float(out.std(0).min()) >= 0 and float(out.std(0).mean()) > 0
  for s in range(8):
    np.testing.assert_allclose(out[s], invert_symmetry(apply_symmetry(batch, s) * ramp, s))
  # The prior gets the same symmetry as the frames.
  prior = jax.random.normal(jax.random.key(1), (2, 8, 8))
  out = symmetry_samples(lambda b, p: (b * p[:, None])[None], batch, 8, prior)
  for sample in out:
    np.testing.assert_allclose(sample, batch * prior[:, None], rtol=1e-6)
  # Members come out as separate samples: K symmetries x M members.
  out = symmetry_samples(lambda b, p: jnp.stack([b, 2 * b, 3 * b]), batch, 4)
  assert out.shape == (12, 2, 4, 8, 8)


def test_uncertainty_maps_have_the_movie_shape_and_are_non_negative(trained_model):
  movie, _ = noisy_movie((20, 24, 28), seed=3)
  mean, std = denoise(movie, trained_model, output_dtype="float32", symmetries=4)
  assert mean.shape == std.shape == movie.shape and std.dtype == np.float32
  assert std.min() >= 0 and std.mean() > 0
  plain = denoise(movie, trained_model, output_dtype="float32")
  assert np.abs(mean - plain).mean() < 3 * std.mean() + 1e-3  # close to the point estimate
  with pytest.raises(UserError, match="--uncertainty takes 2 to 8"):
    Denoiser(trained_model, symmetries=9)
  # Each symmetry is its own forward pass, so a non-square patch has all 8 too.
  mean8, std8 = denoise(movie, Denoiser(trained_model, patch=(8, 16, 24), symmetries=8),
                        output_dtype="float32")
  assert std8.shape == movie.shape and std8.mean() > 0


def test_coverage_against_hand_made_cases():
  ref = np.zeros((1, 1, 4))
  movie = np.array([[[0.5, -1.5, 3.0, 0.0]]])
  std = np.ones((1, 1, 4))
  c = uncertainty_calibration(movie, std, ref)
  assert c["coverage_1std"] == pytest.approx(0.5)   # |0.5| and |0| are within 1
  assert c["coverage_2std"] == pytest.approx(0.75)  # and |-1.5|
  # Errors 0.5, 1.5, 3, 0 over std 1: the 68.27% quantile of the ratio.
  assert c["std_scale"] == pytest.approx(np.quantile([0.5, 1.5, 3.0, 0.0], 0.6827))
  assert c["coverage_1std_rescaled"] >= 0.5
  std2 = np.array([[[0.5, 1.5, 3.0, 1e-3]]])  # std that follows the error
  assert uncertainty_calibration(movie, std2, ref)["corr_std_error"] > 0.99


def test_cli_uncertainty_evaluate_and_calibrate(capsys, tmp_path, trained_model):
  import shutil
  model = str(tmp_path / "model")
  shutil.copytree(trained_model, model)
  noisy, clean = noisy_movie((24, 24, 24), seed=11)
  src = write_tiff(tmp_path / "noisy.tif", noisy.astype(np.float32))
  ref = write_tiff(tmp_path / "clean.tif", clean)
  out = str(tmp_path / "den.tif")
  assert cli.main(["deepcad-jax", "denoise", "--model", model, "--input", src, "--output",
                   out, "--uncertainty", "8"]) == 0
  assert "uncertainty (std over 8 symmetries)" in capsys.readouterr().out
  std_before = open_movie(std_path(out)).read(0, 24)
  assert cli.main(["deepcad-jax", "evaluate", "--denoised", out, "--reference", ref,
                   "--uncertainty", std_path(out)]) == 0
  text = capsys.readouterr().out
  assert "within 1 std" in text and "corr(std, |error|)" in text
  assert cli.main(["deepcad-jax", "calibrate", "--model", model, "--noisy", src,
                   "--clean", ref, "--accept-uncorrelated"]) == 0
  record = json.load(open(tmp_path / "model" / "calibration.json"))
  assert load_model(model).meta["calibration"]["std_scale"] == record["std_scale"]
  assert record["measured"]["coverage_1std_rescaled"] == pytest.approx(0.6827, abs=0.01)
  assert cli.main(["deepcad-jax", "denoise", "--model", model, "--input", src, "--output",
                   out, "--uncertainty", "8", "--overwrite"]) == 0
  std_after = open_movie(std_path(out)).read(0, 24)
  np.testing.assert_allclose(std_after, std_before * record["std_scale"], rtol=1e-4,
                             atol=1e-5)


# ------------------------------------------------------------ calibrated uncertainty


def test_noise_draws_have_the_fitted_variance_and_neighbour_correlation():
  from deepcad_jax.analysis.noise import NoiseModel, fit_movie
  nm = NoiseModel(a=2.0, b=5.0, floor=1.0, corr_x=(0.3,), corr_y=(0.15,))
  mean = np.broadcast_to(np.linspace(10, 200, 32, dtype=np.float32)[None, None],
                         (64, 32, 32))
  draw = nm.sample(mean, np.random.default_rng(0))
  np.testing.assert_allclose(draw.var(axis=(0, 1)), nm.variance(mean[0, 0]), rtol=0.15)
  refit = fit_movie(mean + draw)
  assert refit.corr_x[0] == pytest.approx(0.3, abs=0.05)
  assert refit.corr_y[0] == pytest.approx(0.15, abs=0.05)
  assert refit.a == pytest.approx(2.0, rel=0.15)


def test_bootstrap_of_an_identity_network_gives_the_noise_std(trained_model):
  from deepcad_jax import calibrated_uncertainty
  from deepcad_jax.analysis.noise import fit_movie
  from deepcad_jax.denoising.step import identity_tiles
  movie, _ = noisy_movie((32, 24, 24), seed=5)
  den = Denoiser(trained_model, network=identity_tiles())
  u = calibrated_uncertainty(movie, den, draws=4, scale_mode="none", keep_samples=True)
  noise_std = np.sqrt(fit_movie(movie).variance(movie.astype(np.float32)))
  assert float(u.std.mean() / noise_std.mean()) == pytest.approx(1.0, abs=0.15)
  assert u.samples.shape == (4,) + movie.shape
  # 4 draws, 2 bias probes (an identity network takes nothing out: no bias is kept),
  # the check's probe and the estimate
  assert u.record["network_passes_per_voxel"] == 4 + 2 + 1 + 1
  assert u.record["bias_split"]["own_error_removed"] < 1e-6 * noise_std.mean() ** 2
  assert u.record["bias_split"]["bias_sq"] < 0.1 * noise_std.mean() ** 2
  with pytest.raises(UserError, match="at least 2 bootstrap draws"):
    calibrated_uncertainty(movie, den, draws=1)
  with pytest.raises(UserError, match="holdout_every >= 4"):
    calibrated_uncertainty(movie, den, draws=2, holdout_every=2)
  with pytest.raises(UserError, match="--bias-probes takes 0 or more"):
    calibrated_uncertainty(movie, den, draws=2, bias_probes=-1)



def test_calibrated_uncertainty_refuses_a_recording_over_the_host_memory(monkeypatch,
                                                                          trained_model):
  from deepcad_jax import calibrated_uncertainty
  from deepcad_jax.runtime import resources
  movie, _ = noisy_movie((32, 24, 24), seed=5)
  monkeypatch.setattr(resources, "host_available_bytes", lambda: 1000)
  with pytest.raises(UserError, match=r"calibrated uncertainty of .*\(32, 24, 24\) needs "
                                      r"at least .*; this machine has .*fewer frames"):
    calibrated_uncertainty(movie, Denoiser(trained_model), draws=2)


def test_calibrated_std_is_wider_than_the_symmetry_spread(capsys, tmp_path, trained_model):
  """On a movie with known truth, the calibrated std is wider than the symmetry spread
  and covers more of the errors; the CLI writes the std, the record and samples that
  `traces` turns into a Student-t band."""
  noisy, clean = noisy_movie((32, 24, 24), seed=11)
  src = write_tiff(tmp_path / "noisy.tif", noisy.astype(np.float32))
  out = str(tmp_path / "den.tif")
  assert cli.main(["deepcad-jax", "denoise", "--model", trained_model, "--input", src,
                   "--output", out, "--uncertainty", "calibrated", "--draws", "4",
                   "--bias-probes", "1", "--save-samples"]) == 0
  assert "calibrated uncertainty (4 bootstrap draws; bias told apart in 1 probe pass:" in (
      capsys.readouterr().out)
  den = open_movie(out).read(0, 32)
  std = open_movie(std_path(out)).read(0, 32)
  record = json.load(open(tmp_path / "den_uncertainty.json"))
  assert record["draws"] == 4 and record["check"] and np.isfinite(record["heldout_scale"])
  assert record["bias_probes"] == 1 and record["network_passes_per_voxel"] == 4 + 1 + 1 + 1
  assert len(record["samples_files"]) == 4
  _, sym = denoise(noisy.astype(np.float32), trained_model, output_dtype="float32",
                   symmetries=4)
  assert std.mean() > sym.mean()
  err = np.abs(den - clean)
  assert np.mean(err <= 2 * std) > np.mean(err <= 2 * sym)
  rois = tmp_path / "rois.json"
  rois.write_text(json.dumps([{"name": "a", "polygon": [[2, 2], [2, 9], [9, 9], [9, 2]]}]))
  assert cli.main(["deepcad-jax", "traces", "--movie", out, "--samples",
                   str(tmp_path / "den_sample*.tif"), "--rois", str(rois), "--output",
                   str(tmp_path / "tr")]) == 0
  assert "(student-t) over 4 samples" in capsys.readouterr().out
  assert cli.main(["deepcad-jax", "denoise", "--model", trained_model, "--input", src,
                   "--output", str(tmp_path / "x.tif"), "--uncertainty", "wide"]) != 0
  captured = capsys.readouterr()
  assert "'calibrated' or a number" in captured.err + captured.out
  assert not os.path.exists(tmp_path / "x.tif")


def test_student_t_band_is_wider_than_the_normal_for_few_samples():
  from deepcad_jax.analysis.traces import Traces, student_t_quantile
  assert student_t_quantile(0.95, 8) == pytest.approx(1.860, rel=0.01)
  assert student_t_quantile(0.975, 4) == pytest.approx(2.776, rel=0.02)
  assert student_t_quantile(0.95, 10_000) == pytest.approx(1.645, rel=1e-3)
  rng = np.random.default_rng(0)
  den = np.zeros((50, 1))
  samples = rng.standard_normal((4, 50, 1))
  t_lo, t_hi = Traces(["a"], [1], den, samples=samples, band=(5, 95)).f_band
  p_lo, p_hi = Traces(["a"], [1], den, samples=samples, band=(5, 95),
                      band_shape="percentile").f_band
  assert np.mean(t_hi - t_lo) > np.mean(p_hi - p_lo)


@pytest.mark.parametrize("brightness", ["model", "regional"])
def test_a_long_recording_is_done_in_segments_of_one_output(tmp_path, trained_model,
                                                            brightness):
  """In segments (each with its own draws, probes and check, read with context either
  side), the std and samples are whole movies of the recording's length, close to the
  std of the whole recording done at once, and the record lists the segments."""
  from deepcad_jax import write_calibrated_uncertainty
  from deepcad_jax.analysis.uncertainty.files import describe
  noisy, _ = noisy_movie((48, 24, 24), seed=7)
  src = write_tiff(tmp_path / "noisy.tif", noisy.astype(np.float32))
  den = denoise(noisy.astype(np.float32), trained_model, output_dtype="float32",
                brightness=brightness)
  est = write_tiff(tmp_path / "den.tif", den)
  model = Denoiser(trained_model)
  paths, record = write_calibrated_uncertainty(
      src, model, est, str(tmp_path / "den.tif"), segment_frames=16, draws=4,
      keep_samples=True, brightness=brightness)
  assert [s["frames"] for s in record["segments"]] == [[0, 16], [16, 32], [32, 48]]
  assert record["segments"][1]["read"] == [12, 36]  # half the tiny model's 8-frame patch
  assert "3 segments of about 16 frames" in describe(record, paths)
  std = open_movie(paths[0]).read(0, 48)
  assert std.shape == (48, 24, 24) and np.isfinite(std).all() and (std > 0).all()
  assert [open_movie(p).shape[0] for p in paths[2:]] == [48] * 4
  whole_paths, whole = write_calibrated_uncertainty(
      src, model, est, str(tmp_path / "whole.tif"), draws=4, brightness=brightness)
  assert "segments" not in whole
  ratio = std.mean() / open_movie(whole_paths[0]).read(0, 48).mean()
  assert 0.7 < ratio < 1.4
  saved = json.load(open(paths[1]))
  assert len(saved["segments"]) == 3 and saved["samples_files"] == paths[2:]


def test_denoise_splits_a_recording_over_the_memory_into_segments(tmp_path, monkeypatch,
                                                                  capsys, trained_model):
  from deepcad_jax.analysis.uncertainty import bootstrap, files as uncertainty_files
  from deepcad_jax.runtime import resources
  noisy, _ = noisy_movie((48, 24, 24), seed=8)
  src = write_tiff(tmp_path / "noisy.tif", noisy.astype(np.float32))
  frame = 24 * 24 * (bootstrap.BYTES_PER_VOXEL + 8 * 2)
  # 8 GiB available, of which the share holds 32 frames of this work: segments of 24
  # read with 4 frames of context either side, so 2 segments
  monkeypatch.setattr(resources, "host_available_bytes", lambda: 8 << 30)
  monkeypatch.setattr(uncertainty_files, "SEGMENT_MEMORY_SHARE", 32.5 * frame / (8 << 30))
  out = str(tmp_path / "den.tif")
  assert cli.main(["deepcad-jax", "denoise", "--model", trained_model, "--input", src,
                   "--output", out, "--uncertainty", "calibrated", "--draws", "4",
                   "--brightness", "model"]) == 0
  said = capsys.readouterr().out
  assert "2 segments of about 24 frames" in said, said
  record = json.load(open(tmp_path / "den_uncertainty.json"))
  assert [s["frames"] for s in record["segments"]] == [[0, 24], [24, 48]]
  assert open_movie(std_path(out)).shape == (48, 24, 24)
  monkeypatch.setattr(uncertainty_files, "SEGMENT_MEMORY_SHARE", 4 * frame / (8 << 30))
  assert cli.main(["deepcad-jax", "denoise", "--model", trained_model, "--input", src,
                   "--output", str(tmp_path / "x.tif"), "--uncertainty", "calibrated",
                   "--overwrite"]) != 0
  captured = capsys.readouterr()
  assert "needs at least" in captured.err and "for segments of 12 frames" in captured.err


def test_a_folder_rerun_writes_the_uncertainty_a_stopped_run_did_not(tmp_path, capsys,
                                                                     trained_model):
  folder = tmp_path / "movies"
  folder.mkdir()
  for name, seed in (("a.tif", 1), ("b.tif", 2)):
    write_tiff(folder / name, noisy_movie((16, 24, 24), seed=seed)[0].astype(np.float32))
  out = tmp_path / "out"
  args = ["deepcad-jax", "denoise", "--model", trained_model, "--input", str(folder),
          "--output", str(out), "--uncertainty", "calibrated", "--draws", "2",
          "--bias-probes", "0"]
  assert cli.main(args) == 0
  capsys.readouterr()
  kept = {p: os.stat(out / p).st_mtime_ns for p in ("a.tif", "a_std.tif", "b.tif")}
  b_std = open_movie(str(out / "b_std.tif")).read(0, 16)
  os.remove(out / "b_std.tif")
  os.remove(out / "b_uncertainty.json")  # as a run stopped between the two leaves it
  assert cli.main(args) == 0
  said = capsys.readouterr().out
  assert f"{out / 'b.tif'} is complete; its calibrated uncertainty is missing" in said
  assert "a_std.tif" not in said
  assert {p: os.stat(out / p).st_mtime_ns for p in kept} == kept
  np.testing.assert_allclose(open_movie(str(out / "b_std.tif")).read(0, 16), b_std,
                             rtol=1e-5, atol=1e-6)
  assert json.load(open(out / "b_uncertainty.json"))["std"] == str(out / "b_std.tif")
  assert cli.main(args) == 0  # all there: nothing more to do
  assert "calibrated uncertainty" not in capsys.readouterr().out


def test_denoise_refuses_before_denoising_what_the_uncertainty_cannot_do(tmp_path, capsys,
                                                                         trained_model):
  noisy, _ = noisy_movie((16, 24, 24), seed=3)
  src = write_tiff(tmp_path / "noisy.tif", noisy.astype(np.float32))
  out = tmp_path / "den.tif"
  (tmp_path / "den_sample01.tif").write_bytes(b"mine")
  assert cli.main(["deepcad-jax", "denoise", "--model", trained_model, "--input", src,
                   "--output", str(out), "--uncertainty", "calibrated", "--draws", "2",
                   "--save-samples"]) == 2
  assert "den_sample01.tif already exists" in capsys.readouterr().err
  assert not out.exists() and (tmp_path / "den_sample01.tif").read_bytes() == b"mine"


@pytest.mark.formats
def test_calibrated_uncertainty_of_planes_in_one_hdf5_file_gets_a_file_per_plane(
    tmp_path, capsys, trained_model):
  h5py = pytest.importorskip("h5py")
  movie, _ = noisy_movie((16, 24, 24), seed=4)
  src = tmp_path / "vol.h5"
  with h5py.File(src, "w") as f:
    f["data"] = np.stack([movie, movie[::-1]], 1).astype(np.float32)  # (T, Z, Y, X)
    for i, label in enumerate("tzyx"):
      f["data"].dims[i].label = label
  out = tmp_path / "den.h5"
  args = ["deepcad-jax", "denoise", "--model", trained_model, "--input", str(src),
          "--output", str(out), "--uncertainty", "calibrated", "--draws", "2",
          "--bias-probes", "0"]
  assert cli.main(args) == 0, capsys.readouterr().err
  for plane in (0, 1):  # the denoised planes share den.h5; each uncertainty is whole
    assert open_movie(str(tmp_path / f"den_plane{plane}_std.h5")).shape == (16, 24, 24)
    record = json.load(open(tmp_path / f"den_plane{plane}_uncertainty.json"))
    assert record["std"] == str(tmp_path / f"den_plane{plane}_std.h5")
  assert cli.main(args) == 2  # refused, not half-done: den.h5 is there
  assert "already exists" in capsys.readouterr().err
