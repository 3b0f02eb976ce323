"""Issue: training and scoring that work on real recordings, whatever their units.

Unit-independent normalisation, the noise model, the noise-corrected held-out score
(estimated MSE, baselines, verdict), the collapse guard and resume checks.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import tifffile

from tests.helpers import tiny_config, write_tiff
from deepcad_jax import UserError, cli, denoise, load_model, train
from deepcad_jax.analysis import noise as noise_lib
from deepcad_jax.analysis import score as score_lib
from deepcad_jax.model_io.checkpoint import Model, RunMeta, save_model
from deepcad_jax.data.movie import ArrayMovie
from deepcad_jax.analysis.metrics import snr_db
from deepcad_jax.analysis.simulate import simulate
from deepcad_jax.denoising.denoiser import Denoiser
from deepcad_jax.core.network import add_output_offset
from deepcad_jax.training.quality import spread_segments
from deepcad_jax.training.loop import REQUIRE_GAIN_EXIT, TrainResult


# ---------------------------------------------------------------- the noise model


@pytest.mark.parametrize("gain, offset, corr", [(1.0, 0.0, 0.0), (50.0, 300.0, 0.36)])
def test_noise_model_recovers_gain_offset_and_correlation(gain, offset, corr):
  """var = g^2 (photons + read^2) and mean = g photons + c, so a = g and
  b = g^2 read^2 - g c; the x-neighbour correlation is the simulated one."""
  noisy, clean, _ = simulate(shape=(200, 48, 48), snr_db=0.0, noise_correlation=corr,
                             gain=gain, offset=offset, seed=3)
  nm = noise_lib.fit_movie(noisy)
  assert nm.a == pytest.approx(gain, rel=0.08)
  assert nm.b == pytest.approx(gain ** 2 * 1.0 - gain * offset, abs=0.1 * gain ** 2 +
                               0.02 * gain * offset)
  assert nm.corr_x[0] == pytest.approx(corr, abs=0.03)
  assert nm.corr_y[0] == pytest.approx(0.0, abs=0.03)
  true = float(np.mean((noisy.astype(np.float64) - clean) ** 2))
  assert nm.mean_variance == pytest.approx(true, rel=0.02)
  # A box of correlated pixels sums to more than its variances.
  assert nm.box_factor((3, 5, 5)) == pytest.approx(1 + 2 * corr * 4 / 5, abs=0.08)


def test_noise_model_refuses_a_constant_movie():
  with pytest.raises(UserError, match="no frame-to-frame variation"):
    noise_lib.fit_movie(np.full((20, 16, 16), 7.0, np.float32), name="flat.tif")


def test_noise_model_round_trips_through_json():
  nm = noise_lib.fit_movie(simulate(shape=(40, 24, 24), seed=1)[0])
  assert noise_lib.NoiseModel.from_json(json.loads(json.dumps(nm.to_json()))) == nm


# ---------------------------------------------------------------- normalisation


def test_spread_scales_with_gain_and_ignores_offset():
  noisy, _, _ = simulate(shape=(40, 24, 24), seed=2)
  base = ArrayMovie(noisy).spread()
  assert base > 0
  assert ArrayMovie(noisy * 250.0 - 900.0).spread() == pytest.approx(250 * base, rel=1e-5)
  assert ArrayMovie(np.zeros((4, 8, 8), np.float32)).spread() == 0.0


def _affine_variant(noisy: np.ndarray, gain: float, offset: float, dtype) -> np.ndarray:
  values = noisy.astype(np.float64) * gain + offset
  if np.dtype(dtype).kind in "iu":
    info = np.iinfo(dtype)
    assert info.min <= values.min() and values.max() <= info.max  # the test's own check
    return np.round(values).astype(dtype)
  return values.astype(dtype)


@pytest.mark.slow
def test_training_and_denoising_do_not_depend_on_the_units(tmp_path, devices):
  """The same movie at gain 0.01..1000 and offset -1000..+1000, stored as float32,
  uint16 or int16, trained with the same seed and steps, gives the same denoised
  movie up to that affine map: SNR within 0.3 dB of unit gain."""
  noisy, clean, _ = simulate(shape=(48, 24, 24), snr_db=-2.0, seed=5)
  low = float(noisy.min())  # read noise goes below 0: the base movie starts at 0
  noisy, clean = noisy - low, clean - low
  cfg = tiny_config(**{"train.epochs": 2})
  snrs = {}
  for gain, offset, dtype in [(1.0, 0.0, np.float32), (0.01, -1000.0, np.float32),
                              (1000.0, 1000.0, np.float32), (1000.0, 1000.0, np.uint16),
                              (100.0, -1000.0, np.int16)]:
    movie = _affine_variant(noisy, gain, offset, dtype)
    name = f"g{gain:g}_o{offset:g}_{np.dtype(dtype).name}"
    path = write_tiff(tmp_path / f"{name}.tif", movie)
    train(path, str(tmp_path / name), cfg, devices=devices[:1], progress=False)
    out = denoise(path, str(tmp_path / name), output_dtype="float32",
                  devices=devices[:1])
    snrs[name] = snr_db((out.astype(np.float64) - offset) / gain, clean)
  unit = snrs.pop("g1_o0_float32")
  for name, value in snrs.items():
    assert abs(value - unit) <= 0.3, (name, value, unit)


def test_imported_and_old_models_keep_their_fixed_scale():
  """A model recorded before normalisation by spread (no 'scale', no 'normalise') was
  trained with the mean and data.scale, and DeepCAD-RT's loss: it is read as such."""
  cfg = tiny_config()
  meta = RunMeta(config=cfg, patch=(8, 16, 16), mean=3.0).to_json()
  old = json.loads(json.dumps(meta))
  del old["config"]["data"]["normalise"], old["config"]["train"]["loss"], old["scale"]
  old["config"]["data"]["scale"] = 7.0
  read = RunMeta.from_json(old)
  assert read.config.data.normalise == "fixed" and read.config.train.loss == "deepcad"
  model = Model(None, read, "old")
  assert model.scale == 7.0


