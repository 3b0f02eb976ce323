"""Helpers shared by the tests: small movies, TIFF files and the tiny config."""

import numpy as np
import tifffile

from deepcad_jax import config as config_lib


def write_tiff(path, array, **kwargs):
  tifffile.imwrite(path, array, photometric="minisblack", **kwargs)
  return str(path)


def noisy_movie(shape=(40, 24, 24), seed=0, dtype=np.uint16):
  """A slowly varying bright pattern with Poisson noise."""
  rng = np.random.default_rng(seed)
  t, y, x = shape
  yy, xx = np.mgrid[:y, :x]
  base = 60 + 40 * np.sin(yy / 4.0) * np.cos(xx / 5.0)
  clean = base[None] * (1 + 0.3 * np.sin(np.arange(t) / 6.0))[:, None, None]
  return rng.poisson(clean).astype(dtype), clean.astype(np.float32)


def tiny_config(**changes):
  cfg = config_lib.load_config("tiny")
  return config_lib.override(cfg, **changes) if changes else cfg
