"""One restricted unpickler for untrusted files: `.pth` checkpoints, suite2p's `.npy`.

pickle can run any code, and a crafted file can also make a careless loader build a numpy
view of memory it does not own. Every pickle deepcad-jax reads goes through `loads`:

* the opcode stream is scanned before anything is built: a damaged stream, a memo index
  that would make the unpickler allocate far more than the file holds, and opcodes that
  neither torch nor numpy write (extension codes, INST/OBJ/NEWOBJ, out-of-band buffers)
  are refused;
* `find_class` answers from the caller's allow-list by a dictionary look-up; nothing is
  imported, so a refused name runs nothing, not even a module's import;
* numpy arrays, dtypes and scalars are rebuilt by this module from a validated shape,
  dtype (bool, integers, floats, complex, fixed-width strings; object only as a container
  whose items the pickle builds) and byte count, always by copying the file's bytes;
* what the allowed callables hand back is a `Stub` that refuses pickle's BUILD, and the
  result is walked once (depth-limited, cycles refused) to swap stubs for values, so no
  state from the file ever reaches numpy's own `__setstate__`.

Every problem becomes one `UserError` sentence that names the file and the fix. A bug in
this module's own rebuilding code is not disguised as a damaged file: it propagates.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import io
import math
import os
import pickle
import pickletools
import re
import reprlib
from typing import Any, Callable, Mapping

import numpy as np

from deepcad_jax.errors import UserError
from deepcad_jax.runtime.paths import check_input

Globals = Mapping[tuple, Any]

MAX_DEPTH = 64        # legitimate files nest 3-4 levels (array -> dict -> list -> value)
MAX_DIMS = 32
MAX_INT = 2**62       # any shape, stride, offset or count beyond this is refused
_NEVER_OPCODES = {"EXT1", "EXT2", "EXT4", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX",
                  "NEXT_BUFFER", "READONLY_BUFFER", "PERSID"}


class Refused(Exception):
  """Why an untrusted file is refused: a phrase that follows the file's name."""


class _Bug(Exception):
  """An unexpected error in this module's own rebuilding code (a bug, not a bad file)."""

  def __init__(self, error: BaseException):
    super().__init__(error)
    self.error = error


def user_error(path: str, reason: str, fix: str) -> UserError:
  """The one-sentence error for a refused file."""
  return UserError(f"{path} {reason}; {fix}.")


def why(error: BaseException) -> str:
  """A short one-line account of a library's exception, for a message."""
  try:
    text = " ".join(str(error).split())
  except Exception:  # str() of an exception holding an untrusted value may itself fail
    text = ""
  text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= 120 else text[:117] + "..."


def checked(fn: Callable) -> Callable:
  """Marks this project's own rebuilding code. Wrong arguments from the pickle and a
  failed allocation are refusals; any other error is a bug and propagates as itself."""
  signature = inspect.signature(fn)

  @functools.wraps(fn)
  def call(*args):
    try:
      signature.bind(*args)
    except TypeError:
      raise Refused(f"calls {fn.__name__} with {len(args)} argument(s), which a valid "
                    "file never does") from None
    try:
      return fn(*args)
    except (Refused, _Bug):
      raise
    except MemoryError:
      raise Refused("needs more memory than is free to rebuild its arrays") from None
    except Exception as e:  # a bug in our code: keep its type and traceback
      raise _Bug(e) from e
  return call


def as_int(value: Any, what: str, low: int = 0) -> int:
  """A plain int in [low, MAX_INT): no bool, no float, no huge number."""
  if type(value) is not int or not low <= value < MAX_INT:
    raise Refused(f"has {what} {show(value)}, which a valid file never has")
  return value


def as_shape(value: Any, what: str) -> tuple[int, ...]:
  """A tuple of at most MAX_DIMS ints in [0, MAX_INT)."""
  if type(value) not in (tuple, list) or len(value) > MAX_DIMS or not all(
      type(v) is int and 0 <= v < MAX_INT for v in value):
    raise Refused(f"has {what} {show(value)}, which a valid file never has")
  return tuple(value)


