"""deepcad-jax: self-supervised denoising of fluorescence movies (DeepCAD-RT) in JAX.

Inference (`load_model`, `DenoiseConfig`, `Denoiser`, `denoise`, and the calibrated
uncertainty `calibrated_uncertainty`, `write_uncertainty`, `write_calibrated_uncertainty`)
imports no training code; `train` and `TrainResult` (which need grain and optax) are
imported when first used.
"""

import importlib

__version__ = "0.1.0"

from deepcad_jax.analysis.uncertainty.bootstrap import calibrated_uncertainty
from deepcad_jax.analysis.uncertainty.files import write_calibrated_uncertainty, write_uncertainty
from deepcad_jax.config import Config, DenoiseConfig, load_config
from deepcad_jax.core.network import LADDER, UNet3D
from deepcad_jax.denoising.denoiser import Denoiser, denoise
from deepcad_jax.denoising.files import denoise_files
from deepcad_jax.errors import UserError
from deepcad_jax.model_io.checkpoint import Model, RunMeta
from deepcad_jax.model_io.loading import load_model

_TRAINING = ("train", "TrainResult")

__all__ = ["calibrated_uncertainty", "write_calibrated_uncertainty", "write_uncertainty",
           "Config", "DenoiseConfig", "Denoiser", "denoise", "denoise_files", "LADDER",
           "Model", "RunMeta", "TrainResult", "UNet3D", "UserError", "load_config",
           "load_model", "train"]


def __getattr__(name: str):
  """`train` and `TrainResult`, imported on first use (a deliberate lazy import)."""
  if name in _TRAINING:
    module = importlib.import_module("deepcad_jax.training.loop")
    globals().update({n: getattr(module, n) for n in _TRAINING})
    return globals()[name]
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
