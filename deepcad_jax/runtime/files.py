"""Every file the package writes: atomic, locked, space-checked, explained when it fails.

- An output is written under a temporary name unique to the run, in its own folder
  (`.NAME.PID-TOKEN.partial`), closed and fsynced, and only then renamed to NAME; on any
  exception (a full disk, Ctrl-C, SIGTERM turned into an exception, a bug) the temporary
  file is removed, so a file under its final name is always complete.
- A lock file beside it (`NAME.lock`, created with O_EXCL, holding the PID and host of
  the run) keeps two runs from writing the same output: the second is refused with one
  sentence naming the output and the PID. A lock left by a process of this host that no
  longer exists is taken over.
- `check_space` compares what a write will need with the free space of its disk before
  it starts; a disk that fills up anyway, a read-only or missing folder, a name that is a
  folder: each is one `UserError` sentence naming the file.

`AtomicFile` writes any file (JSON, CSV, PNG; the movie writers of `data.writers` build
on it) and, for libraries that write by name (h5py, zarr), reserves a temporary file or
folder that is renamed once complete; `commit` makes several outputs appear together.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import io
import os
import secrets
import shutil
import socket
import time
from typing import Any, Iterable, Iterator, Protocol, Sequence


from deepcad_jax.errors import UserError
from deepcad_jax.runtime.locks import alive
from deepcad_jax.runtime.paths import check_output_target

log = logging.getLogger("deepcad_jax")


LOCK_SUFFIX = ".lock"


PARTIAL_SUFFIX = ".partial"


_LOCK_WAIT_S = 2.0             # how long an empty lock file (being written) is waited for


def format_bytes(n: float) -> str:
  """Bytes in words, decimal units: '512 B', '12.3 MB', '1.5 GB', '250 GB'."""
  for unit, size in (("EB", 1e18), ("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6),
                     ("kB", 1e3)):
    if abs(n) >= size:
      value = n / size
      return f"{value:.3g} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"
  return f"{int(n)} B"


def os_error(e: OSError, path: str, target: str | None = None) -> UserError:
  """One sentence for an OSError met while writing `path` (named so in the sentence;
  `target`: the file or folder on disk, where `path` is a spec such as
  'suite2p:/disk/plane0', whose disk is the one described)."""
  folder = _existing(os.path.dirname(os.path.abspath(target or path)))
  code = e.errno
  if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
    free = _free_bytes(folder)
    what = "the disk quota" if code != errno.ENOSPC else "the disk"
    return UserError(f"{path} could not be written: {what} is full ("
                     f"{format_bytes(free) if free is not None else 'nothing'} free now); "
                     "nothing was kept: free some space or choose an output on another "
                     "disk.")
  if code == errno.EROFS:
    return UserError(f"{path} could not be written: {folder} is on a read-only file "
                     "system; choose a writable output folder.")
  if code in (errno.EACCES, errno.EPERM):
    return UserError(f"{path} could not be written: permission denied in {folder}; "
                     "choose a folder you can write to (or change its permissions).")
  if code == errno.EFBIG:
    return UserError(f"{path} could not be written: the file system of {folder} does "
                     "not allow a file this large (FAT32 stops at 4 GB); choose an output "
                     "on another disk.")
  if code == errno.ENOTDIR:
    return UserError(f"{path} could not be written: a part of that path is a file, not "
                     "a folder; choose another output.")
  if code == errno.EISDIR:
    return UserError(f"{path} is a folder; give a file name for the output.")
  if code == errno.ENAMETOOLONG:
    return UserError(f"{path} could not be written: the name is too long for the file "
                     "system; choose a shorter output name.")
  return UserError(f"{path} could not be written ({e.strerror or e}); check the disk and "
                   "the folder, or choose another output.")


def _free_bytes(folder: str) -> int | None:
  try:
    return shutil.disk_usage(_existing(folder)).free
  except OSError:
    return None


def _existing(folder: str) -> str:
  """`folder`, or its nearest ancestor that exists."""
  folder = os.path.abspath(folder)
  while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
    folder = os.path.dirname(folder)
  return folder


def check_space(needs: Iterable[tuple[str, int]]) -> None:
  """Refuse, in one sentence, outputs that need more than their disk has free.

  `needs` are (path, bytes) pairs; outputs on the same disk are added up.
  """
  disks: dict[int, list] = {}
  for path, n in needs:
    folder = _existing(os.path.dirname(os.path.abspath(path)))
    try:
      device = os.stat(folder).st_dev
    except OSError:
      continue
    entry = disks.setdefault(device, [folder, 0, path, 0])
    entry[1] += int(n)
    entry[3] += 1
  for folder, total, first, count in disks.values():
    free = _free_bytes(folder)
    if free is not None and total > free:
      others = f" (with {count - 1} other file{'s' if count > 2 else ''})" \
          if count > 1 else ""
      raise UserError(f"{first}{others} needs {format_bytes(total)} but only "
                      f"{format_bytes(free)} is free on that disk ({folder}); free some space "
                      "or choose an output on another disk.")


def refuse_output_is_input(outputs: Iterable[Sequence[str | None]],
                           inputs: Iterable[Sequence[str | None]]) -> None:
  """Refuse, in one sentence, an output that is one of the command's inputs, a folder
  holding one, or inside one: with --overwrite or not, no command writes over what it
  reads (`prune --model M --output M`, `evaluate --output` its own `--denoised`, `train
  --init-from X --workdir X --fresh`).

  Args:
    outputs: (flag, path) of what the command writes or replaces, or (flag, path,
      compared): `compared` is what is really replaced (a model directory's
      checkpoints folder) and `path` what the sentence names.
    inputs: (flag, path) or (flag, path, compared) of what it reads.
  """
  def entries(items):
    for item in items:
      flag, path = item[0], item[1]
      compared = item[2] if len(item) > 2 else path
      if path and compared:
        yield flag, path, os.path.realpath(os.path.abspath(compared)), compared
  reads = list(entries(inputs))
  for out_flag, out, o, out_compared in entries(outputs):
    for in_flag, src, i, in_compared in reads:
      same = o == i
      if not same and os.path.exists(out_compared) and os.path.exists(in_compared):
        with contextlib.suppress(OSError):
          same = os.path.samefile(out_compared, in_compared)  # a hard link
      how = "is" if same else "holds" if i.startswith(o + os.sep) else \
          "is inside" if o.startswith(i + os.sep) else None
      if how:
        raise UserError(f"{out_flag} {out} {how} the input {in_flag} {src}; choose "
                        f"another {out_flag} (even with --overwrite, a command never "
                        "writes over what it reads).")


@contextlib.contextmanager
def temporary_folder(folder: str, prefix: str) -> Iterator[str]:
  """A working folder `.PREFIX-HOST-PID-TOKEN` in `folder`, removed when the block ends.

  A run killed with SIGKILL cannot remove its folder; the name says which process made
  it, so the next run removes those of this host's processes that no longer exist.
  """
  start = f".{prefix}-"
  host = socket.gethostname()
  with contextlib.suppress(OSError):
    for name in os.listdir(folder):
      if not name.startswith(start):
        continue
      owner, _, rest = name[len(start):].rpartition("-")[0].rpartition("-")
      if owner == host and rest.isdigit() and not alive(int(rest), host):
        log.info("removing %s, left by PID %s, which no longer runs.",
                 os.path.join(folder, name), rest)
        _remove(os.path.join(folder, name))
  path = os.path.join(folder, f"{start}{host}-{os.getpid()}-{secrets.token_hex(4)}")
  try:
    os.mkdir(path)
  except OSError as e:
    raise os_error(e, path) from None
  try:
    yield path
  finally:
    _remove(path)


def lock_path(path: str) -> str:
  """The lock file of output `path`."""
  return path + LOCK_SUFFIX


class OutputLock:
  """`path`.lock, created with O_EXCL and holding 'PID HOST TOKEN': one writer at a time."""

  def __init__(self, path: str):
    self.path = path
    self.file = lock_path(path)
    self.token = secrets.token_hex(8)
    self.held = False

  def _read(self, name: str) -> tuple[int, str, str] | None:
    try:
      with open(name) as f:
        pid, host, token = f.read().split()
      return int(pid), host, token
    except (OSError, ValueError):
      return None

  def acquire(self) -> None:
    """Take the lock, or raise `UserError` naming the process that holds it."""
    content = f"{os.getpid()} {socket.gethostname()} {self.token}\n"
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
      try:
        fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        holder = self._read(self.file)
        if holder is None:  # being written by its creator, or not a lock of ours
          if time.monotonic() < deadline:
            time.sleep(0.05)
            continue
          raise UserError(f"{self.path} is locked by {self.file}, which does not name a "
                          "run; if no other run writes it, delete that file.") from None
        pid, host, _ = holder
        if alive(pid, host):
          where = "" if host == socket.gethostname() else f" on {host}"
          raise UserError(f"{self.path} is being written by another run (PID {pid}{where}); "
                          "wait for it to finish or choose another output (if no such run "
                          f"exists, delete {self.file}).") from None
        self._break(holder)
        continue
      try:
        os.write(fd, content.encode())
      finally:
        os.close(fd)
      self.held = True
      return

  def _break(self, stale: tuple[int, str, str]) -> None:
    """Remove a lock whose process is gone, unless another run replaced it meanwhile."""
    aside = f"{self.file}.stale-{os.getpid()}-{self.token}"
    try:
      os.rename(self.file, aside)
    except FileNotFoundError:
      return
    if self._read(aside) == stale:
      folder, name = os.path.split(self.path)
      left = [n for n in os.listdir(folder or ".")  # its temporary files: never finished
              if n.startswith(f".{name}.{stale[0]}-") and n.endswith(PARTIAL_SUFFIX)]
      for n in left:
        _remove(os.path.join(folder, n))
      log.info("%s: taking over the lock of PID %d, which no longer runs%s.", self.path,
               stale[0], f" (its unfinished {', '.join(left)} removed)" if left else "")
      os.remove(aside)
      return
    with contextlib.suppress(OSError):  # a fresh lock: put it back
      os.link(aside, self.file)
    os.remove(aside)

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    holder = self._read(self.file)
    if holder is not None and holder[2] == self.token:
      with contextlib.suppress(OSError):
        os.remove(self.file)


class Output(Protocol):
  def finish(self) -> bool: ...
  def publish(self) -> None: ...
  def abort(self) -> None: ...


@contextlib.contextmanager
def aborting(output: Any) -> Iterator[None]:
  """Any error inside removes `output`'s partial file (`output.abort()`); an OSError
  becomes one sentence naming `output.path`."""
  try:
    yield
  except OSError as e:
    output.abort()
    raise os_error(e, output.path, getattr(output, "target", None)) from None
  except BaseException:
    output.abort()
    raise


class TwoPhase:
  """An `Output` used alone: `commit` is finish() then publish(); as a context manager
  it commits on success and aborts on any exception."""

  def commit(self) -> bool:
    """finish() then publish(); False if nothing was written (no file)."""
    if not self.finish():
      return False
    self.publish()
    return True

  def __enter__(self):
    return self

  def __exit__(self, kind, value, tb) -> None:
    if kind is None:
      self.commit()
    else:
      self.abort()


def _remove(path: str) -> None:
  """Remove a file or a folder (a temporary output), ignoring what is already gone."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(OSError):
      os.remove(path)


