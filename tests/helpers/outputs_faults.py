"""Faults of the outputs section of the fault matrix (tests/test_faults.py): read-only
folders and file systems, full disks, held locks. Each `patch` helper is applied with a
MonkeyPatch that the harness undoes after the row, and acts only under the row's folder.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

import deepcad_jax.runtime.files as output_mod

READ_ONLY = "ro"  # the folder the read-only patches act on, under the row's root


def readonly_folder(files, name: str = READ_ONLY) -> Path:
  """A real folder with mode 0o555; skips the row where that does not stop writes (root,
  or a file system without permissions)."""
  folder = files.root / name
  folder.mkdir()
  folder.chmod(0o555)
  probe = folder / ".probe"
  try:
    probe.write_bytes(b"")
  except PermissionError:
    return folder
  probe.unlink()
  folder.chmod(0o755)
  pytest.skip("chmod 0o555 does not stop writes here (running as root?); the "
              "read-only file system row covers the same path")


def _under(path, root: Path) -> bool:
  try:
    return os.path.abspath(os.fsdecode(path)).startswith(str(root) + os.sep)
  except TypeError:  # a file descriptor
    return False


def also(files, *paths) -> list[str]:
  """Declare more outputs of a row (files the command writes without a flag naming
  them); no arguments."""
  for path in paths:
    files.output(path)
  return []


def folder_named(files, name: str) -> list[str]:
  """An existing folder where the command will want to write a file; no arguments."""
  (files.root / name).mkdir()
  files.input(files.root / name)
  return []


def movie_folder(files, name: str = "in") -> str:
  """A folder holding one movie (declared an input)."""
  (files.root / name).mkdir()
  files.movie(f"{name}/a.tif")
  return str(files.root / name)


def exported_pth(files) -> str:
  """The row's model exported as DeepCAD-RT's .pth (with para.yaml), declared inputs."""
  from deepcad_jax.export import export
  path = str(files.root / "model.pth")
  export(files.model, path, "pth")
  files.input(files.root / "para.yaml")
  return files.input(path)


def rois_json(files, name: str = "rois.json") -> str:
  """One square ROI for 24x24 frames, declared an input."""
  spec = {"rois": [{"name": "cell", "polygon": [[4, 4], [4, 10], [10, 10], [10, 4]]}]}
  return files.raw(name, json.dumps(spec).encode())


def read_only_fs(mp: pytest.MonkeyPatch, files) -> None:
  """Creating files or folders under ROOT/ro fails with EROFS (a read-only mount); the
  folder itself exists."""
  root = files.root / READ_ONLY
  root.mkdir(exist_ok=True)
  real_open, real_mkdir = os.open, os.mkdir

  def fake_open(path, flags, mode=0o777, *, dir_fd=None):
    if _under(path, root) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
    return real_open(path, flags, mode, dir_fd=dir_fd)

  def fake_mkdir(path, mode=0o777, *, dir_fd=None):
    if _under(path, root) and not os.path.isdir(path):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
    return real_mkdir(path, mode, dir_fd=dir_fd)

  mp.setattr(os, "open", fake_open)
  mp.setattr(os, "mkdir", fake_mkdir)


class _FullFile(io.FileIO):
  """A file on a disk that fills up after `room` bytes (without a descriptor, so that
  numpy writes through `write` too)."""

  room = 0

  def fileno(self) -> int:
    raise io.UnsupportedOperation("no descriptor (a simulated full disk)")

  def write(self, data) -> int:
    if self.tell() + len(data) > self.room:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
    return super().write(data)


def disk_full(mp: pytest.MonkeyPatch, files, room: int = 3000) -> None:
  """Output files under the row's folder hit ENOSPC after `room` bytes."""
  import builtins
  real_open = builtins.open

  class Full(_FullFile):
    pass
  Full.room = room

  def fake_open(path, mode="r", *args, **kwargs):
    if _under(path, files.root) and "x" in mode and "b" in mode:
      return io.BufferedWriter(Full(path, mode.replace("b", "")))
    return real_open(path, mode, *args, **kwargs)

  mp.setattr(output_mod, "open", fake_open, raising=False)


def little_space(mp: pytest.MonkeyPatch, files, free: int = 1000) -> None:
  """The disk of the row's folder reports `free` bytes free."""
  real = shutil.disk_usage

  def fake(path):
    usage = real(path)
    if _under(os.path.join(path, "x"), files.root):
      return usage._replace(free=free)
    return usage

  mp.setattr(output_mod.shutil, "disk_usage", fake)


def held_lock(files, output: str) -> str:
  """`output`.lock naming a live process (this one's parent) of this host; returns the
  output path. The lock is declared an input: it must be left as it was."""
  lock = output_mod.lock_path(str(output))
  Path(lock).write_text(f"{os.getppid()} {socket.gethostname()} 0123456789abcdef\n")
  files.input(lock)
  return str(output)
