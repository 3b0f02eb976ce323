"""Locks: one training run per workdir, and whether a lock's holder still runs.

`WorkdirLock(workdir)` takes an exclusive `flock` on `workdir/train.lock` and writes the
holder's PID, host and start time into it. The kernel drops the lock when the holder
exits, however it exits (kill -9 included), so a lock file left behind is stale by
construction: the next run takes it over and says whose it was. A second run on a held
workdir gets one sentence naming the PID that holds it. Where the file system has no
`flock` (some network mounts), the PID in the file decides: a live process on this host
holds it, a dead one left it stale. `alive` (shared with the output locks of
`runtime.files`) says whether a lock's holder may still run.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys

from deepcad_jax.errors import UserError

log = logging.getLogger("deepcad_jax")

LOCK_NAME = "train.lock"


def workdir_lock_path(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), LOCK_NAME)


def _read(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace")
    holder = json.loads(text) if text.strip() else {}
    return holder if isinstance(holder, dict) else {}
  except (OSError, ValueError):
    return {}


def alive(pid: int, host: str) -> bool:
  """Whether process `pid` of `host` may still run (another host's: assumed so)."""
  if host != socket.gethostname() or os.name == "nt":
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:  # a zombie (exited, not yet reaped) no longer writes anything
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return True


def _describe(holder: dict) -> str:
  pid, host = holder.get("pid", "?"), holder.get("host", "?")
  here = host == socket.gethostname()
  when = f", started {holder['started']}" if holder.get("started") else ""
  return f"PID {pid}{'' if here else f' on {host}'}{when}"


class WorkdirLock:
  """Exclusive use of a training workdir; a context manager (`acquire`/`release`)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = workdir_lock_path(workdir)
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    """Take the lock or raise `UserError` naming the process that holds it."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        held_by_pid = self._lock(fd)
      except BaseException:
        os.close(fd)
        raise
      if held_by_pid is not None:
        os.close(fd)
        host = held_by_pid.get("host")
        where = "" if host in (None, socket.gethostname()) else f" on {host}"
        raise UserError(f"{self.workdir} is in use by another training run "
                        f"({_describe(held_by_pid)}); wait for it to finish or stop it "
                        f"(kill {held_by_pid.get('pid', 'PID')}{where}), or use another "
                        "--workdir.")
      # The holder before us may have removed the file between our open and our lock:
      # then we locked a file nobody else sees; start again with the one on disk.
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    previous = _read(fd)
    if previous.get("pid") not in (None, os.getpid()):
      log.info("Took over the lock of %s left by %s, which is no longer running.",
               self.workdir, _describe(previous))
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().isoformat(timespec="seconds"),
          "command": " ".join(sys.argv[:1] + sys.argv[1:3])}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(me) + "\n").encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def _lock(self, fd: int) -> dict | None:
    """None when this process now holds the lock, else what the file says of the holder."""
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return None
    except BlockingIOError:
      return _read(fd) or {"pid": "?"}
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
    # No flock on this file system: a live PID on this host holds the lock.
    holder = _read(fd)
    pid = holder.get("pid")
    if isinstance(pid, int) and pid != os.getpid() and \
        holder.get("host") == socket.gethostname() and alive(pid, holder["host"]):
      return holder
    return None

  def release(self) -> None:
    """Remove the lock file (while still holding it) and drop the lock."""
    if self._fd is None:
      return
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass
    finally:
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
