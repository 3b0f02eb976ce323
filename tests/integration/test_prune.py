import jax
import numpy as np
import pytest

from tests.helpers import noisy_movie, tiny_config, write_tiff
from deepcad_jax import Denoiser, UserError, cli, denoise, load_model
from deepcad_jax import train
from deepcad_jax.model_io.convert import save_model
from deepcad_jax.core.network import (LAYERS, UNet3D, flops_per_voxel, init_params, param_count,
                                      uniform_widths, widths_of)
from deepcad_jax.research.prune import choose_channels, l1_scores, parameters, prune, prune_params


def test_explicit_widths_generalise_the_uniform_network():
  assert uniform_widths(16) == (8, 16, 16, 32, 32, 64, 64, 128, 64, 64, 32, 32, 16, 16)
  assert param_count(init_params(16, 0)) == 1_020_337
  assert parameters(uniform_widths(16)) == 1_020_337
  assert param_count(init_params(64, 0, widths=uniform_widths(64))) == 16_315_585
  widths = (3, 5, 4, 9, 7, 11, 6, 13, 10, 8, 6, 7, 5, 2)
  params = init_params(4, 0, widths=widths)
  assert widths_of(params) == widths and param_count(params) == parameters(widths)
  out = UNet3D(4, widths=widths).apply({"params": params}, np.zeros((1, 16, 16, 16, 1)))
  assert out.shape == (1, 16, 16, 16, 1)
  # FLOPs: the f=16 network does 113,216 per voxel (2 x multiply-adds).
  assert flops_per_voxel(uniform_widths(16)) == pytest.approx(113_216)


def test_keeping_everything_is_the_same_function(trained_model):
  model = load_model(trained_model)
  pruned, report = prune(model, 1.0)
  assert report.widths_after == report.widths_before and pruned.config.model.widths is None
  movie, _ = noisy_movie((24, 24, 24), seed=2)
  one = jax.devices()[:1]
  np.testing.assert_array_equal(denoise(movie, pruned, output_dtype="float32", devices=one),
                                denoise(movie, model, output_dtype="float32", devices=one))


@pytest.mark.parametrize("keep", [0.7, 0.4, 0.15])
def test_pruning_gives_valid_smaller_networks(trained_model, keep):
  model = load_model(trained_model)
  pruned, report = prune(model, keep)
  assert report.parameters_after <= keep * report.parameters_before
  assert report.parameters_after == param_count(pruned.params)
  assert widths_of(pruned.params) == pruned.config.model.widths
  assert all(w >= 1 for w in pruned.config.model.widths)
  movie, _ = noisy_movie((20, 24, 24), seed=3)
  out = denoise(movie, pruned, output_dtype="float32", devices=jax.devices()[:1])
  assert out.shape == movie.shape and np.isfinite(out).all()


def test_skip_channels_are_pruned_in_both_consumers():
  params = jax.tree_util.tree_map(np.asarray, init_params(4, 0))
  keep = {layer: np.arange(w) for layer, w in zip(LAYERS, uniform_widths(4))}
  keep[("encoder_1", "conv2")] = np.array([0, 3, 5])   # the skip of decoder_1
  keep[("encoder_3", "conv2")] = np.array([1, 2])      # upsampled into decoder_2
  out = prune_params(params, keep)
  assert out["encoder_1"]["conv2"]["kernel"].shape[-1] == 3
  assert out["encoder_2"]["conv1"]["kernel"].shape[-2] == 3      # next level's input
  assert out["decoder_1"]["conv1"]["kernel"].shape[-2] == 3 + 16  # skip + upsampled
  assert out["decoder_2"]["conv1"]["kernel"].shape[-2] == 16 + 2
  np.testing.assert_array_equal(out["decoder_1"]["conv1"]["kernel"][..., 1, :],
                                params["decoder_1"]["conv1"]["kernel"][..., 3, :])
  x = np.random.default_rng(0).normal(size=(1, 16, 16, 16, 1)).astype(np.float32)
  assert np.isfinite(UNet3D(4, widths=widths_of(out)).apply({"params": out}, x)).all()


def test_the_least_important_channels_go_first():
  params = jax.tree_util.tree_map(np.asarray, init_params(4, 0))
  scores = l1_scores(params)
  scores[("decoder_0", "conv1")] = np.array([1.0, 1.0, 0.0, 1.0])  # one useless channel
  kept = choose_channels(scores, 0.999)
  assert list(kept[("decoder_0", "conv1")]) == [0, 1, 3]
  with pytest.raises(UserError, match="--keep is the fraction of parameters"):
    choose_channels(scores, 0.0)


def test_taylor_pruning_keeps_what_the_loss_uses(trained_model):
  model = load_model(trained_model)
  movie, _ = noisy_movie((40, 24, 24), seed=4)
  pruned, report = prune(model, 0.5, "taylor", movie, batches=2)
  assert report.parameters_after <= 0.5 * report.parameters_before
  with pytest.raises(UserError, match="--criterion taylor needs --data"):
    prune(model, 0.5, "taylor")
  with pytest.raises(UserError, match="--criterion must be one of"):
    prune(model, 0.5, "random")


@pytest.mark.slow
def test_a_pruned_model_saves_loads_denoises_and_fine_tunes(trained_model, tmp_path):
  model = load_model(trained_model)
  pruned, _ = prune(model, 0.5)
  path = save_model(pruned, str(tmp_path / "pruned"))
  loaded = load_model(path)
  assert loaded.config.model.widths == pruned.config.model.widths
  movie, _ = noisy_movie((40, 24, 24), seed=5)
  src = write_tiff(tmp_path / "movie.tif", movie)
  one = jax.devices()[:1]
  np.testing.assert_allclose(denoise(movie, loaded, output_dtype="float32", devices=one),
                             denoise(movie, pruned, output_dtype="float32", devices=one),
                             rtol=1e-6, atol=1e-5)
  result = train(src, str(tmp_path / "tuned"), tiny_config(**{"train.epochs": 1}),
                 init_from=path, devices=one, progress=False)
  tuned = load_model(result.workdir)
  assert tuned.config.model.widths == pruned.config.model.widths
  assert widths_of(tuned.params) == pruned.config.model.widths
  # The stream and the overlap scheme take it like any model.
  out = denoise(movie, Denoiser(tuned, tiling="overlap", devices=one), output_dtype="float32")
  assert np.isfinite(out).all()


def test_prune_cli(capsys, tmp_path, trained_model):
  out = str(tmp_path / "p")
  assert cli.main(["deepcad-jax", "prune", "--model", trained_model, "--keep", "0.5",
                   "--output", out]) == 0
  text = capsys.readouterr().out
  assert "parameters" in text and "FLOPs per voxel" in text and "--init-from" in text
  assert cli.main(["deepcad-jax", "prune", "--model", trained_model, "--keep", "0.5",
                   "--output", out]) == 2
  assert "already holds a model" in capsys.readouterr().err
