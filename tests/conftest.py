"""Test set-up: four simulated CPU devices (set before jax is imported) and small fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same small programs (new Denoisers, worker processes): a
# compilation cache shared by the session and its subprocesses compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"deepcad-jax-test-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import logging  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tifffile  # noqa: E402

from deepcad_jax import cli  # noqa: E402
from deepcad_jax import config as config_lib  # noqa: E402


@pytest.fixture(autouse=True)
def cli_logs_reach_caplog(monkeypatch):
  """The CLI stops its logger propagating (one line per message at a terminal); in
  tests its records must still reach pytest's caplog handler on the root logger, or
  every test after the first CLI call would see no log at all."""
  setup = cli._setup_logging

  def setup_and_propagate():
    setup()
    logging.getLogger("deepcad_jax").propagate = True
  monkeypatch.setattr(cli, "_setup_logging", setup_and_propagate)
  logging.getLogger("deepcad_jax").propagate = True


@pytest.fixture(scope="session")
def devices():
  devs = jax.devices()
  if jax.default_backend() != "cpu" and len(devs) < 4:
    pytest.skip(f"needs 4 devices; this {devs[0].platform} machine has {len(devs)}")
  assert len(devs) == 4, "conftest must set 4 simulated devices before jax is imported"
  return devs


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


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, devices):
  """A tiny model trained for a few steps on one device (shared by inference tests)."""
  from deepcad_jax import train
  root = tmp_path_factory.mktemp("model")
  movie, _ = noisy_movie((40, 24, 24))
  path = write_tiff(root / "movie.tif", movie)
  train(path, str(root / "run"), tiny_config(**{"train.epochs": 1}), devices=devices[:1],
        progress=False)
  return str(root / "run")