# ---------------------------------------------------------------- the held-out score


def test_estimated_mse_matches_the_truth_on_a_trained_model(trained_model):
  """The score never sees the clean movie; its noise variance is the true one within
  a few percent, and its estimated MSE (and the baselines') the true MSE."""
  noisy, clean, _ = simulate(shape=(64, 32, 32), snr_db=-2.0, seed=7)
  den = Denoiser(load_model(trained_model), tiling="exact")
  s = score_lib.score(den, noisy)
  true_noise = float(np.mean((noisy.astype(np.float64) - clean) ** 2))
  assert s.noise_variance == pytest.approx(true_noise, rel=0.03)
  assert s.heldout_mse - s.noise_variance == pytest.approx(s.estimated_mse)
  assert s.estimated_mse_ci[0] <= s.estimated_mse <= s.estimated_mse_ci[1]
  even, odd = noisy[0::2].astype(np.float64), noisy[1::2].astype(np.float64)
  truth = 0.5 * sum(
      float(np.mean((p - c) ** 2)) for p, c in (
          (score_lib.baseline_predictions(even, True)["neighbour average"], clean[1::2]),
          (score_lib.baseline_predictions(odd, False)["neighbour average"], clean[0::2])))
  assert s.baselines["neighbour average"] == pytest.approx(truth, rel=0.1)
  assert set(s.baselines) == set(score_lib.BASELINES)


