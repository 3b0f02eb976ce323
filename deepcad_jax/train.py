"""Self-supervised training: loss, sharded train step, and the checkpointed loop.

The step is one jit-compiled function over a data-parallel mesh: the batch is split over
devices, parameters and optimizer state are replicated, and XLA inserts the gradient
all-reduce. Augmentation runs inside the step with a key derived from (seed, step), so a
resumed run sees exactly the batches and variants an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import shutil
import signal
import threading
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from deepcad_jax import checkpoint as ckpt
from deepcad_jax import config as config_lib
from deepcad_jax import distributed, parallel, resources
from deepcad_jax.augment import augment_batch
from deepcad_jax.data.movie import ArrayMovie, list_movies, open_movie
from deepcad_jax.data.pairs import PairSource, fit_patch, pair_iterator
from deepcad_jax.errors import UserError
from deepcad_jax.infer import Denoiser
from deepcad_jax.loading import load_model
from deepcad_jax.lock import WorkdirLock
from deepcad_jax.losses import loss_fn
from deepcad_jax.model import (UNet3D, add_prior_channel, ensemble_params, network_input,
                               over_members)
from deepcad_jax.progress import Progress, format_duration
from deepcad_jax import noise as noise_lib
from deepcad_jax.score import BETTER, HeldOutScorer, Score, holdout_range

log = logging.getLogger("deepcad_jax")

TrainState = train_state.TrainState
MEASURE_STEPS = 3  # steps timed after the first (compiling) one, for the pace of a run
LONG_CPU_EPOCH_S = 30 * 60  # on a CPU, epochs longer than this get a suggestion

# Lower bounds of a train step's memory per device, to refuse before compiling what
# cannot fit: parameters, gradients and Adam's two moments (float32 copies of every
# parameter), and activations kept for the backward pass (XLA's analysis of the step
# gives about 120 f bytes per patch voxel on the CPU; accelerators need less).
STATE_COPIES = 4
ACTIVATION_BYTES_PER_VOXEL_F = 40.0
TRAIN_FIX = "lower --features, --patch or --batch-size (or add devices)"
COSINE_FLOOR = 0.05      # train.lr_schedule 'cosine' ends at this fraction of the lr
REQUIRE_GAIN_EXIT = 3   # train --require-gain, when the model does not beat the baselines
NOISE_FIT_FRAMES = 1000  # frames of each training movie its noise model is fitted on
FINAL_CHECK_FRAMES = 200  # without held-out frames: the training frames checked at the end
BRIGHTNESS_SEGMENTS, BRIGHTNESS_FRAMES = 4, 64  # where the final brightness offset is fit


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
    impl: how the members run: 'loop' or 'vmap' (`model.over_members`).
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


@dataclasses.dataclass
class TrainResult:
  """What a call to `train` did."""

  workdir: str
  state: TrainState
  step: int                 # steps completed in total
  total_steps: int
  losses: list[tuple[int, float]]
  interrupted: bool
  patch: tuple[int, int, int]
  meta: ckpt.RunMeta
  signal: int | None = None  # the signal that stopped it early (SIGINT, SIGTERM)
  quality: Score | None = None  # the final model's held-out quality (score.py)
  require_gain: bool = False    # exit non-zero unless the model beats the baselines

  @property
  def exit_code(self) -> int:
    """0; 128 + the signal for a run stopped early (130 Ctrl-C, 143 SIGTERM); 3 when
    `require_gain` was asked and the model does not beat every baseline."""
    if self.interrupted:
      return 128 + (self.signal or signal.SIGINT)
    if self.require_gain and (self.quality is None or self.quality.verdict != BETTER):
      return REQUIRE_GAIN_EXIT
    return 0

  def describe(self) -> str:
    """The result for the command line: the run, its quality and any warning."""
    lines = [f"workdir: {self.workdir}  step {self.step}/{self.total_steps}"
             + ("  (interrupted; run again to resume)" if self.interrupted else "")]
    if self.quality is not None:
      q = self.quality
      best, value = q.best_baseline
      lines.append(f"held-out quality: estimated MSE {q.estimated_mse:.4g} (95% CI "
                   f"{q.estimated_mse_ci[0]:.4g} to {q.estimated_mse_ci[1]:.4g}); best "
                   f"baseline {best} {value:.4g}; gain {q.gain_db:+.2f} dB: {q.verdict}")
      if q.warning:
        lines.append(q.warning)
    if self.exit_code == REQUIRE_GAIN_EXIT:
      lines.append("--require-gain: the model does not beat every baseline; exit code "
                   f"{REQUIRE_GAIN_EXIT}.")
    return "\n".join(lines)


class _StopFlag:
  """Ctrl-C or SIGTERM (a cluster's preemption) sets the flag: the loop stops at the
  next step boundary and saves. A second Ctrl-C interrupts at once."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.set = False
    self.signum: int | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def _handle(self, signum, frame):
    if self.set and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.set = True
    self.signum = self.signum or signum
    log.warning("%s: stopping after this step and saving a checkpoint%s.",
                signal.Signals(signum).name,
                " (press Ctrl-C again to abort without saving)" if signum == signal.SIGINT
                else "")

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def _data_summary(source: PairSource) -> list[dict]:
  return [{"name": os.path.basename(m.name), "shape": list(m.shape),
           "dtype": str(m.dtype), "mean": mean, "scale": scale}
          for m, mean, scale in zip(source.movies, source.means, source.scales)]


# Settings a resumed run must share with the run it resumes, and the value a run
# written before the setting existed was trained with.
RESUME_SETTINGS = {"train": {"lr": None, "b1": None, "b2": None, "seed": None,
                             "batch_size": None, "loss": "deepcad",
                             "lr_schedule": "constant"},
                   "data": {"pairs_per_epoch": None, "normalise": "fixed", "scale": None,
                            "holdout": None}}


def _check_resumable(workdir: str, old: dict, cfg: config_lib.Config,
                     patch, data: list[dict]) -> None:
  old_cfg = old["config"]
  fix = "use another --workdir, or --fresh to start this one over"
  if old["features"] != cfg.model.features:
    raise UserError(f"{workdir} holds a model with features={old['features']}, but "
                    f"features={cfg.model.features} was asked for; {fix}.")
  for field in ("mean_prior", "ensemble", "widths"):
    before = old_cfg["model"].get(field, getattr(config_lib.ModelConfig(), field))
    before = tuple(before) if isinstance(before, list) else before
    if before != getattr(cfg.model, field):
      raise UserError(f"{workdir} holds a model with model.{field}={before}, but "
                      f"{getattr(cfg.model, field)} was asked for; {fix}.")
  if tuple(old["patch"]) != tuple(patch):
    raise UserError(f"{workdir} was trained with patch {tuple(old['patch'])}, but this "
                    f"run would use {tuple(patch)}; {fix}.")
  same_data = [(d["name"], d["shape"]) for d in old["data"]] == \
      [(d["name"], d["shape"]) for d in data]
  if not same_data:
    raise UserError(f"{workdir} was trained on other data "
                    f"({[d['name'] for d in old['data']]}); {fix} (or fine-tune with "
                    "--init-from).")
  for key, fields in RESUME_SETTINGS.items():
    for field, before_it_existed in fields.items():
      old_value = old_cfg[key].get(field, before_it_existed)
      if old_value is None and field not in old_cfg[key]:
        continue
      new_value = getattr(getattr(cfg, key), field)
      if isinstance(old_value, list):
        old_value = tuple(old_value)
      if old_value != new_value:
        raise UserError(f"{workdir} was trained with {key}.{field}={old_value!r}, but this "
                        f"run asks for {new_value!r}; give the same setting to resume, or "
                        f"{fix}.")
  for before, now in zip(old["data"], data):
    for field in ("mean", "scale"):
      a, b = before.get(field), now.get(field)
      if a is not None and b is not None and not np.isclose(a, b, rtol=1e-6, atol=0):
        raise UserError(f"{now['name']} has {field} {b:.6g} now but {a:.6g} when "
                        f"{workdir} was trained on it (the file changed); {fix}.")


def _adopt(cfg: config_lib.Config, start: ckpt.Model) -> tuple[config_lib.Config, Any]:
  """The config and initial parameters of a run fine-tuned from `start`: its width,
  scale, members and prior. A single-channel model given `mean_prior` gets a prior
  channel whose weights are zero, so training starts from the same function."""
  members = start.config.model.ensemble
  if members != cfg.model.ensemble:
    raise UserError(f"{start.source} has {members} ensemble member(s) but this run asks "
                    f"for {cfg.model.ensemble}; --init-from needs the same --ensemble.")
  params = start.params
  if cfg.model.mean_prior and not start.config.model.mean_prior:
    log.info("Adding a mean-image prior channel (zero weights) to %s.", start.source)
    params = add_prior_channel(params)
  cfg = config_lib.override(cfg, **{
      "model.features": start.features, "data.scale": start.config.data.scale,
      "model.mean_prior": cfg.model.mean_prior or start.config.model.mean_prior})
  # The start's architecture, pruned widths included (a prior channel changes the first
  # conv's input, not any output width).
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, widths=start.config.model.widths))
  return cfg, params


