"""Training-run directories: Orbax checkpoints plus the metadata inference needs.

A run directory holds `checkpoints/<step>/` with two items: `state` (params, optimizer
state, step) and `meta` (JSON: config, network width, patch, normalisation, training
data summary, and the data-pipeline position: pairs consumed). The input pipeline is a
pure function of (seed, step), so the step is all a resumed run (with any number of
processes) needs to continue the same stream. Orbax writes each step atomically, so an
interrupted save never hides the previous complete one; on several hosts it coordinates
the write. Saves are synchronous (a few tenths of a second for DeepCAD-RT's 1M
parameters and their Adam state): a failure surfaces at once, not steps later.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from deepcad_jax import config as config_lib
from deepcad_jax.errors import UserError

FORMAT = "deepcad-jax/1"
CHECKPOINTS = "checkpoints"
CALIBRATION = "calibration.json"  # uncertainty recalibration, written by `calibrate`


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


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


def save(mgr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Write the checkpoint of `step` (complete when this returns; raises if it failed).
  A held-out score in `meta` becomes the checkpoint's metric."""
  metrics = {HOLDOUT: float(meta[HOLDOUT])} if meta.get(HOLDOUT) is not None else None
  mgr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True,
      metrics=metrics)


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
  if os.path.isdir(folder):
    for name in os.listdir(folder):
      if ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state: Any):
  """Restore the train state onto the shardings in `abstract_state`."""
  out = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return out.state


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
  """{'params/...': shape} of the arrays checkpoint `step` holds, from Orbax's own
  metadata (None when it cannot be read)."""
  try:
    with ocp.StandardCheckpointer() as c:
      tree = c.metadata(os.path.join(checkpoint_dir(workdir), str(step), "state"))
    tree = getattr(tree, "item_metadata", tree)
    return {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(tree) if hasattr(v, "shape")}
  except Exception:  # noqa: BLE001 - a damaged checkpoint: restoring it will say so
    return None


def _check_readable(path: str, step: int, fix: str) -> None:
  """Reads every stored chunk of checkpoint `step` once, one at a time, before Orbax
  restores it: a cut or damaged data file is found here, with nothing else in flight
  (Orbax reads all arrays at once, and when one fails the others finish into its closed
  event loop, printing a traceback each)."""
  state = os.path.join(checkpoint_dir(path), str(step), "state")
  if not os.path.isfile(os.path.join(state, "manifest.ocdbt")):
    return  # not an OCDBT checkpoint (or no arrays: restoring will say so)
  try:
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state}/"}).result()
    for key in kv.list().result():
      kv.read(key).result()
  except Exception as e:  # noqa: BLE001 - TensorStore raises ValueError, OSError, ...
    raise UserError(f"{path}: the arrays of checkpoint {step} cannot be read "
                    f"({_brief(e)}); {fix}.") from None


def _check_arrays(path: str, step: int, meta: dict, expected: Any, fix: str) -> None:
  """Refuses a checkpoint whose arrays are not those its metadata describes (an edited
  or mixed-up metadata file), naming the first array that differs."""
  stored = stored_shapes(path, step)
  if stored is None:
    return
  for key, leaf in jax.tree_util.tree_leaves_with_path({"params": expected.params}):
    name = jax.tree_util.keystr(key)
    if name in stored and stored[name] != tuple(leaf.shape):
      raise UserError(f"{path}: the arrays of checkpoint {step} do not match its "
                      f"metadata (features={meta.get('features')}, ensemble="
                      f"{meta.get('ensemble', 1)}): {name} is stored as {stored[name]} "
                      f"but the metadata needs {tuple(leaf.shape)}; the metadata was "
                      f"edited or comes from another model: {fix}.")


def clear(workdir: str) -> None:
  """Remove the checkpoints of a run (only what this package wrote)."""
  path = checkpoint_dir(workdir)
  if os.path.isdir(path):
    shutil.rmtree(path)


