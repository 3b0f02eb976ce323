"""Training-run directories: Orbax checkpoints plus the metadata inference needs.

A run directory holds `checkpoints/<step>/` with two items: `state` (params, optimizer
state, step) and `meta` (JSON: config, network width, patch, normalisation, training
data summary, and the data-pipeline position: pairs consumed). The input pipeline is a
pure function of (seed, step), so the step is all a resumed run (with any number of
processes) needs to continue the same stream. Orbax writes each step atomically, so an
interrupted save never hides the previous complete one; on several hosts it coordinates
the write.
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

from deepcad_jax import config as config_lib
from deepcad_jax.errors import UserError

FORMAT = "deepcad-jax/1"
CHECKPOINTS = "checkpoints"
CALIBRATION = "calibration.json"  # uncertainty recalibration, written by `calibrate`


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


HOLDOUT = "holdout_score"  # the metric a checkpoint may carry; lower is better


def manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """The run's checkpoints: the latest `keep`, and the one with the best held-out score
  (when steps carry one)."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[HOLDOUT], reverse=True, n=1,
                                    keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, create=not read_only, read_only=read_only,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Start an asynchronous save; `mgr.wait_until_finished()` before exiting. A held-out
  score in `meta` becomes the checkpoint's metric."""
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


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state: Any):
  """Restore the train state onto the shardings in `abstract_state`."""
  out = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return out.state


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
  return dict(mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


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
  meta = read_meta(mgr, step)
  if meta.get("format") != FORMAT:
    raise UserError(f"{path} was not written by deepcad-jax ({FORMAT}).")
  cfg = config_lib.from_dict(meta["config"])
  # Restore onto one local device, whatever topology wrote the checkpoint.
  from deepcad_jax.train import create_state
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      jax.eval_shape(lambda: create_state(cfg)))
  state = restore(mgr, step, abstract)
  mgr.close()
  params = jax.tree_util.tree_map(np.asarray, state.params)
  calibration = os.path.join(path, CALIBRATION)
  if os.path.isfile(calibration):
    with open(calibration) as f:
      meta["calibration"] = json.load(f)
  return Model(params=params, features=int(meta["features"]),
               patch=tuple(int(p) for p in meta["patch"]),
               mean=None if meta.get("mean") is None else float(meta["mean"]),
               config=cfg, meta=meta, source=f"{path}@{step}")