def check_extent(shape: tuple[int, ...], itemsize: int, what: str) -> None:
  """numpy sizes an array by its non-zero dimensions, even an empty one: refuse shapes
  whose bytes would overflow."""
  if math.prod(n for n in shape if n) * max(itemsize, 1) >= MAX_INT:
    raise Refused(f"has {what} of shape {show(shape)}, too large for any array")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 30, 30, 30


def show(value: Any) -> str:
  """A short, bounded repr of an untrusted value, for a message (no deep recursion)."""
  text = _REPR.repr(value) if isinstance(value, (int, float, str, bytes, tuple, list,
                                                 type(None))) else \
      f"a {type(value).__name__}"
  text = " ".join(text.split())
  return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------ stubs


class Stub:
  """What an allowed callable hands to the unpickler. It refuses pickle's BUILD unless a
  subclass expects one; `finish` gives the value that replaces it in the result."""

  __slots__ = ()
  kind = "value"

  def __setstate__(self, state):
    raise Refused(f"sets state on a {self.kind}, which a valid file never does")

  def finish(self, walk: Callable[[Any], Any], depth: int) -> Any:
    raise Refused(f"holds a bare {self.kind}, which a valid file never does")


class Value(Stub):
  """A finished value (an array, a numpy scalar) kept out of pickle's reach."""

  __slots__ = ("value",)

  def __init__(self, value: Any):
    self.value = value

  def finish(self, walk, depth):
    return self.value


class Marker(Stub):
  """A name the pickle may mention but never call or build (e.g. numpy.ndarray)."""

  __slots__ = ("kind",)

  def __init__(self, kind: str):
    self.kind = kind


class Dict(dict):
  """Stands in for collections.OrderedDict: a plain dict whose BUILD state (torch's
  `_metadata`) is accepted and ignored; it has no attributes for a pickle to set."""

  __slots__ = ()

  def __setstate__(self, state):
    if state is not None and type(state) is not dict:
      raise Refused("sets an unexpected state on a dictionary")


# ------------------------------------------------------------------ numpy

_DTYPE_SPEC = re.compile(r"(b1|[iu][1248]|f[248]|c(8|16)|[US][0-9]{0,9}|O[48])")
_ENDIAN = {"<": "<", ">": ">", "=": "=", "|": "|"}
NDARRAY = Marker("numpy.ndarray")


class _Dtype(Stub):
  """numpy.dtype(spec, align, copy) and its BUILD state, validated, never numpy's own."""

  __slots__ = ("spec", "dtype")
  kind = "numpy dtype"

  def __init__(self, spec: str):
    self.spec, self.dtype = spec, None

  @checked
  def __setstate__(self, state):
    if self.dtype is not None:
      raise Refused("sets the state of a numpy dtype twice")
    if type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4) or \
        any(v is not None for v in state[2:5]) or (len(state) == 9 and state[8] is not None):
      raise Refused(f"has a numpy dtype state {show(state)}, which this reader does "
                    "not accept (only plain numbers, bool and fixed-width strings)")
    endian, elsize = state[1], state[5]
    if type(endian) is not str or endian not in _ENDIAN or type(elsize) is not int:
      raise Refused(f"has a numpy dtype state {show(state)}, which a valid file never has")
    self.dtype = self._resolve(endian, elsize)

  def _resolve(self, endian: str = "=", elsize: int = -1) -> np.dtype:
    kind, digits = self.spec[0], self.spec[1:]
    if kind in "US":
      unit = 4 if kind == "U" else 1
      size = elsize if elsize > 0 else int(digits or 0) * unit
      if not 0 < size <= 2**24 or size % unit or (digits and int(digits) * unit != size):
        raise Refused(f"has a string dtype of {size} bytes, which a valid file never has")
      spec = f"{kind}{size // unit}"
    else:
      spec = self.spec
      if elsize not in (-1, np.dtype(spec).itemsize):
        raise Refused(f"has a numpy dtype {spec} of {elsize} bytes, which a valid file "
                      "never has")
    dtype = np.dtype(spec)
    return dtype.newbyteorder(endian) if endian in "<>" and dtype.itemsize > 1 and \
        kind != "O" else dtype

  def get(self) -> np.dtype:
    if self.dtype is None:
      self.dtype = self._resolve()
    return self.dtype


