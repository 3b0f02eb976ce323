"""The model format: run directories of Orbax checkpoints, and what they record.

A run directory holds `checkpoints/<step>/` with up to three items: `params` (the
network's parameters), `opt` (Adam's state and the step counter; training runs only)
and `meta` (JSON: a `RunMeta`). Inference restores `params` alone, without building an
optimizer. The input pipeline is a pure function of (seed, step), so the step is all a
resumed run (with any number of processes) needs to continue the same stream. Orbax
writes each step atomically, so an interrupted save never hides the previous complete
one; on several hosts it coordinates the write. Saves are synchronous (a few tenths of a
second for DeepCAD-RT's 1M parameters and their Adam state): a failure surfaces at once.

This module is a leaf: it knows the model's parameter shapes (`model`) and the config,
nothing of training or of DeepCAD-RT's .pth files (`loading.load_model` dispatches).
"""

from __future__ import annotations

import dataclasses
import math
import json
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from deepcad_jax import config as config_lib
from deepcad_jax.runtime.files import os_error
from deepcad_jax.errors import UserError
from deepcad_jax.core.network import add_output_offset, ensemble_params

FORMAT = "deepcad-jax/2"   # items params, opt, meta
FORMAT_V1 = "deepcad-jax/1"  # one item `state` (params and optimizer together): read
CHECKPOINTS = "checkpoints"
PARAMS, OPT, META, STATE_V1 = "params", "opt", "meta", "state"
CALIBRATION = "calibration.json"  # uncertainty recalibration, written by `calibrate`


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


DISCARD_TRIES, DISCARD_WAIT_S = 30, 0.1  # discard_partial: up to 3 s for writer threads
HOLDOUT = "holdout_score"  # the metric a checkpoint may carry; lower is better


@dataclasses.dataclass(frozen=True)
class KeepEpochs:
  """Orbax preservation policy: the last `keep` epoch checkpoints, and the latest
  checkpoint of any kind (a mid-epoch save replaces the previous mid-epoch one)."""

  keep: int
  steps_per_epoch: int

  def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
    steps = [c.step for c in checkpoints]
    epochs = sorted(s for s in steps if s % self.steps_per_epoch == 0)
    kept = set(epochs[-self.keep:]) | ({max(steps)} if steps else set())
    return [s in kept for s in steps]


def manager(workdir: str, keep: int = 3, read_only: bool = False,
            steps_per_epoch: int | None = None) -> ocp.CheckpointManager:
  """The run's checkpoint manager: the latest checkpoints (`KeepEpochs` or the last
  `keep`) and the one with the best held-out score, when steps carry one. Saves are
  synchronous, so a failed write (a full disk) raises in `save` itself, before older
  checkpoints are pruned; temporary folders of a save that a kill cut short are removed
  when a writable manager opens."""
  recent = KeepEpochs(keep, steps_per_epoch) if steps_per_epoch else \
      ocp.checkpoint_managers.LatestN(n=keep)
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      recent, ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[HOLDOUT],
                                            reverse=True, n=1,
                                            keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, create=not read_only, read_only=read_only,
      enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


