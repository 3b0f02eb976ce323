"""Ensembles (members trained together) and the mean-image prior, end to end."""

import dataclasses

import jax
import numpy as np
import pytest

from tests.helpers import noisy_movie, tiny_config, write_tiff
from deepcad_jax import Denoiser, UserError, cli, denoise, load_model
from deepcad_jax import train
from deepcad_jax import config as config_lib
from deepcad_jax.runtime import parallel
from deepcad_jax.model_io.checkpoint import Model
from deepcad_jax.data import open_movie
from deepcad_jax.training.pairs import PairSource
from deepcad_jax.denoising.outputs import sample_path, std_path
from deepcad_jax.core.network import UNet3D, ensemble_params, member, network_input, over_members
from deepcad_jax.stream import StreamDenoiser
from deepcad_jax.training.loop import _adopt
from deepcad_jax.training.step import compile_step, create_state, make_model


def _batch(n=2, shape=(8, 16, 16), seed=0, prior=False):
  rng = np.random.default_rng(seed)
  batch = {"input": rng.normal(size=(n,) + shape).astype(np.float32),
           "target": rng.normal(size=(n,) + shape).astype(np.float32)}
  if prior:
    batch["prior"] = rng.normal(size=(n,) + shape[1:]).astype(np.float32)
  return batch


def _steps(cfg, batch, devices, n=2, spatial=1):
  mesh = parallel.data_mesh(devices, spatial)
  m = cfg.model
  state = jax.device_put(create_state(cfg), parallel.replicated(mesh))
  step = compile_step(make_model(cfg), mesh, m.ensemble, m.ensemble_impl, m.mean_prior)
  batch = jax.device_put(batch, parallel.pair_shardings(mesh, m.mean_prior))
  for _ in range(n):
    state, metrics = step(state, batch, jax.random.key(3))
  return jax.device_get(state.params), float(metrics["loss"])


