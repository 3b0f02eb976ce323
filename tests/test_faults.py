"""The fault matrix: every command that takes a file, against bad inputs and faults.

Each row of `FAULTS` names a command, builds its inputs in a fresh folder and says which
sentence the user must get. For every row the harness checks:
- the exit status (2 unless the row says otherwise);
- exactly one line on stderr starts with `error:`, and it matches the row's pattern
  (which names the file);
- no traceback on stdout or stderr;
- every input is byte-identical afterwards;
- no file exists under a final output name, and no temporary file is left beside it.

Rows run in this process (fast) unless `process=True` (signals, kills and concurrent
runs need a real process). `test_fault_matrix_size` reports how many rows there are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import noisy_movie, write_tiff
from deepcad_jax import cli
from helpers_processes import hold_lock, workdir_with_a_checkpoints_file


@dataclasses.dataclass
class Files:
  """The folder a row builds its inputs in, and what it declares about them."""

  root: Path
  model: str
  inputs: list[str] = dataclasses.field(default_factory=list)
  outputs: list[str] = dataclasses.field(default_factory=list)

  def input(self, path) -> str:
    """Declare `path` an input: it must be byte-identical after the run."""
    self.inputs.append(str(path))
    return str(path)

  def output(self, path) -> str:
    """Declare `path` an output the failing run must not leave behind."""
    self.outputs.append(str(path))
    return str(path)

  def movie(self, name="movie.tif", shape=(40, 24, 24), seed=0, **kwargs) -> str:
    return self.input(write_tiff(self.root / name, noisy_movie(shape, seed)[0], **kwargs))

  def raw(self, name: str, data: bytes) -> str:
    path = self.root / name
    path.write_bytes(data)
    return self.input(path)


@dataclasses.dataclass(frozen=True)
class Fault:
  """One row: `deepcad-jax COMMAND ARGS` where `make(files)` returns ARGS."""

  name: str
  command: str
  make: Callable[[Files], list[str]]
  expect: str            # regex the one `error:` line must match
  code: int = 2
  process: bool = False  # run in a fresh process


def _truncated_tiff(files: Files, name="cut.tif") -> str:
  path = write_tiff(files.root / "whole.tif", noisy_movie((40, 24, 24))[0])
  data = Path(path).read_bytes()
  os.remove(path)
  return files.raw(name, data[:len(data) // 2])


FAULTS: list[Fault] = [
    # -- inputs that are not movies ------------------------------------------------
    Fault("train: missing file", "train",
          lambda f: ["--config", "tiny", "--data", str(f.root / "nope.tif"),
                     "--workdir", f.output(f.root / "run")], r"nope\.tif does not exist"),
    Fault("train: not a TIFF", "train",
          lambda f: ["--config", "tiny", "--data", f.raw("movie.avi", b"RIFF...."),
                     "--workdir", f.output(f.root / "run")], r"movie\.avi is not a TIFF"),
    Fault("train: a 2-D image", "train",
          lambda f: ["--config", "tiny", "--data", f.input(write_tiff(
              f.root / "img.tif", noisy_movie((1, 24, 24))[0][0])),
                     "--workdir", f.output(f.root / "run")], r"img\.tif is a single 2-D"),
    Fault("denoise: missing input", "denoise",
          lambda f: ["--model", f.model, "--input", str(f.root / "nope.tif"),
                     "--output", f.output(f.root / "den.tif")], r"nope\.tif does not exist"),
    Fault("denoise: not a model", "denoise",
          lambda f: ["--model", str(f.root / "nomodel"), "--input", f.movie(),
                     "--output", f.output(f.root / "den.tif")],
          r"nomodel is not a model directory"),
    Fault("denoise: output is the input", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--output",
                     str(f.root / "movie.tif"), "--overwrite"], r"movie\.tif is the input"),
    Fault("denoise: output exists", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--output",
                     f.raw("den.tif", b"keep me")], r"den\.tif already exists"),
    Fault("denoise: output not a TIFF name", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--output",
                     f.output(f.root / "den.png")], r"den\.png must end in \.tif"),
    Fault("evaluate: shapes differ", "evaluate",
          lambda f: ["--denoised", f.movie("a.tif", (40, 24, 24)), "--reference",
                     f.movie("b.tif", (30, 24, 24))], r"a\.tif|b\.tif"),
    Fault("convert: not a .pth", "convert",
          lambda f: ["--pth", f.raw("model.pth", b"not a zip"), "--output",
                     f.output(f.root / "conv")], r"model\.pth is not a PyTorch checkpoint"),
    Fault("stream: missing source", "stream",
          lambda f: ["--model", f.model, "--source", str(f.root / "nope.tif"),
                     "--output", f.output(f.root / "live.tif")], r"nope\.tif does not exist"),
    # -- outputs: writing, disks, metadata, precision ---------------------------------

    # -- inputs: damaged files, odd TIFFs, honest numbers -----------------------------

    # -- processes: locks, signals, kills, checkpoints --------------------------------
    Fault("train: workdir in use by another run", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--fresh", "--workdir",
                     f.input(hold_lock(f, f.root / "run"))],
          r"run is in use by another training run \(PID \d+", process=True),
    Fault("train: workdir is a file", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--workdir",
                     f.raw("run", b"not a folder")], r"run is a file, not a folder"),
    Fault("train: workdir/checkpoints is a file", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--fresh", "--workdir",
                     workdir_with_a_checkpoints_file(f)],
          r"run/checkpoints is a file, not a folder"),

]


def _digest(path: str) -> str:
  if os.path.isdir(path):
    return "dir:" + ",".join(sorted(os.listdir(path)))
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _leftovers(files: Files) -> list[str]:
  """Final outputs, and temporary files beside them, that a failed run left."""
  found = [p for p in files.outputs if os.path.exists(p)]
  folders = {os.path.dirname(p) for p in files.outputs}
  for folder in folders:
    if os.path.isdir(folder):
      found += [os.path.join(folder, n) for n in os.listdir(folder)
                if ".partial" in n or n.endswith(".tmp")]
  return found


def run_fault(fault: Fault, root: Path, model: str) -> tuple[int, str, str, Files]:
  files = Files(root, model)
  args = fault.make(files)
  before = {p: _digest(p) for p in files.inputs}
  argv = ["deepcad-jax", fault.command, *args]
  if fault.process:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "deepcad_jax", *argv[1:]],
                          capture_output=True, text=True, env=env, timeout=300)
    code, out, err = done.returncode, done.stdout, done.stderr
  else:
    import contextlib
    import io
    out_buf, err_buf = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf):
      code = cli.main(argv)
    out, err = out_buf.getvalue(), err_buf.getvalue()
  changed = [p for p, d in before.items() if not os.path.exists(p) or _digest(p) != d]
  assert not changed, f"inputs changed: {changed}"
  return code, out, err, files


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault(fault, tmp_path, trained_model):
  code, out, err, files = run_fault(fault, tmp_path, trained_model)
  assert "Traceback" not in out + err, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, err[-3000:]
  assert re.search(fault.expect, errors[0]), errors[0]
  assert code == fault.code, (code, err[-2000:])
  assert not _leftovers(files), _leftovers(files)


def test_fault_matrix_size():
  commands = sorted({f.command for f in FAULTS})
  print(f"fault matrix: {len(FAULTS)} rows over {len(commands)} commands "
        f"({', '.join(commands)})")
  assert len(FAULTS) >= 10
