"""deepcad-jax: self-supervised denoising of fluorescence movies (DeepCAD-RT) in JAX."""

__version__ = "0.1.0"

from deepcad_jax.checkpoint import Model, load_model
from deepcad_jax.config import Config, load_config
from deepcad_jax.errors import UserError
from deepcad_jax.infer import Denoiser, denoise, denoise_files
from deepcad_jax.model import LADDER, UNet3D
from deepcad_jax.train import TrainResult, train

__all__ = ["Config", "Denoiser", "denoise", "denoise_files", "LADDER", "Model", "TrainResult", "UNet3D", "UserError",
           "load_config", "load_model", "train"]
