"""`load_model`: a trained model from wherever it lives.

A model directory (a training run or `deepcad-jax convert`'s output) is read by
`checkpoint.load_run`; a DeepCAD-RT .pth by `convert.load_pth_model`. This module only
dispatches, so that neither of those needs the other.
"""

from __future__ import annotations

import os

from deepcad_jax.model_io.checkpoint import Model, load_run
from deepcad_jax.model_io.convert import load_pth_model

PTH_SUFFIXES = (".pth", ".pt")


def load_model(path: str | os.PathLike, step: int | str | None = None,
               para: str | None = None) -> Model:
  """Load a trained model: a run directory (its last checkpoint, a chosen step, or
  'best': the lowest held-out score), a directory written by `deepcad-jax convert`, or
  a DeepCAD-RT .pth file (with the para.yaml beside it, or `para`)."""
  path = os.fspath(path)
  if path.endswith(PTH_SUFFIXES):
    return load_pth_model(path, para)
  return load_run(path, step)