def _holdout_scorer(meta: ckpt.RunMeta, source: PairSource, final_check: bool = False
                    ) -> Callable[[Any], Score] | None:
  """params -> the held-out quality over every movie's held-out frames (`score.py`),
  each movie normalised as in training. Without held-out frames: None, or with
  `final_check` the last frames of the first movie (seen in training, so optimistic;
  it still names a collapsed model). The predict step compiles once; each call only
  swaps parameters."""
  rows = [(m, h, mean, scale) for m, h, mean, scale in
          zip(source.movies, source.holdout, source.means, source.scales) if h is not None]
  if not rows:
    if not final_check:
      return None
    m = source.movies[0]
    t = m.shape[0]
    rows = [(m, (max(0, t - FINAL_CHECK_FRAMES), t), source.means[0], source.scales[0])]
  scorer = HeldOutScorer(*zip(*rows))
  model = ckpt.Model(params=None, meta=meta, source="training")
  compiled: list[Denoiser] = []  # the first step's denoiser; later ones share its steps

  def score(params) -> Score:
    host = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    if compiled:
      den = compiled[0].with_params(host)
    else:
      den = Denoiser(model.with_params(host), tiling="exact", devices=jax.local_devices())
      compiled.append(den)
    return scorer(den)
  return score


def brightness_offset(meta: ckpt.RunMeta, source: PairSource, params: Any) -> float:
  """How much the denoised movie is darker than the raw one, in network units: the
  mean of (raw - denoised) / scale over segments spread evenly over every training
  movie, each denoised as `denoise` does (all frames at once, exact tiling). The
  noise averages out of the raw mean, so this is the network's bias; a model adds it
  to its output when loaded (`RunMeta.output_offset`), and keeps the brightness of
  the recording (a short run does not pin its output's mean by itself)."""
  host = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
  den = Denoiser(ckpt.Model(host, meta, "training"), tiling="exact",
                 devices=jax.local_devices())
  total, count = 0.0, 0
  for m, mean, scale in zip(source.movies, source.means, source.scales):
    for a, b in spread_segments(m.shape[0], BRIGHTNESS_SEGMENTS, BRIGHTNESS_FRAMES):
      raw = m.read(a, b).astype(np.float64)
      out = np.concatenate([f.data for f in den.frames(
          ArrayMovie(raw.astype(np.float32), m.name), mean=mean, scale=scale)])
      total += float((raw - out).sum()) / scale
      count += raw.size
  return total / max(count, 1)


