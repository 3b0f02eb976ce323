"""Helpers for tests of processes: a lock holder, a process's descendants."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref

_HOLDER = ("import sys; from deepcad_jax.runtime.locks import WorkdirLock; "
           "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()")


def start_lock_holder(workdir) -> subprocess.Popen:
  """A process holding `workdir`'s training lock until its stdin closes (or it is killed)."""
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  assert line.strip() == "held", line
  return proc


def stop(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    proc.kill()
  proc.wait()
  for stream in (proc.stdin, proc.stdout):
    if stream:
      stream.close()


def hold_lock(owner, workdir) -> str:
  """Lock `workdir` from another process for as long as `owner` lives."""
  weakref.finalize(owner, stop, start_lock_holder(workdir))
  return str(workdir)


def descendants(pid: int) -> list[int]:
  """Every process below `pid` (children, their children, ...), from /proc."""
  children: dict[int, list[int]] = {}
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/stat") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        continue
      children.setdefault(ppid, []).append(int(name))
  found, todo = [], [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      found.append(child)
      todo.append(child)
  return found


def running(pid: int) -> bool:
  """True while `pid` exists and is not a zombie."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def workdir_with_a_checkpoints_file(files) -> str:
  """A workdir whose `checkpoints` is a file (both declared inputs of a fault row)."""
  run = files.root / "run"
  run.mkdir()
  files.raw("run/checkpoints", b"not a folder")
  return files.input(run)