def test_a_constant_model_is_named_collapsed(trained_model, tmp_path):
  """A network whose weights are all zero outputs the mean: `collapsed` in score, and a
  warning in denoise's summary."""
  model = load_model(trained_model)
  zero = model.with_params(jax.tree_util.tree_map(np.zeros_like, model.params))
  noisy, _, _ = simulate(shape=(32, 24, 24), seed=4)
  s = score_lib.score(Denoiser(zero, tiling="exact"), noisy)
  assert s.verdict == score_lib.COLLAPSED
  assert s.warning and "collapsed" in s.warning and "--fresh" in s.warning
  save_model(zero, str(tmp_path / "zero"))
  path = write_tiff(tmp_path / "m.tif", noisy)
  assert cli.main(["deepcad-jax", "denoise", "--model", str(tmp_path / "zero"), "--input",
                   path, "--output", str(tmp_path / "den.tif")]) == 0


def test_score_json_has_the_documented_fields(trained_model, tmp_path, capsys):
  noisy, _, _ = simulate(shape=(40, 24, 24), seed=1)
  path = write_tiff(tmp_path / "m.tif", noisy)
  out = tmp_path / "score.json"
  assert cli.main(["deepcad-jax", "score", "--model", trained_model, "--movie", path,
                   "--json", str(out)]) == 0
  d = json.loads(out.read_text())
  for key in ("heldout_mse", "noise_variance", "estimated_mse", "estimated_mse_ci",
              "baselines", "verdict", "noise_model"):
    assert key in d
  assert d["verdict"] in score_lib.VERDICTS
  assert set(d["baselines"]) == set(score_lib.BASELINES)
  assert "verdict:" in capsys.readouterr().out
  # The JSON is not replaced without --overwrite.
  assert cli.main(["deepcad-jax", "score", "--model", trained_model, "--movie", path,
                   "--json", str(out)]) == 2


def test_training_logs_the_same_score_as_the_score_command(tmp_path, devices):
  noisy, _, _ = simulate(shape=(64, 24, 24), seed=6)
  path = write_tiff(tmp_path / "m.tif", noisy * 40.0 + 100.0)
  result = train(path, str(tmp_path / "run"), tiny_config(**{"data.holdout": 0.25}),
                 devices=devices[:1], progress=False)
  assert result.quality is not None and result.quality.frames == (48, 64)
  model = load_model(str(tmp_path / "run"))
  assert model.meta.holdout_score == pytest.approx(result.quality.estimated_mse)
  again = score_lib.score(Denoiser(model, tiling="exact", devices=devices[:1]), path,
                          score_lib.default_frames(model, ArrayMovie(noisy, path)))
  assert again.estimated_mse == pytest.approx(result.quality.estimated_mse, rel=1e-4)
  assert again.baselines == pytest.approx(result.quality.baselines, rel=1e-6)


def test_require_gain_exit_code():
  weak = score_lib.Score(10.0, 9.0, 1.0, (0.5, 1.5), {"temporal mean": 0.5},
                         score_lib.NO_BETTER, 1.0, 2.0)
  good = dataclasses.replace(weak, baselines={"temporal mean": 2.0},
                             verdict=score_lib.BETTER)
  base = dict(workdir="w", state=None, step=1, total_steps=1, losses=[],
              interrupted=False, patch=(8, 8, 8), meta=None)
  assert TrainResult(**base, quality=weak, require_gain=True).exit_code == REQUIRE_GAIN_EXIT
  assert TrainResult(**base, quality=weak).exit_code == 0
  assert TrainResult(**base, quality=good, require_gain=True).exit_code == 0
  assert "no better than a baseline" in TrainResult(**base, quality=weak).describe()


# ---------------------------------------------------------------- resuming


@pytest.mark.slow
@pytest.mark.parametrize("first, then, named", [
    (["--normalise", "fixed", "--scale", "100"], ["--normalise", "fixed"], "data.scale"),
    (["--normalise", "fixed"], [], "data.normalise"),
    (["--loss", "deepcad"], [], "train.loss"),
    (["--holdout", "0.25"], [], "data.holdout"),
])
def test_resume_refuses_changed_settings(tmp_path, capsys, first, then, named):
  noisy, _, _ = simulate(shape=(64, 24, 24), seed=8)
  path = write_tiff(tmp_path / "m.tif", noisy)
  base = ["deepcad-jax", "train", "--config", "tiny", "--data", path, "--workdir",
          str(tmp_path / "run"), "--epochs", "1"]
  assert cli.main(base + first) == 0
  capsys.readouterr()
  assert cli.main(base + ["--epochs", "2"] + then) == 2
  err = capsys.readouterr().err
  assert named in err and "--fresh" in err and "Traceback" not in err