def _fsync_tree(path: str) -> None:
  """fsync a file, or every file of a folder and the folders themselves."""
  if not os.path.isdir(path):
    with open(path, "rb") as f:
      os.fsync(f.fileno())
    return
  for root, _, files in os.walk(path):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        os.fsync(f.fileno())
    with contextlib.suppress(OSError):
      fd = os.open(root, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)


class AtomicFile(TwoPhase):
  """One output file: its lock, a temporary file unique to this run, and the rename.

  Args:
    path: the final name.
    overwrite: replace an existing file (else refused, checked again once locked).
    directory: the output is a folder (a Zarr store, a suite2p plane folder): written
      as a temporary folder (`reserve()`) and renamed as a whole.

  `open()` (binary) or `text()` gives the temporary file; `finish()` closes and fsyncs
  it, `publish()` renames it and releases the lock, `abort()` removes it (and folders
  made for it, if still empty). As a context manager it commits on success and aborts
  on any exception.
  """

  def __init__(self, path: str, *, overwrite: bool = False, directory: bool = False):
    self.path = os.fspath(path)
    self.directory = directory
    self._reserved = False
    self.final = os.path.abspath(self.path)
    self.folder = os.path.dirname(self.final)
    self.temp: str | None = None
    self._fh: io.BufferedWriter | None = None
    self._text: io.TextIOWrapper | None = None
    self._created: list[str] = []
    self.finished = False   # closed and fsynced, waiting for publish()
    self.done = False       # published
    check_output_target(self.final)
    if os.path.isdir(self.final) and not directory:
      raise UserError(f"{self.path} is a folder; give a file name for the output "
                      "(or remove that folder).")
    self.lock = OutputLock(self.final)
    try:
      self._make_folder()
      self.lock.acquire()
    except OSError as e:
      self.abort()
      raise os_error(e, self.path) from None
    except BaseException:
      self.abort()
      raise
    if not overwrite and os.path.lexists(self.final):
      self.abort()
      raise UserError(f"{self.path} already exists; add --overwrite to replace it or "
                      "choose another output.")

  def _make_folder(self) -> None:
    missing, folder = [], self.folder
    while not os.path.isdir(folder):
      if os.path.lexists(folder):
        raise UserError(f"{self.path} cannot be written: {folder} is a file, not a "
                        "folder; choose another output.")
      missing.append(folder)
      folder = os.path.dirname(folder)
    for f in reversed(missing):
      os.mkdir(f)
      self._created.append(f)

  def open(self) -> io.BufferedWriter:
    """The temporary file (created on first use), open for binary writing."""
    if self._fh is None:
      name = os.path.basename(self.final)
      self.temp = os.path.join(self.folder, f".{name}.{os.getpid()}-"
                               f"{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
      try:
        self._fh = open(self.temp, "xb")  # O_EXCL: never another run's file
      except OSError as e:
        self.temp = None
        self.abort()
        raise os_error(e, self.path) from None
    return self._fh

  def reserve(self) -> str:
    """The temporary name, created (an empty file, or an empty folder) for a library
    that writes by name; `finish()` then fsyncs what it wrote there."""
    if self.temp is None:
      name = os.path.basename(self.final)
      self.temp = os.path.join(self.folder, f".{name}.{os.getpid()}-"
                               f"{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
      try:
        if self.directory:
          os.mkdir(self.temp)
        else:
          os.close(os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
      except OSError as e:
        self.temp = None
        self.abort()
        raise os_error(e, self.path) from None
      self._reserved = True
    return self.temp

  def text(self, newline: str | None = None) -> io.TextIOWrapper:
    """The temporary file, open for UTF-8 text."""
    if self._text is None:
      self._text = io.TextIOWrapper(self.open(), encoding="utf-8", newline=newline)
    return self._text

  def write(self, data: bytes) -> None:
    try:
      self.open().write(data)
    except OSError as e:
      self.abort()
      raise os_error(e, self.path) from None

  def finish(self) -> bool:
    """Close and fsync the temporary file; False (and nothing kept) if none was written.
    Once finished, calling it again changes nothing."""
    if self.finished:
      return True
    if self._reserved:
      try:
        _fsync_tree(self.temp)
      except OSError as e:
        self.abort()
        raise os_error(e, self.path) from None
      self.finished = True
      return True
    if self._fh is None:
      self.abort()
      return False
    try:
      if self._text is not None:
        self._text.flush()
        self._text.detach()
        self._text = None
      self._fh.flush()
      try:
        fd = self._fh.fileno()
      except io.UnsupportedOperation:  # a file object without a descriptor
        fd = None
      if fd is not None:
        os.fsync(fd)
      self._fh.close()
    except OSError as e:
      self.abort()
      raise os_error(e, self.path) from None
    self.finished = True
    return True

  def publish(self) -> None:
    """Rename the finished temporary file to the final name; release the lock."""
    if self.done:
      return
    aside = None
    try:
      check_output_target(self.final)  # a node that appeared since: never replaced
    except UserError:
      self.abort()
      raise
    try:
      if os.path.isdir(self.final) and not os.path.islink(self.final):
        # a folder cannot be replaced by a rename: move the old one aside first
        aside = f"{self.temp}.old"
        os.rename(self.final, aside)
      os.replace(self.temp, self.final)
    except OSError as e:
      if aside is not None and not os.path.lexists(self.final):
        with contextlib.suppress(OSError):
          os.rename(aside, self.final)
      self.abort()
      raise os_error(e, self.path) from None
    if aside is not None:
      _remove(aside)
    self.temp = None
    with contextlib.suppress(OSError):  # the rename itself survives a power cut
      fd = os.open(self.folder, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    self.done = True
    self.lock.release()

  def abort(self) -> None:
    """Remove the temporary file and release the lock (idempotent)."""
    if self._text is not None:
      with contextlib.suppress(Exception):
        self._text.detach()
      self._text = None
    if self._fh is not None:
      with contextlib.suppress(Exception):
        self._fh.close()
    if self.temp is not None:
      _remove(self.temp)
      self.temp = None
    self.lock.release()
    for folder in reversed(self._created):  # folders made for it, deepest first
      with contextlib.suppress(OSError):
        os.rmdir(folder)
    self._created = []


def commit(outputs: Sequence[Output]) -> list[Output]:
  """Make several outputs appear together: all are finished (closed, fsynced) before any
  is renamed; if one fails, the others are removed too. Returns those that held data."""
  try:
    kept = [o for o in outputs if o.finish()]
    for o in kept:
      o.publish()
  except BaseException:
    for o in outputs:
      o.abort()
    raise
  return kept


@contextlib.contextmanager
def outputs_together(*items: Output) -> Iterator[list[Output]]:
  """A block whose outputs (more may be appended to the list) are committed together on
  success and all removed on any exception."""
  group = list(items)
  try:
    yield group
  except BaseException:
    for o in group:
      o.abort()
    raise
  commit(group)


def write_bytes(path: str, data: bytes, *, overwrite: bool = True) -> None:
  """`data` as `path`, atomically."""
  with AtomicFile(path, overwrite=overwrite) as f:
    f.write(data)