def spread_segments(frames: int, count: int, length: int) -> list[tuple[int, int]]:
  """Up to `count` segments of `length` frames spread evenly over `frames` (one
  segment of all frames when they are fewer than `count` segments need)."""
  if frames <= count * length:
    return [(0, frames)]
  starts = np.linspace(0, frames - length, count).round().astype(int)
  return [(int(a), int(a) + length) for a in starts]


def _noise_models(source: PairSource) -> tuple[dict, ...]:
  """Each training movie's noise model (on its first NOISE_FIT_FRAMES frames)."""
  fits = []
  for m in source.movies:
    frames = (0, min(m.shape[0], NOISE_FIT_FRAMES))
    try:
      nm = noise_lib.fit_movie(m, frames)
    except UserError as e:  # a movie with no frame-to-frame variation: nothing to learn
      log.warning("%s", e)
      continue
    log.info("%s", nm.describe())
    fits.append(nm.to_json())
  return tuple(fits)


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
      f"gradients and Adam's moments {resources.format_bytes(state)}) on patch "
      f"{tuple(cfg.data.patch)} x {per_device_batch} pair(s) per device (activations "
      f"{resources.format_bytes(activations)})", TRAIN_FIX)


@resources.device_memory("training", TRAIN_FIX)
def train(data: str, workdir: str, config: config_lib.Config | str | None = None, *,
          fresh: bool = False, init_from: Any = None, devices=None,
          progress: bool = True, on_step: Callable[[int, float], None] | None = None,
          require_gain: bool = False) -> TrainResult:
  """Train on a TIFF movie or a folder of them; resume from `workdir` when it holds a run.

  Training runs until `config.train.epochs` epochs are done, saving a checkpoint after
  every epoch, every `config.train.save_every` minutes and on Ctrl-C or SIGTERM (then
  `TrainResult.signal` says which); a save that fails raises `UserError` at once. The
  workdir is locked for the run: a second run on it raises `UserError` naming the
  process that holds it.

  Args:
    data: a movie or a folder of them.
    workdir: the run's folder (made if missing): checkpoints and metadata.
    config: a Config, a config name ('deepcad_rt', 'ladder:32', 'tiny', a .py path) or
      None for DeepCAD-RT.
    fresh: remove the checkpoints in `workdir` and start over.
    init_from: a model directory, a DeepCAD-RT .pth or a `Model`: a new run starts
      from its weights and width (fine-tuning; `workdir` must hold no run, or give
      `fresh`).
    devices: the devices to use (default: all).
    progress: print a progress line (process 0 only).
    on_step: called as `on_step(step, loss)` after every step.
    require_gain: make `TrainResult.exit_code` 3 unless the final model beats every
      baseline of the held-out score (`score.py`).

  Returns:
    A `TrainResult`: the final state, the steps done, the losses, whether the run
    was interrupted, and the final model's held-out quality (`quality`).
  """
  cfg = config_lib.load_config(config or "deepcad_rt") if not isinstance(
      config, config_lib.Config) else config
  init_params_from = None
  if init_from is not None:
    start_model = init_from if isinstance(init_from, ckpt.Model) else load_model(
        os.fspath(init_from))
    if start_model.features != cfg.model.features:
      log.info("Using the width of %s: features=%d.", start_model.source,
               start_model.features)
    cfg, init_params_from = _adopt(cfg, start_model)
  paths = list_movies(os.fspath(data))
  movies = [open_movie(p) for p in paths]
  holdout = [holdout_range(m.shape[0], cfg.data.holdout) for m in movies]
  # The patch must fit the frames a pair may come from: the longest part outside the
  # held-out range.
  usable = [m.shape if h is None else (max(h[0], m.shape[0] - h[1]),) + m.shape[1:]
            for m, h in zip(movies, holdout)]
  patch, notes = fit_patch(cfg.data.patch, usable, paths)
  for note in notes:
    log.warning("%s.", note)
  cfg = config_lib.override(cfg, **{"data.patch": patch})

  mesh = parallel.data_mesh(devices, cfg.parallel.spatial)
  n_dev = parallel.device_count(mesh)  # along 'data'
  batch_size = parallel.batch_for(mesh, cfg.train.batch_size)
  parallel.check_spatial(patch[1], cfg.parallel.spatial)
  steps_per_epoch = cfg.data.pairs_per_epoch // batch_size
  if steps_per_epoch < 1:
    raise UserError(f"pairs per epoch ({cfg.data.pairs_per_epoch}) is smaller than the "
                    f"batch size ({batch_size}); raise --pairs-per-epoch.")
  total_steps = steps_per_epoch * cfg.train.epochs
  check_training_memory(cfg, batch_size // n_dev, list(mesh.devices.flat), workdir)

  source = PairSource(movies, patch, cfg.data.pairs_per_epoch, seed=cfg.train.seed,
                      scale=cfg.data.scale, normalise=cfg.data.normalise,
                      prior=cfg.model.mean_prior, holdout=holdout)
  summary = _data_summary(source)
  weights = np.array([np.prod(m.shape) for m in movies], np.float64)
  meta = ckpt.RunMeta(
      config=cfg, patch=tuple(patch), data=tuple(summary),
      mean=float(np.dot(weights, source.means) / weights.sum()), batch_size=batch_size,
      steps_per_epoch=steps_per_epoch, holdout=tuple(holdout),
      scale=float(np.dot(weights, source.scales) / weights.sum()),
      noise=_noise_models(source) if jax.process_index() == 0 else ())
  log.info("Normalisation: %s.", "; ".join(
      f"{os.path.basename(m.name)} (x - {mean:.6g}) / {scale:.6g}"
      for m, mean, scale in zip(movies, source.means, source.scales)))

  _check_workdir(workdir)
  main = jax.process_index() == 0
  # One run per workdir: process 0 holds its lock (every process may share the folder).
  lock = WorkdirLock(workdir).acquire() if main else None
  try:
    result = _run(workdir, cfg, source, meta, mesh, patch, paths, batch_size,
                  steps_per_epoch, total_steps, fresh=fresh, resume_ok=init_from is None,
                  init_params_from=init_params_from, progress=progress and main,
                  on_step=on_step)
    return dataclasses.replace(result, require_gain=require_gain)
  finally:
    if lock is not None:
      lock.release()


def _check_workdir(workdir: str) -> None:
  """A workdir is a folder (made if missing) whose `checkpoints` is a folder too."""
  checkpoints = ckpt.checkpoint_dir(workdir)
  for path, what in ((workdir, "--workdir takes a folder (made if missing)"),
                     (checkpoints, "it must be the folder of the run's checkpoints")):
    if os.path.exists(path) and not os.path.isdir(path):
      raise UserError(f"{path} is a file, not a folder: {what}; move it away or use "
                      "another --workdir.")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot make the folder {workdir} ({e.strerror}); use another "
                    "--workdir.") from None


