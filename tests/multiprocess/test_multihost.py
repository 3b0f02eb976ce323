"""Real multi-process runs: 2 processes on 127.0.0.1, 2 CPU devices each, gloo."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import noisy_movie, tiny_config, write_tiff
from deepcad_jax import load_model
from deepcad_jax import train
from deepcad_jax.data import open_movie
from deepcad_jax.denoising.denoiser import Denoiser, denoise, whole_movie_forward

pytestmark = pytest.mark.multiprocess

WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
from deepcad_jax import cli
sys.exit(cli.main(["deepcad-jax"] + sys.argv[1:]))
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(args, timeout=240):
  """Run `deepcad-jax ARGS` as processes 0 and 1 of one run; returns their outputs."""
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen(
      [sys.executable, "-c", WORKER, *args, "--coordinator", f"127.0.0.1:{port}",
       "--num-processes", "2", "--process-id", str(i)],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
      for i in range(2)]
  try:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("mh")
  movie, _ = noisy_movie((40, 24, 24))
  return root, write_tiff(root / "movie.tif", movie)


def _leaves(params):
  return jax.tree_util.tree_leaves(jax.device_get(params))


@pytest.mark.slow
def test_two_process_training_equals_one_process_and_resumes(data, devices):
  root, movie = data
  two = str(root / "two")
  outs = run_two_processes(["train", "--config", "tiny", "--data", movie, "--workdir", two,
                            "--epochs", "1", "--batch-size", "4", "--seed", "1"])
  assert "workdir:" in outs[0] and "workdir:" not in outs[1]  # process 0 reports
  cfg = tiny_config(**{"train.epochs": 1, "train.batch_size": 4, "train.seed": 1})
  one = train(movie, str(root / "one"), cfg, devices=devices, progress=False)
  two_model = load_model(two)
  assert two_model.meta["processes"] == 2 and two_model.meta["step"] == one.step == 4
  # As loaded: the parameters and the brightness offset (fitted after the last step,
  # applied to the final bias at load) agree.
  for a, b in zip(_leaves(load_model(one.workdir).params), _leaves(two_model.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  # A 2-process checkpoint resumes in one process, reaching an uninterrupted run.
  cfg2 = tiny_config(**{"train.epochs": 2, "train.batch_size": 4, "train.seed": 1})
  resumed = train(movie, two, cfg2, devices=devices, progress=False)
  straight = train(movie, str(root / "straight"), cfg2, devices=devices, progress=False)
  assert resumed.step == straight.step == 8
  for a, b in zip(_leaves(resumed.state.params), _leaves(straight.state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["exact", "blend"])
def test_two_process_denoise_equals_one_process(data, trained_model, mode):
  root, _ = data
  # Exact: five temporal tiles shared by the processes, equal to the whole movie.
  frames, flags = (130, ["--tiling", "exact", "--tile", "104,24,32"]) if mode == "exact" \
      else (61, ["--blend"])
  movie, _ = noisy_movie((frames, 20, 28), seed=9)
  src = write_tiff(root / f"long{mode}.tif", movie)
  out = str(root / f"den2_{mode}.tif")
  run_two_processes(["denoise", "--model", trained_model, "--input", src, "--output", out,
                     "--output-dtype", "float32"] + flags)
  den = Denoiser(trained_model, blend=mode == "blend", tiling="exact" if mode == "exact"
                 else "auto", tile=(104, 24, 32) if mode == "exact" else None)
  expected = denoise(movie, den, output_dtype="float32")
  got = open_movie(out).read(0, frames)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
  if mode == "exact":
    assert den.plan(movie.shape, movie.dtype, np.float32).tile_count == 5
    # the network's output, shared by the processes, plus one static image (the
    # regional brightness correction, fitted on process 0 from the parts)
    whole = whole_movie_forward(movie, den)
    field = (got - whole).mean(0)
    assert np.sqrt(np.mean((got - field - whole) ** 2)) / np.std(whole) <= 1e-5
  assert not list(root.glob(f".den2_{mode}.tif.part*"))  # parts cleaned up
  assert not list(root.glob("*.lock")) and not list(root.glob(".*.partial"))


def test_two_process_denoise_of_a_folder_splits_the_files(data, trained_model):
  root, _ = data
  folder = root / "many"
  folder.mkdir()
  for i in range(3):
    write_tiff(folder / f"m{i}.tif", noisy_movie((16, 16, 16), seed=i)[0])
  run_two_processes(["denoise", "--model", trained_model, "--input", str(folder),
                     "--output", str(root / "many_out")])
  for i in range(3):
    expected = denoise(open_movie(str(folder / f"m{i}.tif")), trained_model)
    np.testing.assert_allclose(open_movie(str(root / "many_out" / f"m{i}.tif")).read(0, 16),
                               expected, rtol=1e-6, atol=1e-4)  # float32: 2 vs 4 devices


def test_incomplete_multi_process_flags_get_one_clear_sentence(capsys, monkeypatch):
  from deepcad_jax import cli
  from deepcad_jax.runtime import distributed
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
               "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize(auto=True) is False  # no cluster: one process
  with pytest.raises(distributed.UserError, match="--process-id must be in"):
    distributed.initialize("127.0.0.1:1", 2, 5)
  code = cli.main(["deepcad-jax", "train", "--data", "x.tif", "--workdir", "w",
                   "--coordinator", "127.0.0.1:1234"])
  err = capsys.readouterr().err
  assert code == 2 and "needs --coordinator HOST:PORT, --num-processes N" in err