@dataclasses.dataclass(frozen=True)
class RunMeta(Mapping):
  """What a model directory records besides its parameters; one JSON serialisation
  (`to_json` / `from_json`).

  Read it by attribute; it is also a read-only mapping of its JSON fields
  (`meta["step"]`), for scripts that read the JSON file themselves.
  """

  config: config_lib.Config
  patch: tuple[int, int, int]    # the training patch (T, Y, X)
  mean: float | None             # training data mean (None: each movie's own)
  data: tuple[dict, ...] = ()    # the training movies: name, shape, dtype, mean
  step: int = 0
  epoch: float = 0.0
  pairs_consumed: int = 0
  loss: float | None = None
  batch_size: int | None = None
  steps_per_epoch: int | None = None
  processes: int = 1
  holdout: tuple | None = None    # per movie: [a, b) frames held out, or None
  holdout_score: float | None = None  # the estimated MSE against the truth (score.py)
  holdout_curve: tuple = ()       # ([step, score], ...)
  scale: float | None = None      # the training data's scale (normalise.py; None: the
                                  # config's data.scale, as models before it recorded)
  noise: tuple[dict, ...] = ()    # per training movie: its noise model (noise.py)
  holdout_quality: Mapping[str, Any] | None = None  # the last held-out quality report
  output_offset: float = 0.0      # network units added to the output when the model is
                                  # loaded: the brightness correction fitted on the
                                  # held-out frames (score.py); 0 once applied
  provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # converted_
                                  # from, para, para_file, pruned_from, prune, ...
  calibration: Mapping[str, Any] | None = None  # calibration.json beside it (not stored)

  @property
  def features(self) -> int:
    return self.config.model.features

  def to_json(self) -> dict:
    """The stored JSON (the calibration is kept in its own file)."""
    d = {"format": FORMAT, "config": self.config.to_dict(), "features": self.features,
         "mean_prior": self.config.model.mean_prior, "ensemble": self.config.model.ensemble,
         "patch": list(self.patch), "mean": self.mean, "data": [dict(x) for x in self.data],
         "step": self.step, "epoch": self.epoch, "pairs_consumed": self.pairs_consumed,
         "loss": self.loss, "batch_size": self.batch_size,
         "steps_per_epoch": self.steps_per_epoch, "processes": self.processes,
         "holdout": None if self.holdout is None else
         [None if h is None else list(h) for h in self.holdout],
         HOLDOUT: self.holdout_score,
         "holdout_curve": [list(c) for c in self.holdout_curve],
         "scale": self.scale, "noise": [dict(n) for n in self.noise],
         "holdout_quality": None if self.holdout_quality is None else
         dict(self.holdout_quality), "output_offset": self.output_offset}
    return {**self.provenance, **d}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "RunMeta":
    """Parse and check stored JSON; raises ValueError (or KeyError, TypeError) naming
    what does not fit."""
    if d.get("format") not in (FORMAT, FORMAT_V1):
      raise ValueError(f"format {d.get('format')!r} is not {FORMAT}")
    saved = d["config"]
    if "normalise" not in saved.get("data", {"normalise": None}) or \
        "loss" not in saved.get("train", {"loss": None}):
      # Written before normalisation by spread and the choice of loss: the mean and
      # data.scale, and DeepCAD-RT's loss, are what it was trained with.
      saved = {**saved, "data": {"normalise": "fixed", **saved.get("data", {})},
               "train": {"loss": "deepcad", **saved.get("train", {})}}
    cfg = config_lib.from_dict(saved)
    features, patch = int(d["features"]), tuple(int(p) for p in d["patch"])
    if features != cfg.model.features or len(patch) != 3 or min(patch) < 8:
      raise ValueError(f"features={d['features']} and patch={d['patch']} do not fit its "
                       f"config (features={cfg.model.features})")
    for key in ("mean", "scale", "output_offset"):
      if d.get(key) is not None and not math.isfinite(float(d[key])):
        raise ValueError(f"its stored {key} is {d[key]}, not a finite number; the "
                         "metadata was edited or damaged")
    known = {f.name for f in dataclasses.fields(cls)} | {
        "format", "config", "features", "mean_prior", "ensemble", HOLDOUT}
    holdout = d.get("holdout")
    return cls(
        config=cfg, patch=patch, mean=None if d.get("mean") is None else float(d["mean"]),
        data=tuple(dict(x) for x in d.get("data") or ()), step=int(d.get("step", 0)),
        epoch=float(d.get("epoch") or 0.0), pairs_consumed=int(d.get("pairs_consumed") or 0),
        loss=d.get("loss"), batch_size=d.get("batch_size"),
        steps_per_epoch=d.get("steps_per_epoch"), processes=int(d.get("processes") or 1),
        holdout=None if holdout is None else tuple(
            None if h is None else tuple(h) for h in holdout),
        holdout_score=None if d.get(HOLDOUT) is None else float(d[HOLDOUT]),
        holdout_curve=tuple(tuple(c) for c in d.get("holdout_curve") or ()),
        scale=None if d.get("scale") is None else float(d["scale"]),
        noise=tuple(dict(n) for n in d.get("noise") or ()),
        holdout_quality=None if d.get("holdout_quality") is None else dict(
            d["holdout_quality"]),
        output_offset=float(d.get("output_offset") or 0.0),
        provenance={k: v for k, v in d.items() if k not in known})

  def replace(self, **changes: Any) -> "RunMeta":
    return dataclasses.replace(self, **changes)

  # The read-only mapping view of the JSON fields (and the calibration).
  def _view(self) -> dict:
    view = self.to_json()
    if self.calibration is not None:
      view["calibration"] = dict(self.calibration)
    return view

  def __getitem__(self, key: str) -> Any:
    return self._view()[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._view())

  def __len__(self) -> int:
    return len(self._view())

  __hash__ = None  # a mapping of mutable JSON values