@checked
def _dtype(spec, align=False, copy=True):
  if type(spec) is not str or not _DTYPE_SPEC.fullmatch(spec) or type(align) is not bool or \
      type(copy) is not bool:
    raise Refused(f"asks for the numpy dtype {show(spec)}, which this reader does not "
                  "accept (only plain numbers, bool and fixed-width strings)")
  return _Dtype(spec)


class _Array(Stub):
  """numpy's `_reconstruct(ndarray, (0,), b'b')` followed by BUILD with
  (version, shape, dtype, fortran, data): checked, then copied out of the file's bytes."""

  __slots__ = ("shape", "fortran", "array", "items")
  kind = "numpy array"

  def __init__(self):
    self.shape = self.fortran = self.array = self.items = None

  @checked
  def __setstate__(self, state):
    if self.shape is not None:
      raise Refused("sets the state of a numpy array twice")
    if type(state) is not tuple or len(state) not in (4, 5) or \
        (len(state) == 5 and state[0] != 1):
      raise Refused(f"has a numpy array state {show(state)}, which a valid file never has")
    shape, dtype, fortran, data = state[-4:]
    shape = as_shape(shape, "an array of shape")
    if not isinstance(dtype, _Dtype) or type(fortran) is not bool:
      raise Refused("has a numpy array whose dtype or order is not valid")
    dtype, count = dtype.get(), math.prod(shape)
    check_extent(shape, dtype.itemsize, "an array")
    if dtype.kind == "O":
      if type(data) is not list or len(data) != count:
        raise Refused(f"has an object array of shape {shape} whose items are not a list "
                      f"of {count}, which numpy never writes")
      self.items = data
    else:
      if type(data) is not bytes or len(data) != count * dtype.itemsize:
        raise Refused(f"has a {dtype} array of shape {shape} with "
                      f"{len(data) if type(data) is bytes else 'no'} bytes of data instead "
                      f"of {count * dtype.itemsize}")
      _check_text(data, dtype)
      flat = np.frombuffer(data, dtype, count=count)
      if dtype.kind == "b":  # any non-zero byte is True; numpy expects 0 or 1
        flat = flat.view(np.uint8) != 0
      self.array = flat.reshape(shape, order="F" if fortran else "C").copy(order="K")
    self.shape, self.fortran = shape, fortran

  def finish(self, walk, depth):
    if self.shape is None:
      raise Refused("holds a numpy array without data, which numpy never writes")
    if self.items is None:
      return self.array
    if depth > 0:
      raise Refused("holds an object array inside another value, which this reader "
                    "does not accept")
    out = np.empty(len(self.items), dtype=object)
    for i, item in enumerate(self.items):
      out[i] = walk(item)
    return out.reshape(self.shape)  # numpy lists object items in C order, even for "F"


def _check_text(data: bytes, dtype: np.dtype) -> None:
  """numpy fails (SystemError) on reading a "U" element beyond U+10FFFF: refuse it here."""
  if dtype.kind == "U" and data:
    codes = np.frombuffer(data, np.dtype("u4").newbyteorder(dtype.byteorder))
    if int(codes.max()) > 0x10FFFF:
      raise Refused(f"has {dtype} text that is not valid unicode")


@checked
def _reconstruct(cls, shape, typecode):
  if cls is not NDARRAY or shape != (0,) or typecode != b"b":
    raise Refused("rebuilds a numpy array in a way numpy never writes (a subclass or "
                  "unknown layout)")
  return _Array()


@checked
def _scalar(dtype, data=None):
  if not isinstance(dtype, _Dtype):
    raise Refused("has a numpy scalar without a valid dtype")
  dtype = dtype.get()
  if dtype.kind == "O" or type(data) is not bytes or len(data) != dtype.itemsize:
    raise Refused(f"has a numpy {dtype} scalar whose data is not {dtype.itemsize} bytes")
  _check_text(data, dtype)
  value = np.frombuffer(data, dtype, count=1)
  return Value((value.view(np.uint8) != 0)[0] if dtype.kind == "b" else value[0])


