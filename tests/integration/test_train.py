import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import noisy_movie, tiny_config, write_tiff
from deepcad_jax import UserError, load_model
from deepcad_jax import train
from deepcad_jax.runtime import parallel
from deepcad_jax.data import open_movie
from deepcad_jax.training.pairs import PairSource
from deepcad_jax.core.losses import loss_fn
from deepcad_jax.training.step import compile_step, create_state, make_model


def test_loss_is_half_l1_plus_half_l2():
  out = jnp.array([1.0, 2.0, 4.0])
  target = jnp.array([0.0, 4.0, 4.0])
  # |d| = 1, 2, 0 -> mean 1; d^2 = 1, 4, 0 -> mean 5/3
  assert float(loss_fn(out, target, "deepcad")) == pytest.approx(0.5 * 1 + 0.5 * 5 / 3)
  # The default, l2: the mean squared error alone.
  assert float(loss_fn(out, target)) == pytest.approx(5 / 3)


def _batch(n=4, shape=(8, 16, 16), seed=0):
  rng = np.random.default_rng(seed)
  return {"input": rng.normal(size=(n,) + shape).astype(np.float32),
          "target": rng.normal(size=(n,) + shape).astype(np.float32)}


@pytest.mark.slow
def test_sharded_step_equals_single_device_step(devices):
  cfg = tiny_config()
  batch = _batch()
  key = jax.random.key(0)
  results = []
  for devs in (devices[:1], devices):
    mesh = parallel.data_mesh(devs)
    state = jax.device_put(create_state(cfg), parallel.replicated(mesh))
    step = compile_step(make_model(cfg), mesh)
    sharded = jax.device_put(batch, parallel.batch_sharding(mesh))
    for _ in range(2):
      state, metrics = step(state, sharded, key)
    if len(devs) == 4:
      assert len(metrics["loss"].sharding.device_set) == 4
      assert state.params["final"]["kernel"].sharding.is_fully_replicated
    results.append((float(metrics["loss"]), jax.device_get(state.params)))
  (loss1, p1), (loss4, p4) = results
  assert loss1 == pytest.approx(loss4, rel=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p4)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture
def movie_path(tmp_path):
  movie, _ = noisy_movie((40, 24, 24))
  return write_tiff(tmp_path / "movie.tif", movie)


def _params(result):
  return jax.tree_util.tree_leaves(jax.device_get(result.state.params))


def test_loss_decreases_on_a_noisy_movie(tmp_path, movie_path, devices):
  cfg = tiny_config(**{"train.epochs": 4, "data.pairs_per_epoch": 24})
  losses = []
  result = train(movie_path, str(tmp_path / "run"), cfg, devices=devices[:1],
                 progress=False, on_step=lambda step, loss: losses.append(loss))
  assert len(losses) == 96
  # Loss on a fixed set of pairs (no augmentation), before and after training.
  source = PairSource([open_movie(movie_path)], result.patch, length=16, seed=99)
  pairs = [source[i] for i in range(16)]
  x = jnp.stack([p["input"] for p in pairs])[..., None]
  y = jnp.stack([p["target"] for p in pairs])[..., None]
  model = make_model(cfg)

  def held_out(params):
    return float(loss_fn(jax.jit(model.apply)({"params": params}, x), y))

  before = held_out(create_state(cfg).params)
  after = held_out(jax.device_get(result.state.params))
  assert after < 0.7 * before  # measured: 287 -> 135


def test_data_parallel_training_on_four_devices(tmp_path, movie_path, devices):
  result = train(movie_path, str(tmp_path / "run"), tiny_config(), devices=devices,
                 progress=False)
  assert result.meta["batch_size"] == 4 and result.step == 8  # 16 pairs / 4 per step x 2
  with pytest.raises(UserError, match="not a multiple of the 4 devices"):
    train(movie_path, str(tmp_path / "run2"), tiny_config(**{"train.batch_size": 6}),
          devices=devices, progress=False)


