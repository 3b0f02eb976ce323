"""One training step: the model, its optimiser and state, the jitted step over the mesh
(each member of an ensemble on its own key), and the memory a step needs per device.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from deepcad_jax import config as config_lib
from deepcad_jax.runtime import parallel, resources
from deepcad_jax.core.augment import augment_batch
from deepcad_jax.core.losses import loss_fn
from deepcad_jax.core.network import UNet3D, ensemble_params, network_input, over_members
from deepcad_jax.runtime.files import format_bytes


TrainState = train_state.TrainState


# Lower bounds of a train step's memory per device, to refuse before compiling what
# cannot fit: parameters, gradients and Adam's two moments (float32 copies of every
# parameter), and activations kept for the backward pass (XLA's analysis of the step
# gives about 120 f bytes per patch voxel on the CPU; accelerators need less).
STATE_COPIES = 4


ACTIVATION_BYTES_PER_VOXEL_F = 40.0


TRAIN_FIX = "lower --features, --patch or --batch-size (or add devices)"
COSINE_FLOOR = 0.05  # train.lr_schedule 'cosine' ends at this fraction of the lr


def make_model(cfg: config_lib.Config) -> UNet3D:
  return UNet3D(features=cfg.model.features, dtype=jnp.dtype(cfg.model.dtype),
                widths=cfg.model.widths)


def make_optimizer(cfg: config_lib.TrainConfig, total_steps: int = 0
                   ) -> optax.GradientTransformation:
  """Adam at `cfg.lr`, constant, or ('cosine') decaying to COSINE_FLOOR of it over
  `total_steps`: the late steps then refine instead of jumping around."""
  lr: Any = cfg.lr
  if cfg.lr_schedule == "cosine":
    lr = optax.cosine_decay_schedule(cfg.lr, max(1, total_steps), alpha=COSINE_FLOOR)
  return optax.adam(lr, b1=cfg.b1, b2=cfg.b2)


def create_state(cfg: config_lib.Config, params: Any = None, total_steps: int = 0
                 ) -> TrainState:
  """A fresh train state (random params from the seed, or the given params); an
  ensemble's members are stacked on a leading axis, and Adam, being elementwise,
  updates each on its own."""
  if params is None:
    params = ensemble_params(cfg.model.features, cfg.train.seed, cfg.model.ensemble,
                             cfg.model.in_channels, cfg.model.widths)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  return TrainState.create(apply_fn=make_model(cfg).apply, params=params,
                           tx=make_optimizer(cfg.train, total_steps))


def member_keys(key: jax.Array, members: int) -> jax.Array:
  """One augmentation key per ensemble member; member 0 keeps `key`, so it sees the
  variants a single-model run with the same seed would."""
  return jnp.stack([key] + [jax.random.fold_in(key, 1 << 20 | m) for m in range(1, members)])


def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array,
               model: nn.Module, members: int = 1, impl: str = "loop", loss: str = "l2"
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """Augment the batch, compute the loss and its gradient, and apply Adam.

  With `members` > 1 the parameters are an ensemble stacked on a leading axis: every
  member sees the same pairs under its own augmentation, and the objective is the sum
  of the members' losses, so each member gets exactly its own gradient.

  Args:
    state: the train state (parameters and Adam's state).
    batch: 'input' and 'target' (B, T, Y, X) pairs, and 'prior' (B, Y, X) for a
      mean-prior model.
    key: the run's augmentation key (folded with the step here).
    model: the network (`make_model`).
    members: ensemble members M.
    impl: how the members run: 'loop' or 'vmap' (`network.over_members`).
    loss: the loss's name (`losses.LOSSES`).

  Returns:
    (the updated state, {'loss': the loss, averaged over the members}).
  """
  key = jax.random.fold_in(key, state.step)
  prior = batch.get("prior")

  def member_loss(params, member_key):
    x, y, *p = augment_batch(member_key, batch["input"], batch["target"], prior)
    out = model.apply({"params": params}, network_input(x, p[0] if p else None))
    return loss_fn(out, y[..., None], loss)

  if members == 1:
    loss, grads = jax.value_and_grad(member_loss)(state.params, key)
  else:
    def objective(params):
      losses = over_members(member_loss, members, impl, params,
                            member_keys(key, members))
      return losses.sum(), losses

    (_, losses), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    loss = losses.mean()
  return state.apply_gradients(grads=grads), {"loss": loss}


def compile_step(model: nn.Module, mesh, members: int = 1, impl: str = "loop",
                 prior: bool = False, loss: str = "l2") -> Callable:
  """`train_step` jitted over `mesh`: batch sharded on 'data', state replicated."""
  repl, data = parallel.replicated(mesh), parallel.pair_shardings(mesh, prior)
  return jax.jit(functools.partial(train_step, model=model, members=members, impl=impl,
                                   loss=loss),
                 in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                 donate_argnums=0)


def training_bytes(cfg: config_lib.Config, per_device_batch: int) -> tuple[int, float, float]:
  """(parameters, bytes of their state, bytes of activations) of one device's share of
  a train step: lower bounds (see STATE_COPIES, ACTIVATION_BYTES_PER_VOXEL_F)."""
  abstract = jax.eval_shape(lambda: create_state(cfg))
  n = int(sum(np.prod(a.shape, dtype=np.float64)
              for a in jax.tree_util.tree_leaves(abstract.params)))
  voxels = float(np.prod(cfg.data.patch, dtype=np.float64)) * per_device_batch / max(
      1, cfg.parallel.spatial)
  activations = ACTIVATION_BYTES_PER_VOXEL_F * cfg.model.features * voxels * \
      cfg.model.ensemble
  return n, STATE_COPIES * 4.0 * n, activations


def check_training_memory(cfg: config_lib.Config, per_device_batch: int, devices,
                          workdir: str) -> None:
  """Refuses a run whose step cannot fit one device's memory, before any compiling."""
  n, state, activations = training_bytes(cfg, per_device_batch)
  have, where = resources.device_bytes(devices)
  resources.check_fits(
      state + activations, have, where,
      f"training {workdir} with f={cfg.model.features} ({n:.3g} parameters; with "
      f"gradients and Adam's moments {format_bytes(state)}) on patch "
      f"{tuple(cfg.data.patch)} x {per_device_batch} pair(s) per device (activations "
      f"{format_bytes(activations)})", TRAIN_FIX)