def save(mgr: ocp.CheckpointManager, step: int, meta: RunMeta, params: Any,
         opt: Any = None) -> None:
  """Write the checkpoint of `step` (complete when this returns; raises if it failed):
  the parameters, the optimizer state when given (`{"opt_state", "step"}`, training
  runs), and `meta`, whose held-out score becomes the checkpoint's metric."""
  metrics = None if meta.holdout_score is None else {HOLDOUT: meta.holdout_score}
  items = {PARAMS: ocp.args.StandardSave(params), META: ocp.args.JsonSave(meta.to_json())}
  if opt is not None:
    items[OPT] = ocp.args.StandardSave(opt)
  mgr.save(step, args=ocp.args.Composite(**items), force=True, metrics=metrics)


def save_model(model: "Model", output: str, overwrite: bool = False) -> str:
  """Write `model` as a model directory (its parameters and meta, as step 0, no
  optimizer state) that `load_model`, `denoise` and `train
  --init-from` read; returns its path. Training writes through the same `save`."""
  if os.path.exists(checkpoint_dir(output)):
    if not overwrite:
      raise UserError(f"{output} already holds a model; add --overwrite or choose another "
                      "--output.")
    clear(output)
  try:  # Orbax writes the step atomically (a temporary folder, renamed when complete)
    os.makedirs(output, exist_ok=True)
    mgr = manager(output, keep=1)
    try:
      save(mgr, 0, model.meta.replace(step=0), model.params)
    finally:
      mgr.close()
  except OSError as e:
    raise os_error(e, output) from None
  return os.path.abspath(output)


def best_step(mgr: ocp.CheckpointManager, path: str) -> int:
  """The step whose held-out score is lowest."""
  scored = [(read_meta(mgr, s).get(HOLDOUT), s) for s in mgr.all_steps()]
  scored = [(v, s) for v, s in scored if v is not None]
  if not scored:
    raise UserError(f"{path} has no checkpoint with a held-out score; train with "
                    "--holdout (e.g. 0.1) to have one, or give a step number.")
  return min(scored)[1]


def size_on_disk(workdir: str, step: int) -> int:
  """Bytes of the checkpoint of `step`."""
  total = 0
  for root, _, files in os.walk(os.path.join(checkpoint_dir(workdir), str(step))):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def discard_partial(workdir: str) -> None:
  """Remove what failed saves left (Orbax's temporary folders); call when none runs."""
  folder = checkpoint_dir(workdir)
  # A writer thread of the failed save may still be finishing a file in it: try again
  # for a moment until the folder stays gone.
  for _ in range(DISCARD_TRIES):
    partial = [n for n in os.listdir(folder) if ".orbax-checkpoint-tmp" in n] if \
        os.path.isdir(folder) else []
    if not partial:
      return
    for name in partial:
      shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    time.sleep(DISCARD_WAIT_S)


