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

`MovieWriter` writes a movie frame block by frame block as they are produced (the
denoised movie, its std and samples, simulated movies, the live stream), with the
input's metadata (`data.metadata`), in the format its name says (`data.spec`): TIFF,
HDF5, Zarr, NWB, a suite2p plane folder or a CaImAn memmap; `VolumeWriter` writes
every plane and channel of a split recording into one HDF5 or Zarr file (`SplitOutputs`
hands out its parts); `AtomicFile` writes any other file (JSON,
CSV, PNG) and, for libraries that write by name (h5py, zarr), reserves a temporary file
or folder that is renamed once complete; `commit` makes several outputs appear together.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import secrets
import shutil
import socket
import time
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np
import tifffile

from deepcad_jax.data.formats import caiman, hdf5, nwb, suite2p, zarr_store
from deepcad_jax.data.metadata import Format, MovieMetadata
from deepcad_jax.data.spec import MovieSpec, split_name
from deepcad_jax.errors import UserError

log = logging.getLogger("deepcad_jax")

LOCK_SUFFIX = ".lock"
PARTIAL_SUFFIX = ".partial"
BIGTIFF_BYTES = 2**32 - 2**25  # above this, write BigTIFF
PAGE_BYTES = 512               # TIFF tags per page, at most (for space estimates)
_PLACEHOLDER = " " * 256       # the description until the movie's length is known
_LOCK_WAIT_S = 2.0             # how long an empty lock file (being written) is waited for


def size_text(n: float) -> str:
  """Bytes in words: '512 B', '12.3 MB', '1.20 GB'."""
  for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= size:
      return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
  return f"{int(n)} B"