def _run(workdir: str, cfg: config_lib.Config, source: PairSource, meta: ckpt.RunMeta, mesh,
         patch, paths, batch_size: int, steps_per_epoch: int, total_steps: int, *,
         fresh: bool, resume_ok: bool, init_params_from: Any, progress: bool,
         on_step: Callable[[int, float], None] | None) -> TrainResult:
  """The checkpointed loop of `train`, on a workdir this process may use."""
  if fresh and jax.process_index() == 0:
    ckpt.clear(workdir)
  distributed.barrier("fresh")
  os.makedirs(workdir, exist_ok=True)
  mgr = ckpt.manager(workdir, keep=cfg.train.keep_checkpoints,
                     steps_per_epoch=steps_per_epoch)
  try:
    return _loop(mgr, workdir, cfg, source, meta, mesh, patch, paths, batch_size,
                 steps_per_epoch, total_steps, resume_ok=resume_ok,
                 init_params_from=init_params_from, progress=progress, on_step=on_step)
  finally:
    mgr.close()
    if jax.process_index() == 0:
      ckpt.discard_partial(workdir)  # what a failed save left, now that none is running


def _save(mgr, workdir: str, step: int, state: TrainState, meta: ckpt.RunMeta) -> None:
  """Save the checkpoint of `step`; a failure (a full disk) is one sentence, at once."""
  _check_space(mgr, workdir, step, state)
  try:
    ckpt.save(mgr, step, meta, state.params, {"opt_state": state.opt_state,
                                              "step": state.step})
  except Exception as e:  # noqa: BLE001 - any failed write stops the run the same way
    kept = [s for s in mgr.all_steps() if s != step]
    raise UserError(
        f"could not save the checkpoint of step {step} in {ckpt.checkpoint_dir(workdir)} "
        f"({_reason(e)}); training stopped, "
        + (f"the last complete checkpoint is step {max(kept)}" if kept else
           "no checkpoint was written yet")
        + ": free some space there (or fix the folder) and run the same command to "
        "resume.") from None