def _items(mgr: ocp.CheckpointManager, step: int) -> set[str]:
  folder = os.path.join(str(mgr.directory), str(step))
  return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def restore_training(mgr: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """Restore a train state (anything with `params`, `opt_state`, `step` and `replace`,
  given as abstract arrays carrying their shardings) from checkpoint `step`."""
  if STATE_V1 in _items(mgr, step):
    return mgr.restore(step, args=ocp.args.Composite(**{
        STATE_V1: ocp.args.StandardRestore(abstract_state)}))[STATE_V1]
  if OPT not in _items(mgr, step):
    raise UserError(f"{mgr.directory}/{step} holds a model without optimizer state (a "
                    "converted or pruned model), which cannot be resumed; fine-tune it "
                    "with --init-from into a new --workdir.")
  opt = {"opt_state": abstract_state.opt_state, "step": abstract_state.step}
  out = mgr.restore(step, args=ocp.args.Composite(**{
      PARAMS: ocp.args.StandardRestore(abstract_state.params),
      OPT: ocp.args.StandardRestore(opt)}))
  return abstract_state.replace(params=out[PARAMS], opt_state=out[OPT]["opt_state"],
                                step=out[OPT]["step"])


def _restore_params(mgr: ocp.CheckpointManager, step: int, expected: Any) -> Any:
  """The parameters of checkpoint `step` as numpy arrays, restored onto one local
  device whatever topology wrote them (`expected`: their abstract shapes)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), expected)
  if STATE_V1 in _items(mgr, step):  # the params subtree of the one v1 item
    stored = ocp.StandardCheckpointer().metadata(
        os.path.join(str(mgr.directory), str(step), STATE_V1))
    tree = getattr(stored, "item_metadata", stored)
    whole = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)
    whole = dict(whole, params=abstract)
    params = mgr.restore(step, args=ocp.args.Composite(**{
        STATE_V1: ocp.args.StandardRestore(whole)}))[STATE_V1]["params"]
  else:
    params = mgr.restore(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(abstract)}))[PARAMS]
  return jax.tree_util.tree_map(np.asarray, params)


def read_meta(mgr: ocp.CheckpointManager, step: int,
              fix: str = "restore the folder from a backup, or start over with --fresh"
              ) -> dict:
  """The JSON metadata of checkpoint `step`; a damaged one raises `UserError`."""
  try:
    meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  except Exception as e:  # noqa: BLE001 - Orbax raises KeyError, JSONDecodeError, ...
    raise UserError(f"{mgr.directory}/{step}: the checkpoint's metadata cannot be read "
                    f"({_brief(e)}); {fix}.") from None
  if not isinstance(meta, dict):
    raise UserError(f"{mgr.directory}/{step}: the checkpoint's metadata is not a JSON "
                    f"object; {fix}.")
  return dict(meta)


def _brief(e: BaseException) -> str:
  """The first line of an exception, shortened: for one-sentence messages."""
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return f"{type(e).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def stored_shapes(workdir: str, step: int) -> dict[str, tuple[int, ...]] | None:
  """{"['params']...": shape} of the parameter arrays checkpoint `step` holds, from
  Orbax's own metadata (None when it cannot be read)."""
  folder = os.path.join(checkpoint_dir(workdir), str(step))
  v1 = os.path.isdir(os.path.join(folder, STATE_V1))
  try:
    with ocp.StandardCheckpointer() as c:
      tree = c.metadata(os.path.join(folder, STATE_V1 if v1 else PARAMS))
    tree = getattr(tree, "item_metadata", tree)
    tree = tree if v1 else {"params": tree}
    return {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(tree) if hasattr(v, "shape")}
  except Exception:  # noqa: BLE001 - a damaged checkpoint: restoring it will say so
    return None


def _check_readable(path: str, step: int, fix: str) -> None:
  """Reads every stored chunk of checkpoint `step` once, one at a time, before Orbax
  restores it: a cut or damaged data file is found here, with nothing else in flight
  (Orbax reads all arrays at once, and when one fails the others finish into its closed
  event loop, printing a traceback each)."""
  folder = os.path.join(checkpoint_dir(path), str(step))
  for item in (PARAMS, STATE_V1):
    if not os.path.isfile(os.path.join(folder, item, "manifest.ocdbt")):
      continue  # not an OCDBT item (or no arrays: restoring will say so)
    try:
      kv = ts.KvStore.open({"driver": "ocdbt",
                            "base": f"file://{os.path.join(folder, item)}/"}).result()
      for key in kv.list().result():
        kv.read(key).result()
    except Exception as e:  # noqa: BLE001 - TensorStore raises ValueError, OSError, ...
      raise UserError(f"{path}: the arrays of checkpoint {step} cannot be read "
                      f"({_brief(e)}); {fix}.") from None


def _check_arrays(path: str, step: int, meta: RunMeta, expected: Any, fix: str) -> None:
  """Refuses a checkpoint whose arrays are not those its metadata describes (an edited
  or mixed-up metadata file), naming the first array that differs."""
  stored = stored_shapes(path, step)
  if stored is None:
    return
  for key, leaf in jax.tree_util.tree_leaves_with_path({"params": expected}):
    name = jax.tree_util.keystr(key)
    if name in stored and stored[name] != tuple(leaf.shape):
      raise UserError(f"{path}: the arrays of checkpoint {step} do not match its "
                      f"metadata (features={meta.features}, ensemble="
                      f"{meta.config.model.ensemble}): {name} is stored as {stored[name]} "
                      f"but the metadata needs {tuple(leaf.shape)}; the metadata was "
                      f"edited or comes from another model: {fix}.")


def clear(workdir: str) -> None:
  """Remove the checkpoints of a run (only what this package wrote)."""
  path = checkpoint_dir(workdir)
  if os.path.isdir(path):
    shutil.rmtree(path)


def expected_params(cfg: config_lib.Config) -> Any:
  """The abstract parameters (shapes, dtypes) a model of `cfg` has."""
  return jax.eval_shape(lambda: ensemble_params(
      cfg.model.features, 0, cfg.model.ensemble, cfg.model.in_channels, cfg.model.widths))


@dataclasses.dataclass(frozen=True)
class Model:
  """What inference needs: parameters, and the `RunMeta` saying how they were trained."""

  params: Any
  meta: RunMeta
  source: str

  @classmethod
  def create(cls, params: Any, config: config_lib.Config, patch=None,
             mean: float | None = None, source: str = "<memory>", **provenance) -> "Model":
    """A model that no run wrote (random weights, a conversion, a test network)."""
    patch = tuple(config.data.patch if patch is None else patch)
    return cls(params, RunMeta(config=config, patch=patch, mean=mean,
                               provenance=provenance), source)

  @property
  def config(self) -> config_lib.Config:
    return self.meta.config

  @property
  def features(self) -> int:
    return self.meta.features

  @property
  def patch(self) -> tuple[int, int, int]:
    return self.meta.patch

  @property
  def mean(self) -> float | None:
    return self.meta.mean

  @property
  def scale(self) -> float:
    """The training data's scale (what a stream divides by), or data.scale."""
    return self.config.data.scale if self.meta.scale is None else self.meta.scale

  @property
  def overlap(self) -> float:
    return self.config.infer.overlap

  def with_params(self, params: Any) -> "Model":
    return dataclasses.replace(self, params=params)


def load_run(path: str, step: int | str | None = None) -> Model:
  """A model directory (a training run or a converted model): its last checkpoint, a
  chosen step, or 'best' (the lowest held-out score); its calibration.json, if any."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise UserError(f"{path} is not a model directory; give the --workdir of a "
                    "training run (or a DeepCAD-RT .pth file).")
  if not os.path.isdir(checkpoint_dir(path)):
    raise UserError(f"{path} holds no checkpoints ({CHECKPOINTS}/ is missing); train "
                    "a model there first.")
  mgr = manager(path, read_only=True)
  try:
    step, meta, params = _load(mgr, path, step)
  finally:
    mgr.close()
  if meta.output_offset:  # the brightness correction, into the final bias (once)
    params = add_output_offset(params, meta.output_offset)
    meta = meta.replace(output_offset=0.0, provenance={
        **meta.provenance, "output_offset_applied": meta.output_offset})
  return Model(params=params, meta=meta.replace(calibration=_read_calibration(path)),
               source=f"{path}@{step}")


def _read_calibration(path: str) -> dict | None:
  calibration = os.path.join(path, CALIBRATION)
  if not os.path.isfile(calibration):
    return None
  try:
    with open(calibration) as f:
      record = json.load(f)
    float(record["std_scale"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{calibration} is damaged ({_brief(e)}); delete it and run "
                    "'deepcad-jax calibrate' again (or restore it).") from None
  return record


def _choose_step(mgr: ocp.CheckpointManager, path: str, step: int | str | None) -> int:
  steps = mgr.all_steps()
  if not steps:
    raise UserError(f"{path} holds no complete checkpoint; train a model there first.")
  if step == "best":
    return best_step(mgr, path)
  if isinstance(step, str):
    try:
      step = int(step)
    except ValueError:
      raise UserError(f"--step takes a checkpoint number or 'best'; got {step!r}.") from None
  if step is None:
    return max(steps)
  if step not in steps:
    raise UserError(f"{path} has no checkpoint at step {step}; available: "
                    f"{sorted(steps)}.")
  return step


def _load(mgr: ocp.CheckpointManager, path: str, step: int | str | None
          ) -> tuple[int, RunMeta, Any]:
  """(step, meta, params) of a run directory, every part checked."""
  step = _choose_step(mgr, path, step)
  earlier = sorted(s for s in mgr.all_steps() if s < step)
  fix = (f"use an earlier checkpoint with --step {earlier[-1]}, or restore the folder "
         "from a backup" if earlier else "restore the folder from a backup or train "
         "the model again")
  stored = read_meta(mgr, step, fix)
  if stored.get("format") not in (FORMAT, FORMAT_V1):
    raise UserError(f"{path} was not written by deepcad-jax ({FORMAT}).")
  try:
    meta = RunMeta.from_json(stored)
  except (UserError, KeyError, TypeError, ValueError, AttributeError) as e:
    raise UserError(f"{path}: the metadata of checkpoint {step} is invalid "
                    f"({_brief(e)}); {fix}.") from None
  _check_readable(path, step, fix)
  expected = expected_params(meta.config)
  _check_arrays(path, step, meta, expected, fix)
  try:
    params = _restore_params(mgr, step, expected)
  except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many kinds
    raise UserError(f"{path}: the arrays of checkpoint {step} cannot be read "
                    f"({_brief(e)}); {fix}.") from None
  return step, meta, params
