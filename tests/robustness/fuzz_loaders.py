"""Fuzz deepcad-jax's readers of untrusted files: DeepCAD-RT `.pth`, suite2p `stat.npy`
and `ops.npy`.

Each case takes a valid file (written here, without torch), mutates it with a seeded,
reproducible mutation and reads it with the reader deepcad-jax uses
(`convert.read_state_dict`; `rois.read_suite2p_stat` then `rois_from_suite2p`;
`suite2p.load_ops`). Cases run in a worker process, so a segfault or a hang is seen as
one. A case passes when the reader returns, or raises a one-line `UserError` naming the
file. It fails on

* crash: any other exception, a worker killed by a signal, or a hang;
* out-of-bounds read: a returned element that is not in the file (every element of a
  `.pth` tensor must be an aligned element of one of the zip's storages; every numpy
  array or scalar from a `.npy` must be a run of the file's bytes; bools must be 0/1);
* code executed: a canary saw the file run code (a marker module and files written by
  `os.system`/`subprocess`/`eval`/`exec` payloads, a module whose import writes a
  marker, and an audit hook on os.system, subprocess, exec of source, fork, ctypes).
  The worker first checks that plain `pickle.loads` sets the canary off for every
  payload, so a quiet canary means something.

Mutation kinds: byte-level (truncate, flips, deleted/duplicated/inserted ranges), pickle
opcodes (replace, delete, duplicate, insert, argument changes, dangerous globals,
injected calls, memo bombs, deep nesting), zip entries (dropped, renamed, duplicated,
resized, recompressed, zip bombs, byte order) and targeted fields (a tensor's offset,
shape, strides, storage type, numel, key, arguments; an array's shape, dtype, order and
data; the .npy header).

  python -m tests.robustness.fuzz_loaders --cases 10000         # the documented run
  python -m tests.robustness.fuzz_loaders --cases 300 --seed 1  # a quick one
  python -m tests.robustness.fuzz_loaders --replay pth:1234     # one case, here, verbose
  python -m tests.robustness.fuzz_loaders --cases 2000 --formats pth \\
      --pth-reader old_convert.py:read_state_dict               # another implementation

The test suite runs a quick seeded run of 240 cases
(tests/robustness/test_untrusted_files.py::test_a_short_fuzz_run_finds_nothing).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import io
import json
import os
import pickle
import pickletools
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

import numpy as np

FORMATS = ("pth", "stat", "ops")
FRAME_SHAPE = (64, 64)  # (Y, X) for stat.npy ROIs

# ------------------------------------------------------------------ a torch-free writer


class Global:
  """A name pickled as GLOBAL 'module name' (callable so that pickle accepts it)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise TypeError("a pickled name only")


class Call:
  """Pickles as REDUCE(func, args), then SETITEMS of `items`, then BUILD(state)."""

  def __init__(self, func, args=(), state=None, items=None):
    self.func, self.args, self.state, self.items = func, args, state, items

  def __reduce__(self):
    return (self.func, tuple(self.args), self.state, None,
            iter(self.items) if self.items is not None else None)


class Pid:
  """A persistent id (torch's storage reference), pickled with BINPERSID."""

  def __init__(self, pid):
    self.pid = pid


class _Writer(pickle._Pickler):
  dispatch = dict(pickle._Pickler.dispatch)

  def persistent_id(self, obj):
    return obj.pid if isinstance(obj, Pid) else None

  def _save_name(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
    self.memoize(obj)

  dispatch[Global] = _save_name


def dumps(obj, protocol: int = 2) -> bytes:
  out = io.BytesIO()
  _Writer(out, protocol).dump(obj)
  return out.getvalue()


@dataclasses.dataclass
class Tensor:
  """One state_dict entry as torch pickles it."""

  storage: str                # key of the storage (zip entry data/<key>)
  offset: object = 0
  size: object = ()
  stride: object = ()
  extra: tuple = (False, "hooks")   # requires_grad, backward_hooks ("hooks": OrderedDict())
  func: str = "_rebuild_tensor_v2"
  state: object = None        # a BUILD state on the tensor (torch never writes one)


@dataclasses.dataclass
class Storage:
  kind: object                # "FloatStorage" (pickled as torch.FloatStorage) or other
  numel: object
  data: bytes
  key: object = None          # the key written in the persistent id (default: its name)
  pid: object = None          # replaces the whole persistent id


STORAGE_DTYPES = {"FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
                  "LongStorage": "<i8", "IntStorage": "<i4", "BoolStorage": "u1",
                  "DoubleStorage": "<f8", "ByteStorage": "u1"}


def pth_pickle(tensors: dict, storages: dict[str, Storage], *, root=None,
               metadata: bool = True, protocol: int = 2) -> bytes:
  """data.pkl of a state_dict, laid out as torch.save writes it."""
  pids = {}
  for name, s in storages.items():
    if isinstance(s.kind, str) and s.kind.startswith("str:"):
      kind = s.kind[4:]   # a writer that names the storage type as a string
    elif isinstance(s.kind, str):
      kind = Global("torch", s.kind)
    else:
      kind = s.kind
    pid = s.pid if s.pid is not None else \
        ("storage", kind, name if s.key is None else s.key, "cpu", s.numel)
    pids[name] = Pid(pid)
  ordered = Global("collections", "OrderedDict")
  items = []
  for key, t in tensors.items():
    extra = tuple(Call(ordered) if e == "hooks" else e for e in t.extra)
    args = (pids[t.storage], t.offset, t.size, t.stride) + extra
    items.append((key, Call(Global("torch._utils", t.func), args, state=t.state)))
  state = {"_metadata": Call(ordered, (), items=[("", {"version": 1})])} if metadata \
      else None
  od = Call(ordered, (), state=state, items=items)
  return dumps(od if root is None else root(od), protocol)


def pth_zip(entries: list[tuple[str, bytes]], compress=None) -> bytes:
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
    for i, (name, data) in enumerate(entries):
      method = compress(i, name) if compress else zipfile.ZIP_STORED
      zf.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data,
                  compress_type=method)
  return out.getvalue()


def pth_entries(pkl: bytes, storages: dict[str, Storage], prefix: str = "archive/"
                ) -> list[tuple[str, bytes]]:
  entries = [(f"{prefix}data.pkl", pkl), (f"{prefix}.format_version", b"1"),
             (f"{prefix}.storage_alignment", b"64"), (f"{prefix}byteorder", b"little")]
  entries += [(f"{prefix}data/{name}", s.data) for name, s in storages.items()]
  entries += [(f"{prefix}version", b"3\n"), (f"{prefix}.data/serialization_id", b"0" * 40)]
  return entries


def write_pth(path, tensors: dict, storages: dict[str, Storage], **kwargs) -> str:
  """A .pth as torch.save writes it, without torch."""
  with open(path, "wb") as f:
    f.write(pth_zip(pth_entries(pth_pickle(tensors, storages, **kwargs), storages)))
  return str(path)