def _reason(error: BaseException) -> str:
  """The OS's words for a failed write (e.g. 'No space left on device'), else the first
  line of the error."""
  seen, e = set(), error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return e.strerror or os.strerror(e.errno)
    code = re.search(r"os_error_code='?(\d+)", str(e))  # TensorStore's write errors
    if code:
      return os.strerror(int(code.group(1)))
    e = e.__cause__ or e.__context__
  text = str(error).strip()
  return text.splitlines()[0][:200] if text else type(error).__name__


def _check_space(mgr, workdir: str, step: int, state: TrainState) -> None:
  """Refuse to start a save the disk cannot hold (a save that fails half-way leaves
  Orbax's writer threads to fail one by one)."""
  folder = ckpt.checkpoint_dir(workdir)
  steps = mgr.all_steps()
  need = ckpt.size_on_disk(workdir, max(steps)) if steps else sum(
      a.nbytes for a in jax.tree_util.tree_leaves(state))
  need = int(need * 1.2) + (1 << 20)
  free = shutil.disk_usage(folder).free
  if free < need:
    raise UserError(
        f"could not save the checkpoint of step {step} in {folder} (no space left: it "
        f"needs about {need / 1e6:.0f} MB and {free / 1e6:.0f} MB are free); training "
        "stopped, " + (f"the last complete checkpoint is step {max(steps)}" if steps else
                       "no checkpoint was written yet")
        + ": free some space there and run the same command to resume.")