NUMPY: dict[tuple, Any] = {("numpy", "ndarray"): NDARRAY, ("numpy", "dtype"): _dtype}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
  NUMPY[(_module, "_reconstruct")] = _reconstruct
  NUMPY[(_module, "scalar")] = _scalar


def _rebuilt(cls: type, fields: tuple[str, ...]) -> Callable:
  """datetime's own constructor, then rebuilt from its fields so that every field is
  range-checked (the compact pickled form checks only some)."""

  @checked
  def make(*args):
    try:
      value = cls(*args)
      return cls(**{f: getattr(value, f) for f in fields})
    except (TypeError, ValueError, OverflowError) as e:
      raise Refused(f"has an invalid {cls.__name__} ({why(e)})") from None
  make.__name__ = cls.__name__
  return make


@checked
def _timezone(offset, name=None):
  try:
    return datetime.timezone(offset) if name is None else datetime.timezone(offset, name)
  except (TypeError, ValueError) as e:
    raise Refused(f"has an invalid timezone ({why(e)})") from None


DATETIME: dict[tuple, Any] = {
    ("datetime", "datetime"): _rebuilt(datetime.datetime, (
        "year", "month", "day", "hour", "minute", "second", "microsecond", "tzinfo",
        "fold")),
    ("datetime", "date"): _rebuilt(datetime.date, ("year", "month", "day")),
    ("datetime", "time"): _rebuilt(datetime.time, (
        "hour", "minute", "second", "microsecond", "tzinfo", "fold")),
    ("datetime", "timedelta"): _rebuilt(datetime.timedelta, (
        "days", "seconds", "microseconds")),
    ("datetime", "timezone"): _timezone,
}


# ------------------------------------------------------------------ unpickling


def _scan(data: bytes, what: str) -> None:
  """Walk the opcodes without building anything: refuse damage, opcodes `what` never
  has, and memo indices beyond the number of memo writes (the C unpickler grows its memo
  to twice any index it is given, before looking at anything else)."""
  writes = top = 0
  try:
    for op, arg, _ in pickletools.genops(data):
      if op.name in _NEVER_OPCODES:
        raise Refused(f"uses the pickle opcode {op.name}, which {what} never has")
      if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
        writes, top = writes + 1, max(top, arg)
      elif op.name == "MEMOIZE":
        writes += 1
  except Refused:
    raise
  except Exception as e:  # pickletools' parser on untrusted bytes: any error is damage
    raise Refused(f"is damaged or truncated ({why(e)})") from None
  if top >= max(writes, 1):
    raise Refused(f"is damaged (a memo index {top} beyond its {writes} memo entries)")


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, allowed: Globals, what: str,
               persistent: Callable[[Any], Any] | None):
    super().__init__(file)
    self._allowed, self._what, self._persistent = allowed, what, persistent

  def find_class(self, module: str, name: str):
    found = self._allowed.get((module, name)) if type(module) is str and \
        type(name) is str else None
    if found is None:
      text = f"{module}.{name}" if re.fullmatch(r"[\w.]{1,100}", f"{module}.{name}") else \
          show(f"{module}.{name}")
      raise Refused(f"asks to load {text}, which {self._what} does not need; refusing it "
                    "(pickle can run code and the file is untrusted)")
    return found

  def persistent_load(self, pid):
    if self._persistent is None:
      raise Refused(f"holds a persistent reference, which {self._what} never has")
    return self._persistent(pid)