def _values(rng, n: int, dtype: str) -> bytes:
  if dtype == "u1":
    return rng.integers(0, 2, n).astype(np.uint8).tobytes()
  if dtype.startswith("<i"):
    return rng.integers(-2**30, 2**30, n).astype(dtype).tobytes()
  if dtype == "<u2":  # bfloat16: the top half of a float32
    return (rng.uniform(-3, 3, n).astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
  return rng.uniform(-3, 3, n).astype(dtype).tobytes()


def pth_seed() -> tuple[dict, dict]:
  """A small state_dict with every layout torch saves: contiguous, transposed, a strided
  view with an offset, two tensors sharing a storage, a scalar, an empty tensor, and
  float32/16, bfloat16, int32/64 and bool storages; values are distinct random numbers."""
  rng = np.random.default_rng(20261121)
  layout = {"0": ("FloatStorage", 24), "1": ("FloatStorage", 2), "2": ("FloatStorage", 6),
            "3": ("FloatStorage", 10), "4": ("FloatStorage", 8), "5": ("HalfStorage", 4),
            "6": ("BFloat16Storage", 3), "7": ("LongStorage", 1), "8": ("BoolStorage", 3),
            "9": ("FloatStorage", 0), "10": ("IntStorage", 4)}
  storages = {k: Storage(kind, n, _values(rng, n, STORAGE_DTYPES[kind]))
              for k, (kind, n) in layout.items()}
  tensors = {
      "enc.conv.weight": Tensor("0", 0, (2, 3, 1, 2, 2), (12, 4, 4, 2, 1)),
      "enc.conv.bias": Tensor("1", 0, (2,), (1,)),
      "proj.weight": Tensor("2", 0, (3, 2), (1, 3)),
      "view": Tensor("3", 2, (3,), (2,)),
      "tied_a": Tensor("4", 0, (2, 2), (2, 1)),
      "tied_b": Tensor("4", 4, (4,), (1,)),
      "half": Tensor("5", 0, (4,), (1,)),
      "bf16": Tensor("6", 0, (3,), (1,)),
      "steps": Tensor("7", 0, (), ()),
      "mask": Tensor("8", 0, (3,), (1,)),
      "empty": Tensor("9", 0, (0, 2), (2, 1)),
      "int.weight": Tensor("10", 0, (2, 2), (1, 2)),
  }
  return tensors, storages


def npy_bytes(array: np.ndarray, pkl: bytes | None = None, header: dict | None = None,
              protocol: int = 4) -> bytes:
  """An object array as np.save writes it (optionally with another pickle or header)."""
  if pkl is None:
    pkl = pickle.dumps(array, protocol=protocol)
  out = io.BytesIO()
  np.lib.format.write_array_header_1_0(out, header or np.lib.format.header_data_from_array_1_0(
      array))
  return out.getvalue() + pkl


def stat_seed() -> np.ndarray:
  rng = np.random.default_rng(7)
  stat = np.empty(3, dtype=object)
  for i in range(3):
    n = 5 + i
    stat[i] = {"ypix": rng.integers(0, 64, n).astype(np.int32),
               "xpix": rng.integers(0, 64, n).astype(np.int32),
               "lam": rng.uniform(0.1, 2, n).astype(np.float32),
               "overlap": rng.integers(0, 2, n).astype(bool),
               "med": [float(rng.uniform(0, 64)), float(rng.uniform(0, 64))],
               "npix": np.int64(n), "radius": np.float64(rng.uniform(1, 5)),
               "compact": float(rng.uniform(1, 2)), "soma_crop": np.ones(n, bool),
               "footprint": np.float32(1.5), "imerge": [], "inmerge": -1}
  return stat


def ops_seed() -> np.ndarray:
  rng = np.random.default_rng(11)
  ops = {"nplanes": 1, "nchannels": 1, "fs": 30.0, "tau": 1.25, "save_path0": "/data/s2p",
         "data_path": ["/data/raw"], "tiff_list": ["a.tif", "b.tif"], "do_registration": True,
         "block_size": (128, 128), "snr_thresh": 1.2, "Ly": 64, "Lx": 64, "nframes": 200,
         "meanImg": rng.uniform(0, 100, (8, 6)).astype(np.float32),
         "refImg": np.asfortranarray(rng.integers(0, 900, (4, 5)).astype(">i2")),
         "yoff": rng.normal(size=7), "corrXY": rng.normal(size=7).astype(np.float32),
         "badframes": rng.integers(0, 2, 7).astype(bool),
         "filelist": np.array(["a.tif", "b.tif"]), "labels": np.array([b"x", b"yz"]),
         "xrange": np.array([2, 62]), "Vmax": np.float64(2.5), "ihop": np.int32(3),
         "bidiphase": np.int64(0), "c": np.complex64(1 + 2j), "flag": np.bool_(True),
         "version": np.str_("1.1.0"), "timing": {"registration": 1.5, "detection": None},
         "date_proc": datetime.datetime(2026, 11, 21, 9, 30, 5, 123456,
                                        datetime.timezone(datetime.timedelta(hours=1), "CET")),
         "plane_times": {"registration": datetime.timedelta(seconds=3.5)}}
  root = np.empty((), dtype=object)
  root[()] = ops
  return root


# ------------------------------------------------------------------ pickle surgery

INTERESTING_INTS = [0, 1, 2, 3, -1, -2, 7, 8, 255, 256, 1613, -1613, 65535, 65536,
                    2**31 - 1, -2**31, 2**32, 2**62, 2**63 - 1, -2**63, 2**64, 10**18]
INTERESTING_STRS = [
    "", "0", "1", "99", "../0", "data.pkl", "storage", "cpu", "x" * 300, "FloatStorage",
    "ComplexFloatStorage", "QInt8Storage", "UntypedStorage", "Nope", "f4", "f8", "<f4",
    "O8", "O", "V8", "M8", "U0", "U", "S0", "U100000000", "i8", "b1", "c16", "object",
    "os", "system", "posix", "builtins", "eval", "exec", "__import__", "fuzz_canary",
    "fire", "fuzz_canary_import", "subprocess", "Popen", "numpy", "ndarray", "dtype",
    "_reconstruct", "scalar", "numpy.core.multiarray", "numpy._core.multiarray", "torch",
    "torch._utils", "_rebuild_tensor_v2", "collections", "OrderedDict", "<", ">", "|",
    "=", "ypix", "xpix", "lam", "overlap", "_metadata", "state_dict", "\x00", "\u00e9"]
DANGEROUS = [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("builtins", "eval"),
    ("builtins", "exec"), ("builtins", "__import__"), ("builtins", "getattr"),
    ("builtins", "open"), ("builtins", "compile"), ("__builtin__", "eval"),
    ("subprocess", "Popen"), ("subprocess", "check_call"), ("fuzz_canary", "fire"),
    ("fuzz_canary_import", "x"), ("numpy", "load"), ("pickle", "loads"),
    ("_pickle", "loads"), ("torch", "load"), ("copyreg", "_reconstructor"),
    ("functools", "partial"), ("operator", "attrgetter"), ("ctypes", "CDLL"),
    ("shutil", "rmtree"), ("numpy.lib.stride_tricks", "as_strided"),
    ("numpy", "frombuffer"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"), ("collections", "OrderedDict"), ("datetime", "datetime"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch", "FloatStorage"),
    ("collections", "OrderedDict.fromkeys"), ("builtins", "object.__subclasses__")]
NOARG_OPCODES = [o.code.encode("latin-1") for o in pickletools.opcodes if o.arg is None]
ALL_OPCODES = [o.code.encode("latin-1") for o in pickletools.opcodes]


def payloads(fired_dir: str) -> list[tuple[tuple[str, str], object]]:
  """Calls that would run code if a reader resolved them; args None: GLOBAL alone."""
  mark = os.path.join(fired_dir, "fired")
  return [(("os", "system"), (f"touch {mark}.os",)),
          (("posix", "system"), (f"touch {mark}.posix",)),
          (("builtins", "eval"), ("__import__('fuzz_canary').fire('eval')",)),
          (("builtins", "exec"), ("__import__('fuzz_canary').fire('exec')",)),
          (("fuzz_canary", "fire"), ("direct",)),
          (("subprocess", "check_call"), (["touch", f"{mark}.subprocess"],)),
          (("builtins", "__import__"), ("fuzz_canary_import",)),
          (("fuzz_canary_import", "anything"), None)]


def enc_int(v: int) -> bytes:
  if 0 <= v < 256:
    return b"K" + bytes([v])
  if 0 <= v < 65536:
    return b"M" + struct.pack("<H", v)
  if -2**31 <= v < 2**31:
    return b"J" + struct.pack("<i", v)
  data = pickle.encode_long(v)
  return b"\x8a" + bytes([len(data)]) + data


def enc_str(s: str) -> bytes:
  data = s.encode("utf-8", "surrogatepass")
  return b"X" + struct.pack("<I", len(data)) + data


def enc_bytes(b: bytes) -> bytes:
  return b"B" + struct.pack("<I", len(b)) + b


def enc_global(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode("utf-8", "surrogatepass")


def enc_value(v) -> bytes:
  if isinstance(v, str):
    return enc_str(v)
  if isinstance(v, int):
    return enc_int(v)
  if isinstance(v, list):
    return b"](" + b"".join(enc_value(x) for x in v) + b"e"
  if isinstance(v, dict):
    return b"}"
  raise TypeError(v)


def enc_call(target: tuple[str, str], args) -> bytes:
  """GLOBAL target, then args TUPLE and REDUCE (nothing but the name when args is None)."""
  out = enc_global(*target)
  if args is not None:
    out += b"(" + b"".join(enc_value(a) for a in args) + b"tR"
  return out


def ops_of(pk: bytes) -> list[tuple[str, object, int, int]]:
  """(name, arg, start, end) of each opcode up to STOP; [] if the stream does not parse."""
  try:
    found = [(op.name, arg, pos) for op, arg, pos in pickletools.genops(pk)]
  except Exception:
    return []
  ends = [p for _, _, p in found[1:]] + [found[-1][2] + 1]
  return [(n, a, p, e) for (n, a, p), e in zip(found, ends)]


def unframe(pk: bytes) -> bytes:
  """The same pickle without FRAME opcodes (frames are optional), so splices stay valid."""
  cut = [(p, e) for n, _, p, e in ops_of(pk) if n == "FRAME"]
  for p, e in reversed(cut):
    pk = pk[:p] + pk[e:]
  return pk


def _interesting_int(rng, arg) -> int:
  base = arg if isinstance(arg, int) else 0
  pool = INTERESTING_INTS + [base + 1, base - 1, -base, base * 2, base * 1000]
  return int(pool[rng.integers(len(pool))])


def _mutated_str(rng, s: str) -> str:
  r = rng.integers(4)
  if r == 0 or not s:
    return INTERESTING_STRS[rng.integers(len(INTERESTING_STRS))]
  if r == 1:
    return s[:rng.integers(len(s))]
  if r == 2:
    return s + INTERESTING_STRS[rng.integers(len(INTERESTING_STRS))]
  i = rng.integers(len(s))
  return s[:i] + chr(rng.integers(32, 127)) + s[i + 1:]


def _mutated_bytes(rng, b: bytes) -> bytes:
  r = rng.integers(6)
  if r >= 4 and b:  # same length, some bytes changed: the data's values themselves
    return byte_flip(rng, b)
  if r == 0:
    return b[:rng.integers(len(b) + 1)]
  if r == 1:
    return b + bytes(rng.integers(0, 256, rng.integers(1, 16)).astype(np.uint8))
  if r == 2:
    return b""
  return b * 2


def pk_arg(rng, pk: bytes) -> bytes:
  """One opcode's argument replaced (ints, memo indices, strings, bytes, names)."""
  ops = [o for o in ops_of(pk) if o[1] is not None or o[0] == "MEMOIZE"]
  if not ops:
    return pk
  name, arg, p, e = ops[rng.integers(len(ops))]
  if name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
    new = b"r" + struct.pack("<I", _interesting_int(rng, arg) % 2**32)
  elif name in ("BINGET", "LONG_BINGET", "GET"):
    new = b"j" + struct.pack("<I", _interesting_int(rng, arg) % 2**32)
  elif name == "GLOBAL":
    module, _, attr = str(arg).partition(" ")
    if rng.integers(2):
      module = _mutated_str(rng, module)
    else:
      attr = _mutated_str(rng, attr)
    new = enc_global(module.replace("\n", ""), attr.replace("\n", ""))
  elif name == "PROTO":
    new = b"\x80" + bytes([int(rng.integers(0, 7))])
  elif name == "FRAME":
    new = b"\x95" + struct.pack("<Q", _interesting_int(rng, arg) % 2**64)
  elif isinstance(arg, bool) or arg is None:
    return pk
  elif isinstance(arg, int):
    new = enc_int(_interesting_int(rng, arg))
  elif isinstance(arg, float):
    new = b"G" + struct.pack(">d", [0.0, -1.0, 1e308, float("nan"), float("inf"),
                                    2.0**63][rng.integers(6)])
  elif isinstance(arg, str):
    new = enc_str(_mutated_str(rng, arg))
  elif isinstance(arg, (bytes, bytearray)):
    new = enc_bytes(_mutated_bytes(rng, bytes(arg)))
  else:
    return pk
  return pk[:p] + new + pk[e:]


def pk_op_replace(rng, pk: bytes) -> bytes:
  ops = ops_of(pk)
  if not ops:
    return pk
  _, _, p, e = ops[rng.integers(len(ops))]
  if rng.integers(2):  # the opcode byte only: its argument bytes get reinterpreted
    return pk[:p] + ALL_OPCODES[rng.integers(len(ALL_OPCODES))] + pk[p + 1:]
  return pk[:p] + NOARG_OPCODES[rng.integers(len(NOARG_OPCODES))] + pk[e:]


def pk_op_delete(rng, pk: bytes) -> bytes:
  ops = ops_of(pk)
  if not ops:
    return pk
  _, _, p, e = ops[rng.integers(len(ops))]
  return pk[:p] + pk[e:]


def pk_op_duplicate(rng, pk: bytes) -> bytes:
  ops = ops_of(pk)
  if not ops:
    return pk
  _, _, p, e = ops[rng.integers(len(ops))]
  return pk[:e] + pk[p:e] + pk[e:]


def _boundary(rng, pk: bytes) -> int:
  ops = ops_of(pk)
  return ops[rng.integers(1, len(ops))][2] if len(ops) > 1 else 2


def pk_op_insert(rng, pk: bytes) -> bytes:
  p = _boundary(rng, pk)
  extra = b"".join(NOARG_OPCODES[rng.integers(len(NOARG_OPCODES))]
                   for _ in range(rng.integers(1, 4)))
  if rng.integers(3) == 0:  # a BUILD on whatever is on the stack
    extra = [b"}b", b"N}\x86b", b"(K\x01)K\x00tb", b"]b"][rng.integers(4)]
  return pk[:p] + extra + pk[p:]


def pk_global(rng, pk: bytes) -> bytes:
  """A GLOBAL or STACK_GLOBAL pointed at a dangerous or foreign name."""
  ops = [o for o in ops_of(pk) if o[0] in ("GLOBAL", "STACK_GLOBAL")]
  if not ops:
    return pk
  name, _, p, e = ops[rng.integers(len(ops))]
  new = enc_global(*DANGEROUS[rng.integers(len(DANGEROUS))])
  if name == "STACK_GLOBAL":
    new = b"00" + new  # POP both names, then push the GLOBAL
  return pk[:p] + new + pk[e:]


def pk_inject(rng, pk: bytes, fired_dir: str) -> bytes:
  """A whole call that would run code (os.system, eval, ...) and POP, at an opcode
  boundary, so that the rest of the file stays valid."""
  target, args = payloads(fired_dir)[rng.integers(len(payloads(fired_dir)))]
  p = _boundary(rng, pk) if rng.integers(2) else 2
  return pk[:p] + enc_call(target, args) + b"0" + pk[p:]


def pk_memo_bomb(rng, pk: bytes) -> bytes:
  p = _boundary(rng, pk)
  index = [2**32 - 2, 2**31, 2**28, 10**6][rng.integers(4)]
  return pk[:p] + b"Nr" + struct.pack("<I", index) + b"0" + pk[p:]


def pk_deep(rng, pk: bytes) -> bytes:
  """A leaf value replaced by lists nested thousands deep."""
  ops = [o for o in ops_of(pk) if o[0] in ("BININT1", "BINUNICODE", "SHORT_BINUNICODE",
                                           "BININT", "NEWFALSE", "NONE")]
  if not ops:
    return pk
  _, _, p, e = ops[rng.integers(len(ops))]
  depth = int([100, 5000, 100000][rng.integers(3)])
  return pk[:p] + b"]" * depth + b"a" * (depth - 1) + pk[e:]


def pk_truncate(rng, pk: bytes) -> bytes:
  return pk[:rng.integers(len(pk))]


def byte_flip(rng, data: bytes) -> bytes:
  data = bytearray(data)
  for _ in range(rng.integers(1, 5)):
    data[rng.integers(len(data))] = rng.integers(256)
  return bytes(data)


def bit_flip(rng, data: bytes) -> bytes:
  data = bytearray(data)
  for _ in range(rng.integers(1, 5)):
    data[rng.integers(len(data))] ^= 1 << rng.integers(8)
  return bytes(data)


def truncate(rng, data: bytes) -> bytes:
  return data[:rng.integers(len(data))]


def delete_range(rng, data: bytes) -> bytes:
  a = rng.integers(len(data))
  return data[:a] + data[a + rng.integers(1, 64):]


def duplicate_range(rng, data: bytes) -> bytes:
  a = rng.integers(len(data))
  return data[:a] + data[a:a + rng.integers(1, 64)] * 2 + data[a + 64:]


def insert_random(rng, data: bytes) -> bytes:
  a = rng.integers(len(data))
  return data[:a] + bytes(rng.integers(0, 256, rng.integers(1, 32)).astype(np.uint8)) + \
      data[a:]


BYTE_MUTATIONS = {"truncate": truncate, "byte_flip": byte_flip, "bit_flip": bit_flip,
                  "delete_range": delete_range, "duplicate_range": duplicate_range,
                  "insert_random": insert_random}
PICKLE_MUTATIONS = {"pk_truncate": pk_truncate, "pk_byte_flip": byte_flip,
                    "pk_op_replace": pk_op_replace, "pk_op_delete": pk_op_delete,
                    "pk_op_duplicate": pk_op_duplicate, "pk_op_insert": pk_op_insert,
                    "pk_arg": pk_arg, "pk_global": pk_global, "pk_inject": pk_inject,
                    "pk_memo_bomb": pk_memo_bomb, "pk_deep": pk_deep}


def mutate_pickle(kind: str, rng, pk: bytes, fired_dir: str) -> bytes:
  if rng.integers(5):  # mostly without frames, so that splices keep the stream valid
    pk = unframe(pk)
  fn = PICKLE_MUTATIONS[kind]
  for _ in range(1 if rng.integers(4) else 2):
    pk = fn(rng, pk, fired_dir) if kind == "pk_inject" else fn(rng, pk)
  return pk


# ------------------------------------------------------------------ .pth mutations

WEIRD = [None, True, 1.5, "1", [1], (1,), -1, 2**63, -2**63, 2**64, {}, b"x"]


def _weird_int(rng, current=0):
  if rng.integers(4) == 0:
    return WEIRD[rng.integers(len(WEIRD))]
  return _interesting_int(rng, current)


def _num(value, default: int) -> int:
  return value if type(value) is int else default


def pth_targeted(kind: str, rng, tensors: dict, storages: dict) -> dict:
  """Mutates the specs in place; returns keyword arguments for pth_pickle."""
  key = list(tensors)[rng.integers(len(tensors))]
  t = tensors[key]
  s = storages[t.storage]
  numel = _num(s.numel, 4)
  if kind == "pth_offset":
    t.offset = [_weird_int(rng, _num(t.offset, 0)), numel, numel - 1, numel + 1,
                -1][rng.integers(5)]
  elif kind == "pth_size":
    size = list(t.size)
    r = rng.integers(4)
    if r == 0 and size:
      size[rng.integers(len(size))] = _weird_int(rng, _num(size[0], 1))
    elif r == 1:
      size.append(int(rng.integers(0, 4)))
    elif r == 2:
      size = size[:-1]
    else:
      size = [2] * int([33, 40, 64, 70][rng.integers(4)])
    t.size = tuple(size) if rng.integers(8) else size
  elif kind == "pth_stride":
    stride = list(t.stride)
    if stride:
      i = rng.integers(len(stride))
      stride[i] = [_weird_int(rng, _num(stride[i], 1)), 0, -1, -_num(stride[i], 1), -numel,
                   2**62, 2**63 - 1][rng.integers(7)]
    else:
      stride = [1]
    t.stride = tuple(stride)
  elif kind == "pth_negative_stride":  # the classic: a view that starts before its storage
    n = int([2, 10, 1614, 100000][rng.integers(4)])
    t.size, t.stride = (n,), (-int(rng.integers(1, 4)),)
    t.offset = numel - 1 if rng.integers(2) else 0
  elif kind == "pth_overlap":
    n = int([2, 3, 10**6, 10**9][rng.integers(4)])
    t.size, t.stride = [((n,), (0,)), ((2, 2), (1, 1)), ((n, 2), (0, 1)),
                        ((3, 3), (2, 1))][rng.integers(4)]
  elif kind == "pth_storage_type":
    s.kind = ["ComplexFloatStorage", "QInt8Storage", "UntypedStorage", "str:float",
              "str:FloatStorage", "str:Nope", "str:", 7, None, "DoubleStorage", "ByteStorage",
              "BoolStorage", "HalfStorage", "LongStorage"][rng.integers(14)]
  elif kind == "pth_numel":
    s.numel = [_weird_int(rng, numel), numel + 1, numel * 1000, 0, -1,
               2**40][rng.integers(6)]
  elif kind == "pth_key":
    s.key = ["99", "", "../0", "0/../1", 7, None, "x" * 300, "data.pkl",
             list(storages)[rng.integers(len(storages))]][rng.integers(9)]
  elif kind == "pth_pid":
    s.pid = [("storage",), ("foo", "FloatStorage", "0", "cpu", 4), ["storage"],
             "storage", None, ("storage", Global("torch", "FloatStorage"), t.storage, "cpu",
                              numel, "extra")][rng.integers(6)]
  elif kind == "pth_args":
    r = rng.integers(5)
    if r == 0:
      t.extra = ()
    elif r == 1:
      t.extra = (False, "hooks", None, 1, 2, 3)
    elif r == 2:
      t.func = ["_rebuild_tensor", "_rebuild_parameter", "_rebuild_tensor_v3",
                "_rebuild_qtensor"][rng.integers(4)]
    elif r == 3:
      t.state = [{"x": 1}, (1, (2,), None), None][rng.integers(3)]
    else:
      t.extra = (WEIRD[rng.integers(len(WEIRD))],) * int(rng.integers(1, 3))
  elif kind == "pth_shared":  # many tensors over one storage
    big = max(storages, key=lambda k: _num(storages[k].numel, 0))
    for i in range(int([10, 200, 2000][rng.integers(3)])):
      tensors[f"shared.{i}"] = Tensor(big, 0, (_num(storages[big].numel, 1),), (1,))
  elif kind == "pth_root":
    return {"root": [lambda od: {"state_dict": od}, lambda od: [od],
                     lambda od: Call(Global("torch._utils", "_rebuild_parameter"),
                                     (od, False, None)),
                     lambda od: {7: od}, lambda od: {"state_dict": 1}][rng.integers(5)]}
  elif kind == "pth_dict_key":
    tensors[[7, None, 1.5, b"k", (1, 2)][rng.integers(5)]] = tensors.pop(key)
  elif kind == "pth_storage_bytes":
    data = bytearray(s.data)
    for _ in range(rng.integers(1, 4)):
      if data:
        data[rng.integers(len(data))] = rng.integers(256)
    s.data = bytes(data)
  return {}


PTH_TARGETED = ("pth_offset", "pth_size", "pth_stride", "pth_negative_stride", "pth_overlap",
                "pth_storage_type", "pth_numel", "pth_key", "pth_pid", "pth_args",
                "pth_shared", "pth_root", "pth_dict_key", "pth_storage_bytes")
PTH_ZIP = ("zip_drop", "zip_rename", "zip_duplicate", "zip_resize", "zip_compress",
           "zip_bomb", "zip_byteorder", "zip_junk")


def pth_zip_mutation(kind: str, rng, entries: list[tuple[str, bytes]]) -> bytes:
  entries = list(entries)
  i = rng.integers(len(entries))
  name, data = entries[i]
  compress = None
  if kind == "zip_drop":
    del entries[i]
  elif kind == "zip_rename":
    entries[i] = ([name + "0", name.replace("archive/", "other/"), "data.pkl",
                   name.upper(), name + "/", "archive/data/../data.pkl"][rng.integers(6)],
                  data)
  elif kind == "zip_duplicate":
    entries.insert(rng.integers(len(entries)), (name, byte_flip(rng, data or b"\0")))
  elif kind == "zip_resize":
    stores = [j for j, (n, _) in enumerate(entries) if "/data/" in n]
    j = stores[rng.integers(len(stores))]
    n, d = entries[j]
    entries[j] = (n, [d[:len(d) // 2], d[:-1], b"", d + d, d + b"\0" * 3][rng.integers(5)])
  elif kind == "zip_compress":
    methods = [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
    chosen = methods[rng.integers(3)]
    everything = rng.integers(2)
    compress = lambda j, n: chosen if everything or j == i else zipfile.ZIP_STORED  # noqa
  elif kind == "zip_bomb":  # a storage of zeros, deflated ~1000x, that claims to be real
    stores = [j for j, (n, _) in enumerate(entries) if "/data/" in n]
    j = stores[rng.integers(len(stores))]
    entries[j] = (entries[j][0], b"\0" * int([2**21, 2**24, 2**26][rng.integers(3)]))
    compress = lambda k, n: zipfile.ZIP_DEFLATED if k == j else zipfile.ZIP_STORED  # noqa
  elif kind == "zip_byteorder":
    entries = [(n, [b"big", b"", b"little\0", b"x" * 1000][rng.integers(4)]
                if n.endswith("byteorder") else d) for n, d in entries]
  data = pth_zip(entries, compress)
  if kind == "zip_junk":
    junk = bytes(rng.integers(0, 256, rng.integers(1, 200)).astype(np.uint8))
    data = junk + data if rng.integers(2) else data + junk
  return data


# ------------------------------------------------------------------ .npy mutations

NPY_TARGETED = ("npy_shape", "npy_dtype", "npy_dtype_state", "npy_order", "npy_data",
                "npy_object_bytes", "npy_scalar", "npy_reconstruct", "npy_header",
                "npy_foreign")


def _array_call(a: np.ndarray, shape=None, spec=None, dstate=None, fortran=None,
                data=None, version=1, cls=None, reconstruct=None):
  """An ndarray pickled the way numpy does, with any part replaced."""
  mod = "numpy.core.multiarray"
  dtype_reduce = a.dtype.__reduce__()
  dt = Call(Global("numpy", "dtype"),
            (dtype_reduce[1][0] if spec is None else spec,) + dtype_reduce[1][1:],
            state=dtype_reduce[2] if dstate is None else dstate)
  fortran_now = bool(a.flags.f_contiguous and not a.flags.c_contiguous)
  raw = a.tobytes(order="F" if fortran_now else "C") if a.dtype != object else list(a.flat)
  state = (a.shape if shape is None else shape, dt,
           fortran_now if fortran is None else fortran, raw if data is None else data)
  if version is not None:
    state = (version,) + state
  return Call(Global(mod, reconstruct or "_reconstruct"),
              (cls or Global("numpy", "ndarray"), (0,), b"b"), state=state)


def _scalar_call(x: np.generic, spec=None, data=None):
  dtype_reduce = x.dtype.__reduce__()
  dt = Call(Global("numpy", "dtype"),
            (dtype_reduce[1][0] if spec is None else spec,) + dtype_reduce[1][1:],
            state=dtype_reduce[2])
  return Call(Global("numpy.core.multiarray", "scalar"),
              (dt, x.tobytes() if data is None else data))


def _tree(value, target, tamper):
  """The seed as writer objects: numpy arrays and scalars become explicit calls; the
  `target`-th array or scalar (in walk order) goes through `tamper` instead."""
  count = [0]

  def walk(v):
    if isinstance(v, np.ndarray) and v.dtype != object:
      count[0] += 1
      return tamper(v) if count[0] - 1 == target else _array_call(v)
    if isinstance(v, np.generic):
      count[0] += 1
      return tamper(v) if count[0] - 1 == target else _scalar_call(v)
    if isinstance(v, np.ndarray):
      items = [walk(x) for x in v.flat]
      fake = np.empty(v.shape, object)
      return _array_call(fake, data=items)
    if isinstance(v, dict):
      return {k: walk(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return type(v)(walk(x) for x in v)
    return v
  tree = walk(value)
  return tree, count[0]


def _numpy_leaves(value) -> int:
  return _tree(value, -1, None)[1]


def npy_targeted(kind: str, rng, seed: np.ndarray) -> bytes:
  header = np.lib.format.header_data_from_array_1_0(seed)
  if kind == "npy_header":
    header = dict(header)
    r = rng.integers(6)
    if r == 0:
      header["descr"] = ["<f8", "|b1", "<U3", "|V8", "|O"][rng.integers(5)]
    elif r == 1:
      header["shape"] = [(-1,), (10**20,), (), (2, 2), (0,), tuple(range(40))][rng.integers(6)]
    elif r == 2:
      header["fortran_order"] = True
    elif r == 3:
      raw = npy_bytes(seed)
      return raw[:8] + struct.pack("<H", int(rng.integers(0, 65536))) + raw[10:]
    elif r == 4:
      raw = npy_bytes(seed)
      return raw[:6] + bytes([int(rng.integers(0, 5)), int(rng.integers(0, 3))]) + raw[8:]
    else:
      raw = npy_bytes(seed)
      start = raw.index(b"{")
      end = raw.index(b"}") + 1
      text = ["{'descr': '|O', 'fortran_order': False, 'shape': (3,), 'x': __import__('os')}",
              "{'descr': '|O', 'fortran_order': False, 'shape': " + "(" * 300 + ")" * 300 + "}",
              "{'descr': [('a', '|O')], 'fortran_order': False, 'shape': (3,)}",
              "not a dict"][rng.integers(4)]
      return raw[:start] + text.encode().ljust(end - start) + raw[end:]
    return npy_bytes(seed, header=header)
  if kind == "npy_foreign":  # an allowed-looking but foreign object in the tree
    tree, _ = _tree(seed, -1, None)
    extra = [Call(Global("numpy", "ndarray"), ((2,), Global("numpy", "dtype"))),
             Call(Global("numpy.core.multiarray", "_reconstruct"),
                  (Global("numpy.ma.core", "MaskedArray"), (0,), b"b")),
             Call(Global("datetime", "datetime"), (b"\x07\xe8\x02\x1f\x00\x00\x00\x00\x00\x00",)),
             Call(Global("datetime", "datetime"), (b"\x07\xe8\x0d\x01\x00\x00\x00\x00\x00\x00",)),
             Call(Global("datetime", "timezone"), (Call(Global("datetime", "timedelta"),
                                                        (2, 0, 0)),)),
             Call(Global("datetime", "time"), (b"\x19\x00\x00\x00\x00\x00",)),
             Call(Global("numpy", "dtype"), ("f8", False, True)),
             Global("numpy", "ndarray"), {1, 2}, frozenset([np.pi])][rng.integers(10)]
    return npy_bytes(seed, dumps(_insert(tree, extra), 3))
  n = _numpy_leaves(seed)
  target = int(rng.integers(n))

  def tamper(v):
    if isinstance(v, np.generic):
      if kind == "npy_scalar":
        return _scalar_call(v, spec=["O8", "V8", "U0", "f8", "S0", "i1"][rng.integers(6)]
                            if rng.integers(2) else None,
                            data=_mutated_bytes(rng, v.tobytes()) if rng.integers(2) else
                            [None, 1, "x", b""][rng.integers(4)])
      v = np.asarray(v).reshape(1)
    if kind == "npy_shape":
      shape = list(v.shape)
      r = rng.integers(4)
      if r == 0 and shape:
        shape[rng.integers(len(shape))] = _weird_int(rng, shape[0])
      elif r == 1:
        shape = shape + [int(rng.integers(0, 3))]
      elif r == 2:
        shape = [0, 2**61] if rng.integers(2) else [2**31, 2**31]
      else:
        shape = [1] * 70
      return _array_call(v, shape=tuple(shape) if rng.integers(8) else shape)
    if kind == "npy_dtype":
      return _array_call(v, spec=["O8", "V8", "U0", "S0", "M8", "f4", "i8", "b1", "c16",
                                  "U100000000", "<f4", 7, None][rng.integers(13)])
    if kind == "npy_dtype_state":
      base = list(v.dtype.__reduce__()[2])
      r = rng.integers(5)
      if r == 0:
        base[1] = ["?", "<", ">", "=", "|", 1][rng.integers(6)]
      elif r == 1:
        base[5] = _weird_int(rng, base[5])
      elif r == 2:
        base[3], base[4] = ("a",), {"a": (np.dtype("O"), 0)}
      elif r == 3:
        base = base[:int(rng.integers(len(base)))]
      else:
        base[0] = 4
        base.append((None, (b"ns", 1, 1, 1)))
      return _array_call(v, dstate=tuple(base))
    if kind == "npy_order":
      return _array_call(v, fortran=[True, False, 1, None, "F"][rng.integers(5)])
    if kind == "npy_data":
      raw = v.tobytes()
      return _array_call(v, data=[_mutated_bytes(rng, raw), raw.decode("latin-1"),
                                  list(raw), None, 7][rng.integers(5)])
    if kind == "npy_object_bytes":  # object dtype with raw bytes: pointers, if believed
      fake = np.zeros(max(v.size, 1), np.uint64)
      fake[:] = 0x41414141
      return _array_call(v, shape=(fake.size,), spec="O8", dstate=(3, "|", None, None, None,
                                                                    -1, -1, 63),
                         data=fake.tobytes())
    if kind == "npy_reconstruct":
      r = rng.integers(4)
      if r == 0:
        return _array_call(v, cls=Global("numpy", "matrix"))
      if r == 1:
        return _array_call(v, version=[None, 2, "1"][rng.integers(3)])
      if r == 2:
        return _array_call(v, reconstruct="_frombuffer")
      return Call(Global("numpy.core.multiarray", "_reconstruct"),
                  (Global("numpy", "ndarray"), (3,), b"b"), state=None)
    return _array_call(v)

  tree, _ = _tree(seed, target, tamper)
  return npy_bytes(seed, dumps(tree, 3))


def _insert(tree, extra):
  """`extra` added as a value to the first dict of the writer tree of an object array."""
  first = tree.state[-1][0]
  if isinstance(first, dict):
    first["fuzz_extra"] = extra
  return tree


# ------------------------------------------------------------------ cases


class Seeds:
  """The valid files every case starts from (deterministic)."""

  def __init__(self):
    self.tensors, self.storages = pth_seed()
    self.pkl = pth_pickle(self.tensors, self.storages)
    self.entries = pth_entries(self.pkl, self.storages)
    self.pth = pth_zip(self.entries)
    self.stat_value, self.ops_value = stat_seed(), ops_seed()
    self.npy = {fmt: {p: npy_bytes(v, protocol=p) for p in (3, 4)}
                for fmt, v in (("stat", self.stat_value), ("ops", self.ops_value))}


KINDS = {
    "pth": tuple(BYTE_MUTATIONS) + tuple(PICKLE_MUTATIONS) + PTH_ZIP + PTH_TARGETED,
    "stat": tuple(BYTE_MUTATIONS) + tuple(PICKLE_MUTATIONS) + NPY_TARGETED,
    "ops": tuple(BYTE_MUTATIONS) + tuple(PICKLE_MUTATIONS) + NPY_TARGETED,
}


def kind_of(fmt: str, seed: int, index: int) -> str:
  """The mutation kind of case `index` (make_case's first draw)."""
  rng = np.random.default_rng([seed, index])
  return KINDS[fmt][rng.integers(len(KINDS[fmt]))]


def make_case(seeds: Seeds, fmt: str, seed: int, index: int, fired_dir: str
              ) -> tuple[str, bytes]:
  """(mutation kind, file bytes) of case `index`: the same for the same seed."""
  import copy
  rng = np.random.default_rng([seed, index])
  kinds = KINDS[fmt]
  kind = kinds[rng.integers(len(kinds))]
  if fmt == "pth":
    if kind in BYTE_MUTATIONS:
      return kind, BYTE_MUTATIONS[kind](rng, seeds.pth)
    if kind in PICKLE_MUTATIONS:
      pk = mutate_pickle(kind, rng, seeds.pkl, fired_dir)
      return kind, pth_zip([(n, pk if n.endswith("data.pkl") else d)
                            for n, d in seeds.entries])
    if kind in PTH_ZIP:
      return kind, pth_zip_mutation(kind, rng, seeds.entries)
    tensors, storages = copy.deepcopy(seeds.tensors), copy.deepcopy(seeds.storages)
    extra = {}
    for _ in range(1 if rng.integers(4) else 2):
      extra.update(pth_targeted(kind, rng, tensors, storages))
    try:
      pk = pth_pickle(tensors, storages, **extra)
    except Exception:  # the writer could not express it: fall back to the seed
      pk = seeds.pkl
    return kind, pth_zip(pth_entries(pk, storages))
  value = seeds.stat_value if fmt == "stat" else seeds.ops_value
  raw = seeds.npy[fmt][int(rng.integers(3, 5))]
  if kind in BYTE_MUTATIONS:
    return kind, BYTE_MUTATIONS[kind](rng, raw)
  if kind in PICKLE_MUTATIONS:
    start = raw.index(b"\n") + 1
    return kind, raw[:start] + mutate_pickle(kind, rng, raw[start:], fired_dir)
  return kind, npy_targeted(kind, rng, value)


# ------------------------------------------------------------------ oracles


def _storage_chunks(path: str) -> dict[int, set[bytes]]:
  chunks: dict[int, set[bytes]] = {1: set(), 2: set(), 4: set(), 8: set()}
  with zipfile.ZipFile(path) as zf:
    for info in zf.infolist():
      if "data/" not in info.filename:
        continue
      try:
        with zf.open(info) as f:  # the declared size may lie: read what is there
          raw = f.read(2**26)
      except Exception:
        continue
      for size, found in chunks.items():
        found.update(raw[k:k + size] for k in range(0, len(raw) - size + 1, size))
  return chunks


def check_pth(path: str, state) -> str | None:
  """None if every returned element is an aligned element of one of the file's storages."""
  chunks = None
  for key, a in state.items():
    if not isinstance(a, np.ndarray):
      return f"{key!r} is a {type(a).__name__}, not an array"
    if a.dtype == bool:
      if not set(np.unique(a.view(np.uint8)).tolist()) <= {0, 1}:
        return f"{key!r} holds bools that are not 0/1"
      continue
    if a.size == 0:
      continue
    chunks = chunks or _storage_chunks(path)
    rows = np.ascontiguousarray(a).reshape(-1).view(np.uint8).reshape(-1, a.dtype.itemsize)
    missing = sum(1 for r in rows if r.tobytes() not in chunks[a.dtype.itemsize])
    if missing:
      return f"{key!r}: {missing} of {a.size} elements are in none of the file's storages"
  return None


def check_npy(raw: bytes, value, depth: int = 0) -> str | None:
  """None if every numpy array and scalar in `value` is a run of the file's bytes."""
  if depth > 80:
    return "the result nests deeper than the reader allows"
  if isinstance(value, np.ndarray) and value.dtype == object:
    for item in value.flat:
      bad = check_npy(raw, item, depth + 1)
      if bad:
        return bad
    return None
  if isinstance(value, (np.ndarray, np.generic)):
    a = np.asarray(value)
    if a.dtype == bool:
      return None if set(np.unique(a.view(np.uint8)).tolist()) <= {0, 1} else \
          "bools that are not 0/1"
    if a.size == 0:
      return None
    order = "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"
    if a.tobytes(order=order) not in raw:
      return f"a {a.dtype} {a.shape} array whose bytes are not in the file"
    return None
  if isinstance(value, dict):
    value = list(value.values())
  if isinstance(value, (list, tuple)):
    for item in value:
      bad = check_npy(raw, item, depth + 1)
      if bad:
        return bad
  return None


def _plain(value):
  """json.dumps fallback: every returned value turned into plain Python (tolist, str)."""
  if isinstance(value, (np.ndarray, np.generic)):
    return value.tolist()
  if isinstance(value, (bytes, bytearray)):
    return value.hex()
  if isinstance(value, (set, frozenset)):
    return sorted(map(repr, value))
  return repr(value)


# ------------------------------------------------------------------ the worker


class Canary:
  """Detects code run by a file: marker files, a marker module, an import side effect
  and an audit hook (os.system, subprocess, exec of source, fork, spawn, ctypes)."""

  EVENTS = {"os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn",
            "os.fork", "os.forkpty", "ctypes.dlopen", "socket.connect", "os.kill",
            "shutil.rmtree"}

  def __init__(self, folder: str):
    self.folder = folder
    self.fired_dir = os.path.join(folder, "fired")
    os.makedirs(self.fired_dir, exist_ok=True)
    with open(os.path.join(folder, "fuzz_canary.py"), "w") as f:
      f.write("import os\nFIRED = %r\n\ndef fire(*args, **kwargs):\n"
              "  open(os.path.join(FIRED, 'fired.fire'), 'w').close()\n" % self.fired_dir)
    with open(os.path.join(folder, "fuzz_canary_import.py"), "w") as f:
      f.write("import os\nopen(os.path.join(%r, 'fired.import'), 'w').close()\n"
              "def anything(*a):\n  pass\n" % self.fired_dir)
    sys.path.insert(0, folder)
    import fuzz_canary  # noqa: F401  (so that eval payloads find it)
    self.active, self.events = False, []
    sys.addaudithook(self._hook)

  def _hook(self, event, args):
    if not self.active:
      return
    if event in self.EVENTS or (event == "import" and str(args[0]).startswith("fuzz_canary_"))\
        or (event == "exec" and getattr(args[0], "co_filename", "") == "<string>"):
      self.events.append(event)

  def __enter__(self):
    self.events.clear()
    self.active = True
    return self

  def __exit__(self, *exc):
    self.active = False

  def fired(self) -> list[str]:
    files = sorted(os.listdir(self.fired_dir))
    for name in files:
      os.remove(os.path.join(self.fired_dir, name))
    sys.modules.pop("fuzz_canary_import", None)
    return files + sorted(set(self.events))

  def self_test(self) -> tuple[int, int]:
    """How many payloads set the canary off when given to plain pickle.loads."""
    hits = 0
    for target, args in payloads(self.fired_dir):
      with self:
        try:
          pickle.loads(b"\x80\x02" + enc_call(target, args) + b".")
        except Exception:
          pass
      time.sleep(0.01)
      hits += bool(self.fired())
    return hits, len(payloads(self.fired_dir))


def _load_reader(spec: str):
  target, _, name = spec.rpartition(":")
  if target.endswith(".py"):
    import importlib.util
    module_spec = importlib.util.spec_from_file_location("fuzz_reader_module", target)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  else:
    import importlib
    module = importlib.import_module(target)
  return getattr(module, name)


class Runner:
  """Reads cases in this process; `case` returns one outcome record."""

  def __init__(self, seed: int, folder: str, pth_reader: str):
    from deepcad_jax.errors import UserError
    from deepcad_jax.analysis.rois import read_suite2p_stat, rois_from_suite2p
    from deepcad_jax.data.formats.suite2p import load_ops
    self.UserError = UserError
    self.seed, self.folder = seed, folder
    self.canary = Canary(os.path.join(folder, "canary"))
    self.seeds = Seeds()
    read_pth = _load_reader(pth_reader)

    def stat(path):
      stat = read_suite2p_stat(path)
      rois_from_suite2p(stat, FRAME_SHAPE, f"{path}: ")
      return stat
    self.readers = {"pth": read_pth, "stat": stat, "ops": load_ops}
    self.canary_hits = self.canary.self_test()
    for fmt in FORMATS:  # warm up lazy imports before the canary watches
      path = self._write(fmt, self.seeds.pth if fmt == "pth" else self.seeds.npy[fmt][4])
      try:
        self.readers[fmt](path)
      except UserError:  # another reader (--pth-reader) may refuse the seed
        pass

  def _write(self, fmt: str, data: bytes) -> str:
    path = os.path.join(self.folder, f"case_{fmt}.{'pth' if fmt == 'pth' else 'npy'}")
    with open(path, "wb") as f:
      f.write(data)
    return path

  def case(self, fmt: str, index: int, verbose: bool = False) -> dict:
    kind, data = make_case(self.seeds, fmt, self.seed, index, self.canary.fired_dir)
    path = self._write(fmt, data)
    record = {"i": index, "fmt": fmt, "kind": kind, "outcome": "ok", "detail": ""}
    with self.canary:
      try:
        value = self.readers[fmt](path)
      except self.UserError as e:
        value, message = None, str(e)
        good = path in message and "\n" not in message and len(message) < 600
        record["outcome"] = "refused" if good else "bad_message"
        record["detail"] = message.replace(path, "<file>")
      except Exception as e:
        value = None
        record["outcome"], record["detail"] = "crash", f"{type(e).__name__}: {e}"[:300]
        if verbose:
          traceback.print_exc()
    if record["outcome"] == "ok":
      bad = check_pth(path, value) if fmt == "pth" else check_npy(data, value)
      if bad:
        record["outcome"], record["detail"] = "oob", bad
      else:
        try:  # what a reader returns must also be usable
          json.dumps(value, default=_plain, skipkeys=True)
        except Exception as e:
          record["outcome"] = "crash"
          record["detail"] = f"a returned value fails when used: {type(e).__name__}: {e}"[:300]
    fired = self.canary.fired()
    if fired:
      record["outcome"], record["detail"] = "code", ",".join(fired)
    return record


def worker(args) -> None:
  """Runs cases start..stop in `args.folder` (the driver's; it cleans up after a crash)."""
  runner = Runner(args.seed, tempfile.mkdtemp(dir=args.folder), args.pth_reader)
  _limit_memory(args.memory_gib)
  print(json.dumps({"canary": runner.canary_hits}), flush=True)
  formats = args.formats.split(",")
  for i in range(args.start, args.stop):
    fmt = formats[i % len(formats)]
    print(f"S {i}", flush=True)
    print(json.dumps(runner.case(fmt, i)), flush=True)


def _limit_memory(gib: float) -> None:
  """Caps the worker's address space, so a memory bomb fails instead of swapping."""
  try:
    import resource
    with open("/proc/self/statm") as f:
      used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = used + int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  except (ImportError, OSError, ValueError):
    pass


# ------------------------------------------------------------------ the driver

FAILURES = ("crash", "oob", "code", "hang", "bad_message")


def _spawn(args, start: int, folder: str, err) -> subprocess.Popen:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--seed", str(args.seed),
         "--start", str(start), "--stop", str(args.cases), "--formats", args.formats,
         "--pth-reader", args.pth_reader, "--memory-gib", str(args.memory_gib),
         "--folder", folder]
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)


def _tail(path: str, size: int = 2000) -> str:
  with open(path, "rb") as f:
    f.seek(max(0, os.path.getsize(path) - size))
    return f.read().decode("utf-8", "replace")


def drive(args) -> dict:
  folder = tempfile.mkdtemp(prefix="fuzz_loaders_")
  try:
    return _drive(args, folder)
  finally:
    shutil.rmtree(folder, ignore_errors=True)


def _drive(args, folder: str) -> dict:
  records: list[dict] = []
  canary = None
  start, t0, restarts = 0, time.time(), 0
  formats = args.formats.split(",")
  err_path = os.path.join(folder, "worker.err")
  while start < args.cases:
    with open(err_path, "w") as err:  # a file, not a pipe: warnings never block a worker
      proc = _spawn(args, start, folder, err)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    current, pending, lines = None, b"", collections.deque()
    timeout = args.case_timeout + 120  # the first line waits for imports
    while True:
      if not lines:  # unbuffered reads, so that select() sees every line the worker wrote
        if not sel.select(timeout):
          os.kill(proc.pid, signal.SIGKILL)  # the worker we started, by its id
          proc.wait()
          if current is not None:
            fmt = formats[current % len(formats)]
            records.append({"i": current, "fmt": fmt, "kind": kind_of(fmt, args.seed, current),
                            "outcome": "hang",
                            "detail": f"no answer in {args.case_timeout} s"})
          break
        chunk = os.read(proc.stdout.fileno(), 1 << 16)
        if chunk:
          *done, pending = (pending + chunk).split(b"\n")
          lines.extend(done)
          continue
        proc.wait()
        if current is not None:
          err = _tail(err_path, 300)
          sig = -proc.returncode if proc.returncode and proc.returncode < 0 else None
          fmt = formats[current % len(formats)]
          records.append({"i": current, "fmt": fmt, "kind": kind_of(fmt, args.seed, current),
                          "outcome": "crash",
                          "detail": (f"worker killed by signal {signal.Signals(sig).name}"
                                     if sig else f"worker exited {proc.returncode}: {err}")})
        elif proc.returncode:
          raise SystemExit(f"the fuzz worker failed to start:\n{_tail(err_path)}")
        break
      line = lines.popleft().decode()
      timeout = args.case_timeout
      if line.startswith("S "):
        current = int(line.split()[1])
      else:
        record = json.loads(line)
        if "canary" in record:
          canary = record["canary"]
          continue
        records.append(record)
        current = None
        if not args.quiet and len(records) % 1000 == 0:
          print(f"  {len(records)} cases, {time.time() - t0:.0f} s", flush=True)
    sel.close()
    proc.stdout.close()
    start = (records[-1]["i"] + 1) if records else args.cases
    if start < args.cases:
      restarts += 1
  seconds = time.time() - t0
  return summarize(args, records, seconds, canary, restarts)


def summarize(args, records, seconds, canary, restarts) -> dict:
  outcomes = collections.Counter(r["outcome"] for r in records)
  by_format = {f: dict(collections.Counter(r["outcome"] for r in records if r["fmt"] == f))
               for f in args.formats.split(",")}
  by_kind = collections.defaultdict(collections.Counter)
  for r in records:
    by_kind[f"{r['fmt']}:{r['kind']}"][r["outcome"]] += 1
  reasons = collections.Counter(
      re.sub(r"\d+", "N", re.sub(r"\(.*", "(...)", r["detail"]))[:90]
      for r in records if r["outcome"] == "refused")
  causes = collections.Counter(  # which library errors were reported as damage
      m.group(1) for r in records if r["outcome"] == "refused"
      for m in [re.search(r"damaged[^(]*\((\w+)[:)]", r["detail"])] if m)
  failures = [r for r in records if r["outcome"] in FAILURES]
  deaths = [r for r in records if r["outcome"] == "hang" or r["detail"].startswith("worker")]
  import numpy
  return {"cases": len(records), "seed": args.seed, "formats": args.formats,
          "pth_reader": args.pth_reader, "seconds": round(seconds, 1),
          "outcomes": dict(outcomes), "failed": len(failures),
          "crashes": outcomes["crash"] + outcomes["hang"], "out_of_bounds": outcomes["oob"],
          "code_executed": outcomes["code"], "bad_messages": outcomes["bad_message"],
          "canary_self_test": canary, "worker_restarts": restarts,
          "by_format": by_format, "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
          "top_refusals": reasons.most_common(25), "damage_causes": dict(causes),
          "failures": failures[:50], "worker_deaths": deaths[:50],
          "python": sys.version.split()[0], "numpy": numpy.__version__,
          "date": datetime.date.today().isoformat()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", type=int, default=10000, help="cases in all (round-robin "
                 "over the formats)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--formats", default=",".join(FORMATS))
  p.add_argument("--case-timeout", type=float, default=60.0, help="seconds before a case "
                 "counts as a hang")
  p.add_argument("--memory-gib", type=float, default=4.0, help="address space a worker "
                 "may add")
  p.add_argument("--pth-reader", default="deepcad_jax.model_io.convert:read_state_dict",
                 help="MODULE:FUNCTION or FILE.py:FUNCTION that reads a .pth")
  p.add_argument("--json", help="write the summary here")
  p.add_argument("--replay", help="FORMAT:INDEX: run one case in this process, verbosely")
  p.add_argument("--save", help="with --replay: also write the case's file here")
  p.add_argument("--quiet", action="store_true")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--folder", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    worker(args)
    return 0
  if args.replay:
    fmt, index = args.replay.split(":")
    folder = tempfile.mkdtemp(prefix="fuzz_replay_")
    runner = Runner(args.seed, folder, args.pth_reader)
    kind, data = make_case(runner.seeds, fmt, args.seed, int(index), runner.canary.fired_dir)
    if args.save:
      with open(args.save, "wb") as f:
        f.write(data)
    print(json.dumps(runner.case(fmt, int(index), verbose=True), indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    return 0
  summary = drive(args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=1)
  if not args.quiet:
    print(f"{summary['cases']} cases ({args.formats}) in {summary['seconds']} s: "
          f"{summary['outcomes']}")
    print(f"crashes {summary['crashes']}, out-of-bounds reads {summary['out_of_bounds']}, "
          f"code executed {summary['code_executed']}, bad messages "
          f"{summary['bad_messages']}; canary self-test {summary['canary_self_test']}")
    for r in summary["failures"][:20]:
      print("  FAIL", json.dumps(r))
  return 1 if summary["failed"] else 0


if __name__ == "__main__":
  sys.exit(main())