def _report_pace(per_step: float, cfg: config_lib.Config, steps_per_epoch: int,
                 batch_size: int, mesh) -> None:
  """The time per epoch at the measured pace; on a CPU, when an epoch would take long
  (the DeepCAD-RT recipe: hours), what to do instead."""
  epoch_s = per_step * steps_per_epoch
  log.info("About %s per epoch (%.3g s per step of %d pair(s)).", format_duration(epoch_s),
           per_step, batch_size)
  if mesh.devices.flat[0].platform == "cpu" and epoch_s > LONG_CPU_EPOCH_S:
    pairs = max(batch_size, int(LONG_CPU_EPOCH_S / 2 / per_step) * batch_size)
    log.warning(
        "On this CPU one epoch of %d pairs with %s patches takes about %s. For a first "
        "try use --config demo (a smaller network and patch), or fewer pairs per epoch: "
        "--pairs-per-epoch %d takes about %s.", cfg.data.pairs_per_epoch,
        "x".join(map(str, cfg.data.patch)), format_duration(epoch_s), pairs,
        format_duration(pairs // batch_size * per_step))


def _loop(mgr, workdir: str, cfg: config_lib.Config, source: PairSource, meta: ckpt.RunMeta,
          mesh,
          patch, paths, batch_size: int, steps_per_epoch: int, total_steps: int, *,
          resume_ok: bool, init_params_from: Any, progress: bool,
          on_step: Callable[[int, float], None] | None) -> TrainResult:
  n_dev = parallel.device_count(mesh)
  main = jax.process_index() == 0
  repl = parallel.replicated(mesh)
  state = jax.device_put(create_state(cfg, init_params_from, total_steps), repl)
  start = 0
  if mgr.latest_step() is not None:
    if not resume_ok:
      raise UserError(f"{workdir} already holds a run; --init-from starts a new one: use "
                      "an empty --workdir or add --fresh.")
    start = mgr.latest_step()
    _check_resumable(workdir, ckpt.read_meta(mgr, start), cfg, patch, meta.data)
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), state)
    state = ckpt.restore_training(mgr, start, abstract)
    log.info("Resuming %s from step %d (epoch %d).", workdir, start,
             start // steps_per_epoch)
  if start >= total_steps:
    log.info("%s is already trained to step %d (%d epochs); nothing to do. Raise "
             "--epochs to train longer.", workdir, start, start // steps_per_epoch)
    return TrainResult(os.path.abspath(workdir), state, start, total_steps, [], False,
                       patch, meta)

  data_iter = pair_iterator(source, batch_size, cfg.train.seed, cfg.data.workers,
                            start_step=start, process_index=jax.process_index(),
                            process_count=jax.process_count())
  step_fn = compile_step(make_model(cfg), mesh, cfg.model.ensemble,
                         cfg.model.ensemble_impl, cfg.model.mean_prior, cfg.train.loss)
  key = jax.random.key(cfg.train.seed + 1)
  data_sharding = parallel.pair_shardings(mesh, cfg.model.mean_prior)
  scorer = _holdout_scorer(meta, source)
  quality: Score | None = None
  if start and scorer is not None:  # the curve so far, from the checkpoint resumed
    meta = meta.replace(holdout_curve=ckpt.RunMeta.from_json(
        ckpt.read_meta(mgr, start)).holdout_curve)
  bar = Progress(total_steps, "step", enabled=progress and main, start=start)
  losses: list[tuple[int, float]] = []
  interrupted = False
  stopped_by = None
  step = start
  t0 = time.perf_counter()
  # Mid-epoch checkpoints every `save_every` minutes, counted in steps (the same on every
  # process): measured after the first steps, and again at every save.
  save_every_s = cfg.train.save_every * 60
  save_interval: int | None = None
  last_save = (start, None)  # (step, time) of the last checkpoint, or of the clock start
  extras = "".join(
      [f", {cfg.model.ensemble} members" if cfg.model.ensemble > 1 else "",
       ", mean-image prior" if cfg.model.mean_prior else ""])
  log.info("Training %s (f=%d%s) on %d file(s), patch %s, batch %d over %d device(s), "
           "%d steps per epoch, steps %d..%d.", cfg.name, cfg.model.features, extras,
           len(paths), patch, batch_size, n_dev, steps_per_epoch, start, total_steps)

  def interval_since(since: tuple[int, float | None]) -> int | None:
    """Steps per `save_every`, at the pace since `since` (decided by process 0)."""
    steps, seconds = step - since[0], time.perf_counter() - since[1]
    if save_every_s <= 0 or steps <= 0:
      return None
    return distributed.broadcast_int(max(1, int(save_every_s * steps / max(seconds, 1e-9))))

  bar.status(step, "compiling the training step...")
  try:
    with _StopFlag() as stop:
      while step < total_steps:
        batch = distributed.global_batch(next(data_iter), data_sharding)
        t_step = time.perf_counter()
        state, metrics = step_fn(state, batch, key)
        step += 1
        if step == start + 1:  # compiled and run once: the clock starts now
          jax.block_until_ready(metrics)
          log.info("Compiled the training step and ran it once in %s.",
                   format_duration(time.perf_counter() - t_step))
          bar.restart(step)
          last_save = (step, time.perf_counter())
        elif step == start + 1 + MEASURE_STEPS:
          jax.block_until_ready(metrics)
          per_step = (time.perf_counter() - last_save[1]) / MEASURE_STEPS
          if main:
            _report_pace(per_step, cfg, steps_per_epoch, batch_size, mesh)
          save_interval = interval_since(last_save)
        if on_step is not None or step % cfg.train.log_every == 0 or \
            step % steps_per_epoch == 0 or step == total_steps or stop.set:
          loss = float(metrics["loss"])
          if not np.isfinite(loss):
            raise UserError(f"the loss became {loss} at step {step}; lower --lr or check "
                            "the data for extreme values.")
          losses.append((step, loss))
          bar.update(step, epoch=f"{(step - 1) // steps_per_epoch + 1}/{cfg.train.epochs}",
                     loss=f"{loss:.4g}")
          if on_step is not None:
            on_step(step, loss)
        timed = save_interval is not None and step - last_save[0] >= save_interval
        if step % steps_per_epoch == 0 or step == total_steps or stop.set or timed:
          meta = meta.replace(step=step, epoch=step / steps_per_epoch,
                              pairs_consumed=step * batch_size,
                              loss=losses[-1][1] if losses else None,
                              processes=jax.process_count(),
                              holdout_score=None)  # a mid-epoch save is not scored
          if scorer is not None and (step % steps_per_epoch == 0 or step == total_steps):
            quality = scorer(state.params)
            meta = meta.replace(
                holdout_score=quality.estimated_mse, holdout_quality=quality.to_json(),
                holdout_curve=meta.holdout_curve + ((step, quality.estimated_mse),),
                output_offset=quality.brightness_offset)
            best, value = quality.best_baseline
            log.info("step %d (epoch %.3g): held-out estimated MSE %.4g (95%% CI %.4g to "
                     "%.4g; held-out MSE %.4g minus noise variance %.4g); best baseline "
                     "%s %.4g; gain %+.2f dB: %s", step, step / steps_per_epoch,
                     quality.estimated_mse, *quality.estimated_mse_ci, quality.heldout_mse,
                     quality.noise_variance, best, value, quality.gain_db, quality.verdict)
          elif step == total_steps and main:
            # Nothing held out: the last frames of the first movie (seen in training,
            # so optimistic) still name a collapsed model and fit the brightness.
            quality = _holdout_scorer(meta, source, final_check=True)(state.params)
            meta = meta.replace(holdout_quality=quality.to_json(),
                                output_offset=quality.brightness_offset)
            log.info("Checked the final model on frames %d:%d of %s (seen in training, "
                     "so the numbers are optimistic; train with --holdout for an unbiased "
                     "score): %s.", *check_frames(source), source.movies[0].name,
                     quality.verdict)
          elif step % steps_per_epoch == 0:
            quality = None
          if step == total_steps and main:
            offset = brightness_offset(meta, source, state.params)
            meta = meta.replace(output_offset=offset)
            log.info("Brightness offset %.4g (network units): the denoised movie's mean "
                     "against the raw one's, on frames spread over the training data; "
                     "stored with the model.", offset)
          _save(mgr, workdir, step, state, meta)
          if save_interval is not None:
            save_interval = interval_since(last_save)
          last_save = (step, time.perf_counter())
        if stop.set:
          interrupted, stopped_by = True, stop.signum
          log.warning("Interrupted at step %d; checkpoint saved. Run the same command to "
                      "resume.", step)
          break
  finally:
    if hasattr(data_iter, "close"):
      data_iter.close()  # stops grain's worker processes now, not at garbage collection
  log.info("Trained to step %d in %s.", step, format_duration(time.perf_counter() - t0))
  return TrainResult(os.path.abspath(workdir), state, step, total_steps, losses,
                     interrupted, patch, meta, stopped_by, quality)


def check_frames(source: PairSource) -> tuple[int, int]:
  """The frames the final check scores when nothing is held out."""
  t = source.movies[0].shape[0]
  return max(0, t - FINAL_CHECK_FRAMES), t
