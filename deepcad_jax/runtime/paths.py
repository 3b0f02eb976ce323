"""What a path names, checked before anything opens it: inputs and output targets.

Opening a FIFO (named pipe) blocks until something writes into it, a device reads
forever or not at all, and a symbolic link that loops or points nowhere is not "a file
that does not exist". Every reader asks `check_input` first (it calls `os.stat`, which
never blocks), and every output asks `check_output_target` before it replaces anything,
so that a final rename never replaces a device, a FIFO or a socket.
"""

from __future__ import annotations

import errno
import os
import stat

from deepcad_jax.errors import UserError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_kind(mode: int) -> str | None:
  """'a FIFO (named pipe)', 'a character device', ... for a mode that is neither a
  regular file nor a folder, else None."""
  for test, words in _KINDS:
    if test(mode):
      return words
  return None


def check_input(path: str, folder: bool = True) -> os.stat_result:
  """The `os.stat` of an input (a regular file, or a folder where `folder`), or one
  sentence: it does not exist, it is a broken or looping symbolic link, it cannot be
  read, or it is a FIFO, device or socket (which would block or never end)."""
  try:
    st = os.stat(path)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise UserError(f"{path} is a symbolic link that loops back on itself (too many "
                      "levels of links); point it at the real file.") from None
    if e.errno == errno.ENOENT and os.path.islink(path):
      raise UserError(f"{path} is a symbolic link to {os.readlink(path)}, which does not "
                      "exist; point it at the real file.") from None
    if e.errno == errno.ENOENT:
      raise UserError(f"{path} does not exist; check the path.") from None
    if e.errno in (errno.EACCES, errno.EPERM):
      raise UserError(f"{path} cannot be read (permission denied); check its "
                      "permissions.") from None
    if e.errno == errno.ENOTDIR:
      raise UserError(f"{path} does not exist: a part of that path is a file, not a "
                      "folder; check the path.") from None
    raise UserError(f"{path} cannot be read ({e.strerror or e}); check the path.") from None
  kind = special_kind(st.st_mode)
  if kind is not None:
    raise UserError(f"{path} is {kind}, not a regular file, and reading it could block "
                    "or never end; copy the data into a file and give that file.")
  if stat.S_ISDIR(st.st_mode) and not folder:
    raise UserError(f"{path} is a folder; give a file here.")
  return st


def check_output_target(path: str) -> None:
  """Refuse an output name that is a FIFO, a device or a socket (or a link to one): an
  output is renamed over its final name, which must never replace such a node."""
  try:
    st = os.stat(path)
  except OSError:
    return  # nothing there (or a dangling link, which the rename replaces)
  kind = special_kind(st.st_mode)
  if kind is not None:
    raise UserError(f"{path} is {kind}, not a regular file; an output never replaces "
                    "it, even with --overwrite: choose an output file name.")