@pytest.mark.slow
def test_interrupt_and_resume_equals_uninterrupted(tmp_path, movie_path, devices):
  cfg = tiny_config(**{"train.epochs": 2})
  full = train(movie_path, str(tmp_path / "full"), cfg, devices=devices[:1], progress=False)

  # Ctrl-C at step 5, then SLURM's preemption signal (SIGTERM) at step 9 of the resumed
  # run: each stops at the step boundary with a checkpoint there.
  for sig, at in ((signal.SIGINT, 5), (signal.SIGTERM, 9)):
    def send(step, loss, sig=sig, at=at):
      if step == at:
        os.kill(os.getpid(), sig)

    part = train(movie_path, str(tmp_path / "part"), cfg, devices=devices[:1],
                 progress=False, on_step=send)
    assert part.interrupted and part.step == at
    assert load_model(str(tmp_path / "part")).meta["step"] == at
  resumed = train(movie_path, str(tmp_path / "part"), cfg, devices=devices[:1],
                  progress=False)
  assert resumed.step == full.step == 32 and not resumed.interrupted
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_more_epochs_resume_from_the_last_checkpoint(tmp_path, movie_path, devices):
  two = train(movie_path, str(tmp_path / "two"), tiny_config(**{"train.epochs": 2}),
              devices=devices[:1], progress=False)
  run = str(tmp_path / "one")
  one = train(movie_path, run, tiny_config(**{"train.epochs": 1}), devices=devices[:1],
              progress=False)
  assert one.step == 16
  again = train(movie_path, run, tiny_config(**{"train.epochs": 1}), devices=devices[:1],
                progress=False)
  assert again.step == 16 and again.losses == []  # nothing to do
  more = train(movie_path, run, tiny_config(**{"train.epochs": 2}), devices=devices[:1],
               progress=False)
  for a, b in zip(_params(two), _params(more)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_workdir_of_another_model_is_an_error(tmp_path, movie_path, devices):
  run = str(tmp_path / "run")
  train(movie_path, run, tiny_config(**{"train.epochs": 1}), devices=devices[:1],
        progress=False)
  with pytest.raises(UserError, match="features=4.*features=8.*--fresh"):
    train(movie_path, run, tiny_config(**{"model.features": 8}), devices=devices[:1],
          progress=False)
  fresh = train(movie_path, run, tiny_config(**{"model.features": 8, "train.epochs": 1}),
                devices=devices[:1], progress=False, fresh=True)
  assert fresh.step == 16 and load_model(run).features == 8


def test_small_movies_train_with_a_smaller_patch(tmp_path, devices, caplog):
  movie, _ = noisy_movie((20, 12, 40))
  path = write_tiff(tmp_path / "small.tif", movie)
  result = train(path, str(tmp_path / "run"), tiny_config(**{"train.epochs": 1}),
                 devices=devices[:1], progress=False)
  assert result.patch == (8, 8, 16)
  assert "patch reduced from (8, 16, 16) to (8, 8, 16) to fit the data" in caplog.text
  assert load_model(str(tmp_path / "run")).patch == (8, 8, 16)


@pytest.mark.slow
def test_spatial_sharding_gives_the_same_step(devices):
  cfg = tiny_config()
  batch = _batch(n=2, shape=(8, 32, 16))  # 2 rows per device at the deepest level
  model = make_model(cfg)
  params = create_state(cfg).params

  def loss_and_grads(p, b):
    # Gradients of the smooth L2 part: the L1 part's gradient, sign(out - target), flips
    # with float rounding wherever out ~ target, whatever the sharding.
    def l2(q):
      d = model.apply({"params": q}, b["input"][..., None]) - b["target"][..., None]
      return jnp.mean(d * d)
    return jax.value_and_grad(l2)(p)

  results = []
  for devs, spatial in ((devices[:1], 1), (devices, 2)):
    mesh = parallel.data_mesh(devs, spatial)
    sharded = jax.device_put(batch, parallel.batch_sharding(mesh))
    if spatial == 2:
      assert sharded["input"].sharding.shard_shape((2, 8, 32, 16)) == (1, 8, 16, 16)
    repl = parallel.replicated(mesh)
    fn = jax.jit(loss_and_grads, in_shardings=(repl, parallel.batch_sharding(mesh)),
                 out_shardings=repl)
    loss, grads = fn(jax.device_put(params, repl), sharded)
    # The full train step runs on this mesh too.
    state = jax.device_put(create_state(cfg), repl)
    _, metrics = compile_step(model, mesh)(state, sharded, jax.random.key(0))
    results.append((float(loss), jax.device_get(grads), float(metrics["loss"])))
  (l1, g1, s1), (l2, g2, s2) = results
  assert l1 == pytest.approx(l2, rel=1e-5) and s1 == pytest.approx(s2, rel=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.abs(a).max()))