def os_error(e: OSError, path: str) -> UserError:
  """One sentence for an OSError met while writing `path`."""
  folder = _existing(os.path.dirname(os.path.abspath(path)))
  code = e.errno
  if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
    free = _free_bytes(folder)
    what = "the disk quota" if code != errno.ENOSPC else "the disk"
    return UserError(f"{path} could not be written: {what} is full ("
                     f"{size_text(free) if free is not None else 'nothing'} free now); "
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
      others = f" (with {count - 1} other output{'s' if count > 2 else ''})" \
          if count > 1 else ""
      raise UserError(f"{first}{others} needs {size_text(total)} but only "
                      f"{size_text(free)} is free on that disk ({folder}); free some space "
                      "or choose an output on another disk.")


def movie_bytes(shape: Sequence[int], dtype) -> int:
  """Bytes a (T, Y, X) TIFF movie of `dtype` takes on disk, at most."""
  t = int(shape[0])
  return int(np.prod(shape)) * np.dtype(dtype).itemsize + t * PAGE_BYTES + 2**16


# ------------------------------------------------------------------ locks


def lock_path(path: str) -> str:
  """The lock file of output `path`."""
  return path + LOCK_SUFFIX


def _alive(pid: int, host: str) -> bool:
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
        if _alive(pid, host):
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


# ------------------------------------------------------------------ files


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
    raise os_error(e, output.path) from None
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


# ------------------------------------------------------------------ movies


WRITABLE = ("tiff", "hdf5", "zarr", "nwb", "suite2p", "caiman")
VOLUME_FORMATS = ("hdf5", "zarr")  # hold every plane and channel of a recording in one file


def output_format(path: str | MovieSpec) -> str:
  """The format an output is written in: its `FORMAT:` prefix, else its suffix (a
  folder named planeN is a suite2p plane folder); one sentence when neither says."""
  spec = MovieSpec.parse(path)
  kind = spec.kind
  if kind not in WRITABLE:
    raise UserError(f"{path}: cannot tell which format to write from its name; end it "
                    "in .tif, .h5, .zarr, .nwb or .mmap (CaImAn), or name a suite2p plane "
                    "folder (suite2p:FOLDER or .../plane0).")
  return kind


def written_path(path: str | MovieSpec, frame_shape, frames: int | None) -> str:
  """The file or folder an output named `path` is written as (a CaImAn memmap's name
  gains the movie's shape); for checks such as "is that the input?"."""
  spec = MovieSpec.parse(path)
  if output_format(spec) == "caiman":
    return caiman.memmap_name(spec.path, frame_shape, frames)
  return spec.path


def _sink(spec: MovieSpec, kind: str):
  """The writer of a non-TIFF format (`open`, `write`, `close`, `abort`)."""
  if kind == "hdf5":
    return hdf5.HDF5Sink(spec.dataset, spec.compression)
  if kind == "zarr":
    ome = split_name(spec.path)[1].lower() == ".ome.zarr"
    return zarr_store.ZarrSink(spec.dataset, spec.compression, ome, spec.zarr_format)
  if kind == "nwb":
    return nwb.NWBSink(spec.dataset, spec.nwb_group == "acquisition")
  if kind == "caiman":
    return caiman.CaimanSink(spec.path)
  return suite2p.Suite2pSink(spec.scale, os.path.abspath(spec.path))


def _checked_frames(path: str, frames: np.ndarray, frame_shape: tuple[int, ...],
                    dtype: np.dtype) -> np.ndarray:
  """`frames` (n, Y, X) as `dtype`; refuses frames of another size, or of a kind that
  would have to be rounded (a bug of the caller, not of the user's input)."""
  if frames.shape[1:] != frame_shape:
    raise ValueError(f"{path}: frames of {frames.shape[1:]} given to a movie of "
                     f"{frame_shape} frames.")
  if frames.dtype != dtype:
    if not np.can_cast(frames.dtype, dtype, "same_kind"):
      raise TypeError(f"{path}: {frames.dtype} frames given to a {dtype} movie "
                      "(convert them first).")
    frames = frames.astype(dtype)
  return frames


class MovieWriter(TwoPhase):
  """A movie (T, Y, X) written block by block as frames are produced.

  Args:
    path: the final name, in the format it names (`output_format`): .tif, .tiff
      (.ome.tif gives an OME-TIFF), .h5/.hdf5 (dataset `data`, or `out.h5:/path`), .zarr,
      (.ome.zarr: an OME-Zarr image), .nwb, a suite2p plane folder (`suite2p:FOLDER`), a
      CaImAn memmap (.mmap or `caiman:NAME`: written as `NAME_d1_Y_d2_X_d3_1_order_C_
      frames_T.mmap`, which needs `frame_shape` and `frames`); options in brackets, e.g.
      `out.h5[compression=gzip]`, `suite2p:plane0[scale=0.5]`, `out.nwb[nwb_group=acquisition]`,
      `out.zarr[zarr_format=2]`.
    frame_shape: (Y, X), or None: that of the first frames written.
    dtype: the frames' dtype (blocks of another kind are refused, never rounded here).
    frames: the number of frames if known (then BigTIFF only above 4 GB, and `finish`
      checks that all came); None for a stream (BigTIFF, any length).
    metadata: the input's metadata (`data.metadata`), for the description, the
      resolution tags and the format; may also be set before the first write.
    overwrite: replace an existing file.
    bigtiff: write BigTIFF (default: when `frames` are unknown or above 4 GB).

  The file appears under `path` only once `finish()` and `publish()` (or `commit()`)
  succeed; a writer that received no frame leaves no file.
  """

  def __init__(self, path: str, frame_shape: Sequence[int] | None, dtype, *,
               frames: int | None = None, metadata: MovieMetadata | None = None,
               overwrite: bool = False, bigtiff: bool | None = None):
    self.frame_shape = None if frame_shape is None else tuple(int(n) for n in frame_shape)
    self.dtype = np.dtype(dtype)
    self.expected = None if frames is None else int(frames)
    self.bigtiff = bigtiff
    self.metadata = metadata
    self.count = 0
    self.closed = False
    self._tw: tifffile.TiffWriter | None = None
    self._format: Format | None = None
    self._text = os.fspath(path)
    spec = MovieSpec.parse(path)
    if spec.plane is not None or spec.channel is not None:
      raise ValueError(f"{path}: one plane or channel of a file is written by "
                       "SplitOutputs, not MovieWriter.")
    self.kind = output_format(spec)
    if self.kind == "caiman":  # the name holds the shape
      spec = spec.with_(path=written_path(spec, self.frame_shape, frames))
      self._text = spec.path
    self._sink = None if self.kind == "tiff" else _sink(spec, self.kind)
    self._started = False
    self.file = AtomicFile(spec.path, overwrite=overwrite,
                           directory=self.kind in ("zarr", "suite2p"))

  @property
  def path(self) -> str:
    return self._text

  def _open(self) -> None:
    self._format = Format.choose(self.path, self.dtype, self.metadata)
    big = self.bigtiff
    if big is None:
      big = self.expected is None or movie_bytes(
          (self.expected,) + self.frame_shape, self.dtype) > BIGTIFF_BYTES
    self._tw = tifffile.TiffWriter(self.file.open(), bigtiff=big, byteorder="<",
                                   ome=False, imagej=False, shaped=False)
    self._page = {"photometric": "minisblack", "contiguous": True,
                  **self._format.page_kwargs()}

  def write(self, frames: np.ndarray) -> None:
    """Append frames (n, Y, X) or one frame (Y, X)."""
    if self.closed:
      raise RuntimeError(f"{self.path}: written after it was finished or aborted.")
    frames = np.asarray(frames)
    if frames.ndim == 2:
      frames = frames[None]
    if self.frame_shape is None:
      self.frame_shape = tuple(frames.shape[1:])
    try:
      frames = _checked_frames(self.path, frames, self.frame_shape, self.dtype)
    except (ValueError, TypeError):
      self.abort()
      raise
    if self._sink is not None:
      self._write_sink(frames)
      return
    with aborting(self):
      first = self._tw is None
      if first:
        self._open()
      for frame in frames:
        if first:
          self._tw.write(frame, description=_PLACEHOLDER,
                         extratags=self._format.extratags(), **self._page)
          first = False
        else:
          self._tw.write(frame, **self._page)
        self.count += 1

  def _write_sink(self, frames: np.ndarray) -> None:
    with aborting(self):
      if not self._started:
        self._started = True
        self._sink.open(self.file.reserve(), self.frame_shape, self.dtype, self.expected,
                        self.metadata)
      self._sink.write(self.count, frames)
      self.count += len(frames)

  def _check_count(self) -> None:
    if self.expected is not None and self.count != self.expected:
      self.abort()
      raise RuntimeError(f"{self.path}: {self.count} of {self.expected} frames were "
                         "written; the file was removed.")

  def finish(self) -> bool:
    """Write the description, close and fsync; False (no file) if no frame came."""
    if self.file.finished:
      return True
    self.closed = True
    if self._sink is not None:
      return self._finish_sink()
    if self._tw is None:
      self.file.abort()
      return False
    self._check_count()
    shape = (self.count,) + self.frame_shape
    with aborting(self):
      description = self._format.description(shape, self.dtype)
      self._tw.overwrite_description(description.encode("utf-8"))
      self._tw.close()
      self._tw = None
    return self.file.finish()

  def _finish_sink(self) -> bool:
    if not self._started:
      self.file.abort()
      return False
    self._check_count()
    with aborting(self):
      self._sink.close(self.count)
    return self.file.finish()

  def publish(self) -> None:
    self.file.publish()

  def abort(self) -> None:
    self.closed = True
    if self._sink is not None:
      with contextlib.suppress(Exception):
        self._sink.abort()
    if self._tw is not None:
      tw, self._tw = self._tw, None
      with contextlib.suppress(Exception):
        tw.close()
    self.file.abort()


class VolumeWriter:
  """Every plane and channel of a split recording in one HDF5 dataset or Zarr array,
  each movie written into its slice as it is denoised (`part`).

  Args:
    path: the output file (`den.h5`, `den.zarr:/x`, `den.ome.zarr`), in a format of
      VOLUME_FORMATS.
    axes: the recording's axes, letters of TZCYX in its file's order; the output keeps
      that order (an OME-Zarr output: time, channel, z, y, x, as OME-Zarr requires)
      and says it in its `axes` attribute and dimension names.
    shape: the recording's size along `axes`.
    dtype, metadata, overwrite: as for `MovieWriter`.

  The file is created with the first frames and appears under `path` only once every
  plane and channel is complete (the last part's `finish` and `publish`); an error in
  any part removes it.
  """

  def __init__(self, path: str, axes: str, shape: Sequence[int], dtype, *,
               metadata: MovieMetadata | None = None, overwrite: bool = False):
    spec = MovieSpec.parse(path).with_(plane=None, channel=None)
    self.kind = output_format(spec)
    if self.kind not in VOLUME_FORMATS:
      raise ValueError(f"{path}: {self.kind} outputs hold one movie; write one per plane.")
    self.path = str(spec)
    self.sink = _sink(spec, self.kind)
    sizes = dict(zip(axes, (int(n) for n in shape)))
    self.axes = self.sink.axes_for(axes)
    self.shape = tuple(sizes[a] for a in self.axes)
    self.sizes = {a: sizes.get(a, 1) for a in "TZCYX"}
    self.dtype = np.dtype(dtype)
    self.metadata = metadata
    self.done: set[tuple[int, int]] = set()
    self.array = None
    self.finished = False
    self.aborted = False
    self.file = AtomicFile(spec.path, overwrite=overwrite, directory=self.kind == "zarr")

  @property
  def complete(self) -> bool:
    return len(self.done) == self.sizes["Z"] * self.sizes["C"]

  def part(self, plane: int, channel: int) -> VolumePart:
    """The writer of plane `plane`, channel `channel` (T, Y, X)."""
    if not (0 <= plane < self.sizes["Z"] and 0 <= channel < self.sizes["C"]):
      raise ValueError(f"{self.path}: no plane {plane}, channel {channel} in "
                       f"{self.sizes['Z']} plane(s) x {self.sizes['C']} channel(s).")
    return VolumePart(self, plane, channel)

  def write(self, plane: int, channel: int, start: int, frames: np.ndarray) -> None:
    """Frames start.. of one plane and channel, (n, Y, X), into their slice."""
    if self.aborted:
      raise RuntimeError(f"{self.path}: written after it was removed.")
    with aborting(self):
      if self.array is None:
        self.array = self.sink.open_volume(self.file.reserve(), self.axes, self.shape,
                                           self.dtype, self.metadata)
      end = start + len(frames)
      index = tuple(slice(start, end) if a == "T" else plane if a == "Z" else
                    channel if a == "C" else slice(None) for a in self.axes)
      kept = [a for a in self.axes if a in "TYX"]
      self.array[index] = np.transpose(frames, ["TYX".index(a) for a in kept])

  def finish(self) -> bool:
    """Close and fsync the file once every part is done (else False: not yet)."""
    if self.finished:
      return True
    if not self.complete:
      return False
    with aborting(self):
      self.sink.close(self.sizes["T"])
    self.finished = self.file.finish()
    return self.finished

  def publish(self) -> None:
    if self.finished:
      self.file.publish()

  def abort(self) -> None:
    self.aborted = True
    with contextlib.suppress(Exception):
      self.sink.abort()
    self.file.abort()


class VolumePart:
  """One plane and channel of a `VolumeWriter`, written like a `MovieWriter`: its
  `finish` and `publish` finish and publish the file when it is the last part."""

  def __init__(self, volume: VolumeWriter, plane: int, channel: int):
    self.volume = volume
    self.key = (int(plane), int(channel))
    self.frame_shape = (volume.sizes["Y"], volume.sizes["X"])
    self.dtype = volume.dtype
    self.count = 0
    self.path = f"{volume.path}[plane={plane},channel={channel}]"

  def write(self, frames: np.ndarray) -> None:
    """Append frames (n, Y, X) or one frame (Y, X)."""
    if self.key in self.volume.done:
      raise RuntimeError(f"{self.path}: written after it was finished.")
    frames = np.asarray(frames)
    if frames.ndim == 2:
      frames = frames[None]
    try:
      frames = _checked_frames(self.path, frames, self.frame_shape, self.dtype)
      if self.count + len(frames) > self.volume.sizes["T"]:
        raise ValueError(f"{self.path}: more than the recording's "
                         f"{self.volume.sizes['T']} frames written.")
    except (ValueError, TypeError):
      self.abort()
      raise
    self.volume.write(*self.key, self.count, frames)
    self.count += len(frames)

  def finish(self) -> bool:
    """This part is complete (all its frames came); the file is closed with the last."""
    if self.count != self.volume.sizes["T"]:
      self.abort()
      raise RuntimeError(f"{self.path}: {self.count} of {self.volume.sizes['T']} frames "
                         "were written; the file was removed.")
    self.volume.done.add(self.key)
    self.volume.finish()
    return True

  def publish(self) -> None:
    self.volume.publish()

  def abort(self) -> None:
    self.volume.abort()


class SplitOutputs:
  """The movie writers of one run: a `MovieWriter` for each output, except the outputs
  named for one plane and channel of a split recording (`den.h5[plane=0,channel=1]`),
  which are parts of one `VolumeWriter` per file (created with the first part, so
  checked for space and locked then). As a context manager it removes, on any error,
  the files whose parts did not all come; that a file is left incomplete at the end
  of a run without an error is a bug, said as such."""

  def __init__(self) -> None:
    self.volumes: dict[str, VolumeWriter] = {}

  def writer(self, path: str, frame_shape: Sequence[int], dtype, *, frames: int,
             metadata: MovieMetadata | None = None, overwrite: bool = False,
             recording: tuple[str, tuple[int, ...]] | None = None
             ) -> MovieWriter | VolumePart:
    """The writer of output `path`.

    Args:
      path: the output, possibly one plane/channel of a file
        (`den.h5[plane=0,channel=1]`).
      frame_shape: a frame's (Y, X).
      dtype: the output's dtype.
      frames: the number of frames the output will hold.
      metadata: metadata written with it.
      overwrite: replace an existing file.
      recording: the axes and shape of the whole recording a plane/channel output
        belongs to (`Movie.recording`); required for those outputs.

    Returns:
      A `MovieWriter`, or for a plane/channel output its part of the file's
      `VolumeWriter` (created with the first part).
    """
    spec = MovieSpec.parse(path)
    if spec.plane is None and spec.channel is None:
      return MovieWriter(path, frame_shape, dtype, frames=frames, metadata=metadata,
                         overwrite=overwrite)
    if recording is None:
      raise ValueError(f"{path}: a plane/channel output needs its recording's layout.")
    whole = str(spec.with_(plane=None, channel=None))
    volume = self.volumes.get(whole)
    if volume is None:
      axes, shape = recording
      check_space([(spec.path, int(np.prod(shape)) * np.dtype(dtype).itemsize + 2**16)])
      volume = self.volumes[whole] = VolumeWriter(whole, axes, shape, dtype,
                                                  metadata=metadata, overwrite=overwrite)
    return volume.part(spec.plane or 0, spec.channel or 0)

  def abort(self) -> None:
    for volume in self.volumes.values():
      if not volume.file.done:
        volume.abort()

  def __enter__(self) -> SplitOutputs:
    return self

  def __exit__(self, kind, value, tb) -> None:
    left = [v.path for v in self.volumes.values() if not v.file.done]
    self.abort()
    if kind is None and left:
      raise RuntimeError(f"{', '.join(left)}: not every plane and channel was written; "
                         "the file was removed.")


def write_movie(path: str, frames: np.ndarray | Iterable[np.ndarray],
                shape: tuple[int, ...] | None = None, dtype=None, *,
                metadata: MovieMetadata | None = None, overwrite: bool = True) -> None:
  """Write a (T, Y, X) movie, from an array or from blocks of frames as they come.

  The file appears under its name only once complete (`MovieWriter`); its disk is
  checked for space first.

  Args:
    path: the output file.
    frames: a (T, Y, X) array, or an iterable of blocks of frames (each cast to `dtype`
      and reshaped to (n, Y, X)).
    shape, dtype: the movie's (T, Y, X) and dtype when `frames` is an iterable (taken
      from the array otherwise).
    metadata: metadata written with it.
    overwrite: replace an existing file (the default here).
  """
  if isinstance(frames, np.ndarray):
    shape, dtype = frames.shape, frames.dtype
    frames = [frames]
  dtype = np.dtype(dtype)
  shape = tuple(int(n) for n in shape)
  if len(shape) != 3:
    raise UserError(f"{path}: a movie is (T, Y, X); got shape {shape}.")
  check_space([(path, movie_bytes(shape, dtype))])
  with MovieWriter(path, shape[1:], dtype, frames=shape[0], metadata=metadata,
                   overwrite=overwrite) as w:
    for block in frames:
      w.write(np.asarray(block, dtype=dtype).reshape((-1,) + shape[1:]))