@pytest.mark.slow
def test_ensemble_member_zero_is_the_single_model_and_members_differ(devices):
  batch = _batch()
  single, single_loss = _steps(tiny_config(), batch, devices[:1])
  ens, ens_loss = _steps(tiny_config(**{"model.ensemble": 2}), batch, devices[:1])
  assert ens["final"]["kernel"].shape == (2,) + single["final"]["kernel"].shape
  for a, b in zip(jax.tree_util.tree_leaves(single),
                  jax.tree_util.tree_leaves(member(ens, 0))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  k0, k1 = (member(ens, m)["encoder_0"]["conv1"]["kernel"] for m in range(2))
  assert not np.allclose(k0, k1)
  assert np.isfinite(ens_loss) and ens_loss != single_loss  # the members' mean


def test_ensemble_vmap_equals_loop():
  params = ensemble_params(4, 0, members=2, in_channels=2)
  rng = np.random.default_rng(0)
  x = network_input(rng.normal(size=(1, 8, 8, 8)).astype(np.float32),
                    rng.normal(size=(1, 8, 8)).astype(np.float32))
  net = UNet3D(4)

  def outputs(impl):
    return jax.jit(lambda p: over_members(
        lambda q: net.apply({"params": q}, x), 2, impl, p))(params)

  loop, vmap = outputs("loop"), outputs("vmap")
  assert loop.shape == (2, 1, 8, 8, 8, 1)
  np.testing.assert_allclose(loop, vmap, rtol=1e-5, atol=1e-6)
  assert not np.allclose(loop[0], loop[1])


@pytest.mark.slow
def test_prior_step_split_over_data_and_space_equals_one_device(devices):
  batch = _batch(shape=(8, 32, 16), prior=True)
  cfg = tiny_config(**{"model.mean_prior": True})
  one, loss_one = _steps(cfg, batch, devices[:1])
  split, loss_split = _steps(cfg, batch, devices, spatial=2)  # 2 data x 2 space
  assert loss_one == pytest.approx(loss_split, rel=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(split)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_prior_pairs_carry_the_mean_image_crop(tmp_path):
  movie, _ = noisy_movie((40, 24, 24))
  m = open_movie(write_tiff(tmp_path / "m.tif", movie))
  src = PairSource([m], (8, 16, 16), 4, seed=1, scale=2.0, prior=True)
  f, t0, y0, x0 = src.position(2)
  pair = src[2]
  image = movie.astype(np.float64).mean(0)
  expected = (image[y0:y0 + 16, x0:x0 + 16] - movie.mean()) / 2.0
  np.testing.assert_allclose(pair["prior"], expected, rtol=1e-5, atol=1e-5)
  assert "prior" not in PairSource([m], (8, 16, 16), 4)[2]


def test_network_input_broadcasts_the_prior_over_time():
  x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
  prior = -np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
  inp = np.asarray(network_input(x, prior))
  assert inp.shape == (2, 3, 4, 4, 2)
  np.testing.assert_array_equal(inp[..., 0], x)
  for t in range(3):
    np.testing.assert_array_equal(inp[:, t, ..., 1], prior)


@pytest.fixture(scope="module")
def prior_ensemble(tmp_path_factory, devices):
  """A 2-member model with the mean-image prior, trained for a few steps."""
  root = tmp_path_factory.mktemp("prior_ensemble")
  movie, _ = noisy_movie((40, 24, 24), seed=5)
  path = write_tiff(root / "movie.tif", movie)
  cfg = tiny_config(**{"train.epochs": 1, "model.ensemble": 2, "model.mean_prior": True})
  train(path, str(root / "run"), cfg, devices=devices[:1], progress=False)
  return str(root / "run")


def _single_member(model: Model, m: int) -> Model:
  cfg = config_lib.override(model.config, **{"model.ensemble": 1})
  return dataclasses.replace(model, params=member(model.params, m),
                             meta=model.meta.replace(config=cfg))


def test_prior_ensemble_trains_saves_loads_and_denoises(prior_ensemble, devices):
  model = load_model(prior_ensemble)
  assert model.meta["mean_prior"] and model.meta["ensemble"] == 2
  assert model.config.model.mean_prior and model.config.model.ensemble == 2
  kernel = model.params["encoder_0"]["conv1"]["kernel"]
  assert kernel.shape[0] == 2 and kernel.shape[-2] == 2  # members x two input channels
  movie, _ = noisy_movie((24, 24, 24), seed=7)
  out = denoise(movie, model, output_dtype="float32", devices=devices[:1],
                brightness="model")
  # The ensemble's output is the mean of its members' outputs.
  parts = [denoise(movie, _single_member(model, m), output_dtype="float32",
                   devices=devices[:1], brightness="model") for m in range(2)]
  np.testing.assert_allclose(out, (parts[0] + parts[1]) / 2, rtol=1e-4, atol=1e-3)
  # The prior channel is used: another mean image gives another result.
  den = Denoiser(model, devices=devices[:1])
  from deepcad_jax.data.movie import as_movie
  other = np.concatenate(list(den.blocks(as_movie(movie),
                                         prior=np.zeros(movie.shape[1:], np.float32))))
  assert np.abs(other - out).max() > 1e-3


def test_members_spread_and_samples(prior_ensemble, devices):
  model = load_model(prior_ensemble)
  movie, _ = noisy_movie((24, 24, 24), seed=8)
  mean, std, samples = denoise(movie, model, output_dtype="float32", symmetries=2,
                               save_samples=True, devices=devices[:1])
  assert samples.shape == (4,) + movie.shape  # 2 symmetries x 2 members
  np.testing.assert_allclose(mean, samples.mean(0), rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(std, samples.std(0, ddof=1), rtol=1e-4, atol=1e-3)
  only_members, spread = denoise(movie, model, output_dtype="float32", symmetries=1,
                                 devices=devices[:1])
  assert spread.min() >= 0 and spread.mean() > 0  # the members disagree
  with pytest.raises(UserError, match="--uncertainty takes 1 to 8"):
    Denoiser(model, symmetries=9)
  with pytest.raises(UserError, match="--save-samples"):
    Denoiser(model, save_samples=True)


def test_stream_with_the_mean_image_equals_offline(prior_ensemble, devices):
  from deepcad_jax.data.movie import as_movie
  model = load_model(prior_ensemble)
  movie, _ = noisy_movie((30, 24, 24), seed=9)
  mean = float(movie.mean())
  den = Denoiser(model, patch=(16,) + model.patch[1:], devices=devices[:1])
  offline = np.concatenate(list(den.blocks(as_movie(movie), mean=mean)))
  stream = StreamDenoiser(den, mean=mean, mean_image=movie.astype(np.float64).mean(0))
  for t in range(0, 30, 7):
    stream.push(movie[t:t + 7])
  stream.close()
  np.testing.assert_allclose(stream.pull(), offline, rtol=1e-5, atol=1e-3)
  # Without a mean image the stream uses the running mean image and still runs.
  running = StreamDenoiser(den, mean="running")
  running.push(movie)
  running.close()
  assert running.pull().shape == movie.shape


def test_adding_a_prior_to_a_single_channel_model_starts_from_the_same_function(
    trained_model):
  start = load_model(trained_model)
  cfg, params = _adopt(tiny_config(**{"model.mean_prior": True}), start)
  assert cfg.model.mean_prior
  assert params["encoder_0"]["conv1"]["kernel"].shape[-2] == 2
  net = UNet3D(start.features)
  x = np.random.default_rng(0).normal(size=(1, 8, 16, 16)).astype(np.float32)
  prior = np.random.default_rng(1).normal(size=(1, 16, 16)).astype(np.float32)
  with_prior = net.apply({"params": params}, network_input(x, prior))
  without = net.apply({"params": start.params}, network_input(x))
  np.testing.assert_allclose(with_prior, without, rtol=1e-5, atol=1e-6)
  with pytest.raises(UserError, match="same --ensemble"):
    _adopt(tiny_config(**{"model.ensemble": 2}), start)


def test_resume_refuses_another_prior_or_ensemble(tmp_path, devices):
  movie, _ = noisy_movie((40, 24, 24))
  path = write_tiff(tmp_path / "m.tif", movie)
  cfg = tiny_config(**{"train.epochs": 1, "data.pairs_per_epoch": 2})
  train(path, str(tmp_path / "run"), cfg, devices=devices[:1], progress=False)
  for change in ({"model.mean_prior": True}, {"model.ensemble": 2}):
    with pytest.raises(UserError, match="model.(mean_prior|ensemble)"):
      train(path, str(tmp_path / "run"), config_lib.override(cfg, **change),
            devices=devices[:1], progress=False)


@pytest.mark.slow
def test_cli_trains_an_ensemble_with_prior_and_writes_samples(tmp_path, capsys):
  movie, _ = noisy_movie((40, 24, 24), seed=2)
  src = write_tiff(tmp_path / "m.tif", movie)
  run = str(tmp_path / "run")
  assert cli.main(["deepcad-jax", "train", "--data", src, "--workdir", run, "--config",
                   "tiny", "--epochs", "1", "--pairs-per-epoch", "4", "--ensemble", "2",
                   "--mean-prior"]) == 0
  meta = load_model(run).meta
  assert meta["ensemble"] == 2 and meta["mean_prior"]
  out = str(tmp_path / "den.tif")
  assert cli.main(["deepcad-jax", "denoise", "--model", run, "--input", src, "--output",
                   out, "--uncertainty", "2", "--save-samples"]) == 0
  text = capsys.readouterr().out
  assert "2 symmetries x 2 members" in text and "_sample00.tif" in text
  samples = [open_movie(sample_path(out, i)).read(0, 40) for i in range(4)]
  std = open_movie(std_path(out)).read(0, 40)
  np.testing.assert_allclose(std, np.std(samples, axis=0, ddof=1), rtol=1e-4, atol=1e-3)
  assert not (tmp_path / "den_sample04.tif").exists()
  # Outputs are never overwritten unasked, samples included.
  (tmp_path / "den.tif").unlink()
  (tmp_path / "den_std.tif").unlink()
  assert cli.main(["deepcad-jax", "denoise", "--model", run, "--input", src, "--output",
                   out, "--uncertainty", "2", "--save-samples"]) == 2
  assert "_sample00.tif" in capsys.readouterr().err


def test_cli_stream_gives_a_prior_model_the_mean_image(prior_ensemble, tmp_path, capsys):
  from deepcad_jax.data.movie import as_movie
  movie, _ = noisy_movie((30, 24, 24), seed=12)
  src = write_tiff(tmp_path / "movie.tif", movie)
  image = write_tiff(tmp_path / "mean.tif", movie.astype(np.float64).mean(0).astype(
      np.float32))
  out = str(tmp_path / "live.tif")
  mean = float(movie.mean())
  assert cli.main(["deepcad-jax", "stream", "--model", prior_ensemble, "--source", src,
                   "--output", out, "--rate", "0", "--preview-every", "0", "--mean",
                   str(mean), "--mean-image", image]) == 0, capsys.readouterr().err
  den = Denoiser(load_model(prior_ensemble))
  offline = np.concatenate(list(den.blocks(as_movie(movie), mean=mean)))
  np.testing.assert_allclose(open_movie(out).read(0, 30), offline, rtol=1e-5, atol=1e-3)
  assert cli.main(["deepcad-jax", "stream", "--model", prior_ensemble, "--source", src,
                   "--output", str(tmp_path / "x.tif"), "--mean-image",
                   str(tmp_path / "missing.tif")]) == 2
  assert "missing.tif does not exist" in capsys.readouterr().err
