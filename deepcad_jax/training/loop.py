"""Self-supervised training: loss, sharded train step, and the checkpointed loop.

The step is one jit-compiled function over a data-parallel mesh: the batch is split over
devices, parameters and optimizer state are replicated, and XLA inserts the gradient
all-reduce. Augmentation runs inside the step with a key derived from (seed, step), so a
resumed run sees exactly the batches and variants an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from deepcad_jax.model_io import checkpoint as ckpt
from deepcad_jax import config as config_lib
from deepcad_jax.runtime import distributed, parallel, resources
from deepcad_jax.data.movie import list_movies, open_movie
from deepcad_jax.training.pairs import PairSource, fit_patch, pair_iterator
from deepcad_jax.errors import Terminated, UserError
from deepcad_jax.model_io.loading import load_model
from deepcad_jax.runtime.files import refuse_output_is_input
from deepcad_jax.runtime.locks import WorkdirLock
from deepcad_jax.core.network import add_prior_channel
from deepcad_jax.runtime.progress import Progress, format_duration
from deepcad_jax.analysis.score import BETTER, Score, holdout_range
from deepcad_jax.training.quality import (brightness_offset, check_frames, holdout_scorer,
                                          noise_models)
from deepcad_jax.training.step import (TRAIN_FIX, TrainState, check_training_memory, compile_step,
                                       create_state, make_model)

log = logging.getLogger("deepcad_jax")

MEASURE_STEPS = 3  # steps timed after the first (compiling) one, for the pace of a run
LONG_CPU_EPOCH_S = 30 * 60  # on a CPU, epochs longer than this get a suggestion

REQUIRE_GAIN_EXIT = 3   # train --require-gain, when the model does not beat the baselines


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

  def stop_if_interrupted(self) -> None:
    """For callers that go on to other work (`ladder`, `demo`): raise what stopped the
    run early, KeyboardInterrupt or `Terminated` (SIGTERM), so they stop too (the
    checkpoint is saved: the same command resumes)."""
    if self.interrupted:
      raise Terminated() if self.signal == signal.SIGTERM else KeyboardInterrupt()

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

  def __init__(self, event: threading.Event | None = None):
    self._signalled = False
    self._event = event  # a caller's stop request (a GUI's Stop button)
    self.signum: int | None = None
    self._previous = {}

  @property
  def set(self) -> bool:
    return self._signalled or (self._event is not None and self._event.is_set())

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def _handle(self, signum, frame):
    if self.set and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self._signalled = True
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


@resources.device_memory("training", TRAIN_FIX)
def train(data: str, workdir: str, config: config_lib.Config | str | None = None, *,
          fresh: bool = False, init_from: Any = None, devices=None,
          progress: bool = True, on_step: Callable[[int, float], None] | None = None,
          require_gain: bool = False, stop: threading.Event | None = None,
          on_score: Callable[[int, float], None] | None = None) -> TrainResult:
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
    stop: an event checked after every step: once set, the run saves a checkpoint and
      returns (`interrupted`; the same call resumes it), as on Ctrl-C.
    on_score: called as `on_score(step, estimated_mse)` after each held-out score.
    require_gain: make `TrainResult.exit_code` 3 unless the final model beats every
      baseline of the held-out score (`score.py`).

  Returns:
    A `TrainResult`: the final state, the steps done, the losses, whether the run
    was interrupted, and the final model's held-out quality (`quality`).
  """
  cfg = config_lib.load_config(config or "deepcad_rt") if not isinstance(
      config, config_lib.Config) else config
  init_params_from = None
  if init_from is not None and not isinstance(init_from, ckpt.Model):
    source = os.fspath(init_from)
    refuse_output_is_input(
        [("--workdir", workdir, ckpt.checkpoint_dir(workdir))],
        [("--init-from", source, ckpt.checkpoint_dir(source) if os.path.isdir(source)
          else source)])
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
      noise=noise_models(source) if jax.process_index() == 0 else ())
  log.info("Normalisation: %s.", "; ".join(
      f"{os.path.basename(m.name)} (x - {mean:.6g}) / {scale:.6g}"
      for m, mean, scale in zip(movies, source.means, source.scales)))

  made = [] if os.path.exists(workdir) else [workdir]
  _check_workdir(workdir)
  main = jax.process_index() == 0
  # One run per workdir: process 0 holds its lock (every process may share the folder).
  lock = WorkdirLock(workdir).acquire() if main else None
  if not os.path.exists(ckpt.checkpoint_dir(workdir)):
    made.insert(0, ckpt.checkpoint_dir(workdir))
  try:
    result = _run(workdir, cfg, source, meta, mesh, patch, paths, batch_size,
                  steps_per_epoch, total_steps, fresh=fresh, resume_ok=init_from is None,
                  init_params_from=init_params_from, progress=progress and main,
                  on_step=on_step, stop=stop, on_score=on_score)
    return dataclasses.replace(result, require_gain=require_gain)
  except BaseException:
    if lock is not None:
      lock.release()
      lock = None
    for folder in made:  # a run that failed before its first checkpoint leaves nothing
      with contextlib.suppress(OSError):
        os.rmdir(folder)
    raise
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
         on_step: Callable[[int, float], None] | None, stop: threading.Event | None = None,
         on_score: Callable[[int, float], None] | None = None) -> TrainResult:
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
                 init_params_from=init_params_from, progress=progress, on_step=on_step,
                 stop=stop, on_score=on_score)
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
          on_step: Callable[[int, float], None] | None, stop: threading.Event | None = None,
          on_score: Callable[[int, float], None] | None = None) -> TrainResult:
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
  scorer = holdout_scorer(meta, source)
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
    with _StopFlag(stop) as stop:
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
        stopping = stop.set  # read once: a step either saves and stops, or goes on
        timed = save_interval is not None and step - last_save[0] >= save_interval
        if step % steps_per_epoch == 0 or step == total_steps or stopping or timed:
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
            if on_score is not None:
              on_score(step, quality.estimated_mse)
          elif step == total_steps and main:
            # Nothing held out: the last frames of the first movie (seen in training,
            # so optimistic) still name a collapsed model and fit the brightness.
            quality = holdout_scorer(meta, source, final_check=True)(state.params)
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
        if stopping:
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

