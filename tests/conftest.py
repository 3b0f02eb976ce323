"""Test set-up: four simulated CPU devices (set before jax is imported) and the shared
fixtures; plain helpers live in `tests.helpers`."""

import logging
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

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import noisy_movie, tiny_config, write_tiff  # noqa: E402


@pytest.fixture(autouse=True)
def _package_logger_as_it_was():
  """The CLI points the package's logger at stderr and stops it propagating (cli/app.py);
  put it back after each test, so that what a test sees in caplog does not depend on
  which tests ran a command before it."""
  logger = logging.getLogger("deepcad_jax")
  propagate, level, handlers = logger.propagate, logger.level, list(logger.handlers)
  yield
  logger.propagate, logger.handlers[:] = propagate, handlers
  logger.setLevel(level)


@pytest.fixture(scope="session")
def devices():
  devs = jax.devices()
  if jax.default_backend() != "cpu" and len(devs) < 4:
    pytest.skip(f"needs 4 devices; this {devs[0].platform} machine has {len(devs)}")
  assert len(devs) == 4, "conftest must set 4 simulated devices before jax is imported"
  return devs


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
