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

from deepcad_jax import config as config_lib
from deepcad_jax.errors import UserError

FORMAT = "deepcad-jax/1"
CHECKPOINTS = "checkpoints"
CALIBRATION = "calibration.json"  # uncertainty recalibration, written by `calibrate`


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


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
  """The run's checkpoint manager. Saves are synchronous, so a failed write (a full
  disk) raises in `save` itself, before older checkpoints are pruned; temporary folders
  of a save that a kill cut short are removed when a writable manager opens."""
  policy = KeepEpochs(keep, steps_per_epoch) if steps_per_epoch else \
      ocp.checkpoint_managers.LatestN(n=keep)
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, create=not read_only, read_only=read_only,
      enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Write the checkpoint of `step` (complete when this returns; raises if it failed)."""
  mgr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)


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


def load_model(path: str, step: int | None = None, para: str | None = None) -> Model:
  """Load a trained model: a run directory (its last or a chosen checkpoint), a
  directory written by `deepcad-jax convert`, or a DeepCAD-RT .pth file (with the
  para.yaml beside it, or `para`)."""
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
