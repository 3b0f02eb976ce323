"""deepcad-jax: self-supervised denoising of fluorescence movies (DeepCAD-RT) in JAX.

Inference (`load_model`, `DenoiseConfig`, `Denoiser`, `denoise`) imports no training code; `train` and
`TrainResult` (which need grain and optax) are imported when first used.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

from deepcad_jax.checkpoint import Model, RunMeta
from deepcad_jax.config import Config, DenoiseConfig, load_config
from deepcad_jax.errors import UserError
from deepcad_jax.infer import Denoiser, denoise, denoise_files
from deepcad_jax.loading import load_model
from deepcad_jax.model import LADDER, UNet3D

_TRAINING = ("train", "TrainResult")

__all__ = ["Config", "DenoiseConfig", "Denoiser", "denoise", "denoise_files", "LADDER",
           "Model", "RunMeta", "TrainResult", "UNet3D", "UserError", "load_config",
           "load_model", "train"]


class _Package(types.ModuleType):
  """The package module: the submodule `deepcad_jax.train`, when imported, is bound
  here as the function `train` (the public API), not as the module."""

  def __setattr__(self, name: str, value) -> None:
    if name == "train" and isinstance(value, types.ModuleType):
      value = value.train
    super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
  """`train` and `TrainResult`, imported on first use (a deliberate lazy import)."""
  if name in _TRAINING:
    module = importlib.import_module("deepcad_jax.train")
    # Importing the submodule bound the package's `train` to it: bind the function.
    globals().update({n: getattr(module, n) for n in _TRAINING})
    return globals()[name]
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