def test_brightness_segments_count_only_frames_with_their_context():
  """A short movie is one segment; a long one gets segments whose context fits."""
  assert spread_segments(300, 4, 64, context=32) == [(0, 300)]
  segments = spread_segments(2000, 4, 64, context=32)
  assert len(segments) == 4 and all(b - a == 64 for a, b in segments)
  assert segments[0][0] == 0 and segments[-1][1] == 2000


def test_the_denoised_movie_keeps_the_raw_mean(trained_model):
  """The brightness offset fitted at the end of training makes the denoised training
  movie's mean the raw one's (the tiny model alone is several percent off)."""
  model = load_model(trained_model)
  noisy = tifffile.imread(os.path.join(os.path.dirname(trained_model), "movie.tif"))
  out = denoise(noisy, Denoiser(model, tiling="exact"), brightness="model"
                ).astype(np.float64)
  assert abs(out.mean() / noisy.astype(np.float64).mean() - 1) < 0.01
  raw_model = model.with_params(add_output_offset(
      model.params, -model.meta.provenance["output_offset_applied"]))
  without = denoise(noisy, Denoiser(raw_model, tiling="exact"), brightness="model"
                    ).astype(np.float64)
  assert abs(without.mean() / noisy.mean() - 1) > abs(out.mean() / noisy.mean() - 1)


# ---------------------------------------------------------------- regional brightness


def test_the_regional_correction_is_one_static_image(trained_model):
  """`brightness='regional'` (the default) adds one image to every frame of the
  network's output (`'model'`), and keeps the raw movie's mean."""
  noisy = tifffile.imread(os.path.join(os.path.dirname(trained_model), "movie.tif"))
  den = Denoiser(load_model(trained_model), tiling="exact")
  plain = denoise(noisy, den, brightness="model").astype(np.float64)
  regional = denoise(noisy, den).astype(np.float64)
  diff = regional - plain
  assert np.allclose(diff, diff[:1], atol=1e-4)
  assert np.abs(diff).max() > 0
  assert regional.mean() == pytest.approx(noisy.astype(np.float64).mean(), rel=1e-4)


def test_denoise_cli_reports_the_correction_and_leaves_no_temporary_file(
    trained_model, tmp_path, capsys):
  noisy = tifffile.imread(os.path.join(os.path.dirname(trained_model), "movie.tif"))
  path = write_tiff(tmp_path / "in.tif", noisy)
  out = tmp_path / "out"
  out.mkdir()
  base = ["deepcad-jax", "denoise", "--model", trained_model, "--input", path,
          "--tiling", "exact"]
  assert cli.main(base + ["--output", str(out / "regional.tif")]) == 0
  assert "brightness: " in capsys.readouterr().out
  assert cli.main(base + ["--output", str(out / "model.tif"), "--brightness",
                          "model"]) == 0
  assert "brightness: " not in capsys.readouterr().out
  assert cli.main(base + ["--output", str(out / "u16.tif"), "--output-dtype",
                          "uint16"]) == 0
  assert sorted(os.listdir(out)) == ["model.tif", "regional.tif", "u16.tif"]
  den = Denoiser(load_model(trained_model), tiling="exact")
  regional = tifffile.imread(out / "regional.tif")
  assert np.allclose(tifffile.imread(out / "model.tif"),
                     denoise(noisy, den, brightness="model"), atol=1e-5)
  assert np.allclose(regional, denoise(noisy, den), atol=1e-4)
  u16 = tifffile.imread(out / "u16.tif")
  assert u16.dtype == np.uint16 and np.abs(u16 - regional).max() <= 0.5 + 1e-3