class _Walk:
  """Swaps stubs for their values; refuses cycles, deep nesting and foreign objects."""

  LEAVES = (str, bytes, bytearray, int, float, complex, bool, type(None), np.ndarray,
            np.generic, datetime.date, datetime.time, datetime.timedelta, datetime.tzinfo)

  def __init__(self):
    self.done: dict[int, Any] = {}
    self.busy: set[int] = set()

  def __call__(self, obj: Any, depth: int = 0) -> Any:
    if isinstance(obj, self.LEAVES):
      return obj
    key = id(obj)
    if key in self.done:
      return self.done[key]
    if key in self.busy:
      raise Refused("holds a value that contains itself, which a valid file never does")
    if depth > MAX_DEPTH:
      raise Refused(f"nests values more than {MAX_DEPTH} deep, which a valid file never "
                    "does")
    self.busy.add(key)
    inner = functools.partial(self, depth=depth + 1)
    if isinstance(obj, Stub):
      out = obj.finish(inner, depth)
    elif isinstance(obj, dict):
      out = {}
      for k, v in obj.items():
        if not isinstance(k, (str, bytes, int, float, bool, type(None))):
          raise Refused(f"has a dictionary key that is a {type(k).__name__}, which this "
                        "reader does not accept")
        out[k] = inner(v)
    elif type(obj) in (list, tuple):
      out = type(obj)(inner(v) for v in obj)
    elif type(obj) in (set, frozenset):
      if not all(isinstance(v, self.LEAVES) for v in obj):
        raise Refused("holds a set of values this reader does not accept")
      out = obj
    else:
      raise Refused(f"holds a {type(obj).__name__}, which this reader does not accept")
    self.busy.discard(key)
    self.done[key] = out
    return out


def loads(data: bytes, path: str, allowed: Globals, *, what: str, fix: str,
          persistent_load: Callable[[Any], Any] | None = None) -> Any:
  """Unpickle untrusted `data`, resolving only `allowed` globals. Arrays are plain
  numpy arrays that own their data; a refused or damaged file is a `UserError`.

  Args:
    data: the pickle's bytes.
    path: the file they were read from (named in errors).
    allowed: the globals a file may ask for: (module, name) -> the object to use.
    what: what the file should hold, for messages ("a state_dict").
    fix: the advice that ends every error.
    persistent_load: resolves persistent ids (e.g. a .pth's storages); without it a
      persistent reference is refused.

  Returns:
    The unpickled object: plain containers, scalars, arrays and what `allowed` builds.
  """
  try:
    _scan(data, what)
    obj = _Unpickler(io.BytesIO(data), allowed, what, persistent_load).load()
  except Refused as e:
    raise user_error(path, str(e), fix) from None
  except _Bug as e:
    raise e.error
  except UserError:
    raise
  except Exception as e:  # the C unpickler's own errors on untrusted bytes are damage
    raise user_error(path, f"is damaged ({why(e)})", fix) from None
  try:
    return _Walk()(obj)
  except Refused as e:
    raise user_error(path, str(e), fix) from None


def load_npy(path: str, allowed: Globals, *, what: str, fix: str) -> np.ndarray:
  """The object array that `np.save` pickled into an untrusted `.npy` (a list or dict
  saved by suite2p), rebuilt with the restricted unpickler and the `allowed` globals."""
  path = os.fspath(path)
  if not os.path.lexists(path):
    raise user_error(path, "does not exist", fix)
  check_input(path, folder=False)  # no FIFO, device or looping link
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                     (2, 0): np.lib.format.read_array_header_2_0}.get(version)
      if read_header is None:
        raise Refused(f"is a .npy file of version {version}, which this reader does not "
                      "accept")
      shape, fortran, dtype = read_header(f)
      data = f.read()
  except Refused as e:
    raise user_error(path, str(e), fix) from None
  except OSError as e:
    raise user_error(path, f"cannot be read ({why(e)})", fix) from None
  except Exception as e:  # numpy's header parser on untrusted bytes
    raise user_error(path, f"is not a valid .npy file ({why(e)})", fix) from None
  if dtype != np.dtype(object):
    raise user_error(path, f"is not {what}; it holds {dtype} data", fix)
  root = loads(data, path, allowed, what=what, fix=fix)
  if not isinstance(root, np.ndarray) or root.dtype != object or root.shape != shape:
    raise user_error(path, f"is not {what}; its header and its data disagree", fix)
  return root
