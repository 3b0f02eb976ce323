"""The fault matrix's row and folder types, shared by the row modules.

`tests/robustness/test_faults.py` runs the rows; `fault_rows_data.py` (files and formats)
and `fault_rows_commands.py` (command flags, processes, outputs) hold the newer ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import pytest

from tests.helpers import noisy_movie, write_tiff


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
  patch: Callable[[pytest.MonkeyPatch, Files], None] | None = None  # in-process faults
  # Rows whose right answer is not an error (the run must succeed and leave the user's
  # files as they were): called with (files, code, stdout, stderr) instead of the
  # one-`error:`-line checks.
  check: Callable[[Files, int, str, str], None] | None = None