@dataclasses.dataclass(frozen=True)
class Model:
  """What inference needs: parameters and how they were trained."""

  params: Any
  features: int
  patch: tuple[int, int, int]
  mean: float | None          # training data mean (None for an imported .pth)
  config: config_lib.Config
  meta: dict
  source: str

  @property
  def overlap(self) -> float:
    return self.config.infer.overlap


def load_model(path: str, step: int | str | None = None, para: str | None = None) -> Model:
  """Load a trained model: a run directory (its last checkpoint, a chosen step, or
  'best': the lowest held-out score), a directory written by `deepcad-jax convert`, or
  a DeepCAD-RT .pth file (with the para.yaml beside it, or `para`)."""
  path = os.fspath(path)
  if path.endswith((".pth", ".pt")):
    from deepcad_jax.convert import load_pth_model
    return load_pth_model(path, para)
  if not os.path.isdir(path):
    raise UserError(f"{path} is not a model directory; give the --workdir of a "
                    "training run (or a DeepCAD-RT .pth file).")
  if not os.path.isdir(checkpoint_dir(path)):
    raise UserError(f"{path} holds no checkpoints ({CHECKPOINTS}/ is missing); train "
                    "a model there first.")
  mgr = manager(path, read_only=True)
  try:
    step, meta, cfg, state = _load(mgr, path, step)
  finally:
    mgr.close()
  params = jax.tree_util.tree_map(np.asarray, state.params)
  calibration = os.path.join(path, CALIBRATION)
  if os.path.isfile(calibration):
    try:
      with open(calibration) as f:
        meta["calibration"] = json.load(f)
      float(meta["calibration"]["std_scale"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise UserError(f"{calibration} is damaged ({_brief(e)}); delete it and run "
                      "'deepcad-jax calibrate' again (or restore it).") from None
  return Model(params=params, features=int(meta["features"]),
               patch=tuple(int(p) for p in meta["patch"]),
               mean=None if meta.get("mean") is None else float(meta["mean"]),
               config=cfg, meta=meta, source=f"{path}@{step}")


def _load(mgr: ocp.CheckpointManager, path: str, step: int | None
          ) -> tuple[int, dict, config_lib.Config, Any]:
  """(step, meta, config, train state) of a run directory, every part checked."""
  steps = mgr.all_steps()
  if not steps:
    raise UserError(f"{path} holds no complete checkpoint; train a model there first.")
  if step == "best":
    step = best_step(mgr, path)
  elif isinstance(step, str):
    try:
      step = int(step)
    except ValueError:
      raise UserError(f"--step takes a checkpoint number or 'best'; got {step!r}.") from None
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise UserError(f"{path} has no checkpoint at step {step}; available: "
                    f"{sorted(steps)}.")
  earlier = sorted(s for s in steps if s < step)
  fix = (f"use an earlier checkpoint with --step {earlier[-1]}, or restore the folder "
         "from a backup" if earlier else "restore the folder from a backup or train "
         "the model again")
  meta = read_meta(mgr, step, fix)
  if meta.get("format") != FORMAT:
    raise UserError(f"{path} was not written by deepcad-jax ({FORMAT}).")
  try:
    cfg = config_lib.from_dict(meta["config"])
    features, patch = int(meta["features"]), tuple(int(p) for p in meta["patch"])
    if features != cfg.model.features or len(patch) != 3 or min(patch) < 8:
      raise ValueError(f"features={meta['features']} and patch={meta['patch']} do not "
                       f"fit its config (features={cfg.model.features})")
  except (UserError, KeyError, TypeError, ValueError, AttributeError) as e:
    raise UserError(f"{path}: the metadata of checkpoint {step} is invalid "
                    f"({_brief(e)}); {fix}.") from None
  _check_readable(path, step, fix)
  # Restore onto one local device, whatever topology wrote the checkpoint.
  from deepcad_jax.train import create_state
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      jax.eval_shape(lambda: create_state(cfg)))
  _check_arrays(path, step, meta, abstract, fix)
  try:
    state = restore(mgr, step, abstract)
  except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many kinds
    raise UserError(f"{path}: the arrays of checkpoint {step} cannot be read "
                    f"({_brief(e)}); {fix}.") from None
  return step, meta, cfg, state
