"""The .pth format: a PyTorch state_dict with DeepCAD-RT's keys and shapes (and its
para.yaml), written without torch: a `torch.save` file is a zip of a small pickle (which
names `torch._utils._rebuild_tensor_v2` and the storage type) and one raw little-endian
record per tensor, the layout `deepcad_jax.model_io.convert` reads.
"""

from __future__ import annotations

import os
import struct
import zipfile
from typing import BinaryIO, Callable, Sequence

import numpy as np

from deepcad_jax.model_io.checkpoint import Model
from deepcad_jax.model_io.convert import key_map, read_state_dict
from deepcad_jax.data.movie import refuse_to_overwrite
from deepcad_jax.runtime.files import commit
from deepcad_jax.export.network import ExportReport, Network, _get, _written


def torch_state_dict(params: dict) -> dict[str, np.ndarray]:
  """DeepCAD-RT's state_dict (its keys, in its order; (out, in, kT, kY, kX) kernels) from
  Flax parameters: the inverse of `deepcad_jax.model_io.convert.to_flax_params`."""
  state = {}
  for key, (module, conv, name) in key_map().items():
    value = np.asarray(_get(params, module, conv, name), np.float32)
    if name == "kernel":
      value = np.transpose(value, (4, 3, 0, 1, 2))
    state[key] = np.array(value, np.float32, order="C")  # an own, writable copy
  return state


def _pickle_str(text: str) -> bytes:
  data = text.encode("utf-8")
  return b"X" + struct.pack("<I", len(data)) + data          # BINUNICODE


def _pickle_int(value: int) -> bytes:
  return b"J" + struct.pack("<i", int(value))                 # BININT


def _pickle_tuple(values: Sequence[int]) -> bytes:
  return b"(" + b"".join(_pickle_int(v) for v in values) + b"t"  # MARK ... TUPLE


def _state_dict_pickle(shapes: Sequence[tuple[str, tuple[int, ...]]]) -> bytes:
  """The protocol-2 pickle `torch.save` writes for an OrderedDict of contiguous float32
  CPU tensors, tensor i stored in record data/i. Written opcode by opcode: only
  OrderedDict, torch._utils._rebuild_tensor_v2 and torch.FloatStorage are named."""
  ordered_dict = b"ccollections\nOrderedDict\n)R"             # GLOBAL, EMPTY_TUPLE, REDUCE
  out = bytearray(b"\x80\x02" + ordered_dict + b"(")            # PROTO 2, dict, MARK
  for i, (key, shape) in enumerate(shapes):
    strides = [int(np.prod(shape[d + 1:])) for d in range(len(shape))]
    storage = (b"(" + _pickle_str("storage") + b"ctorch\nFloatStorage\n" +
               _pickle_str(str(i)) + _pickle_str("cpu") +
               _pickle_int(int(np.prod(shape))) + b"tQ")       # TUPLE, BINPERSID
    out += (_pickle_str(key) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage +
            _pickle_int(0) + _pickle_tuple(shape) + _pickle_tuple(strides) +
            b"\x89" + ordered_dict + b"tR")                    # NEWFALSE, hooks; call
  out += b"u."                                                 # SETITEMS, STOP
  return bytes(out)


def _zip_record(zf: zipfile.ZipFile, f: BinaryIO, name: str, data: bytes) -> None:
  """A stored (uncompressed) record whose data starts at a multiple of 64 bytes, as
  PyTorch aligns them (padding in the local header's extra field, id 'FB')."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  start = f.tell() + 30 + len(name.encode("utf-8")) + 4
  pad = -start % 64
  info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
  zf.writestr(info, data)


def write_torch_state_dict(state: dict[str, np.ndarray], path: str) -> None:
  """Write a float32 state_dict in PyTorch's zip format (>= 1.6) without torch;
  `torch.load(path, weights_only=True)` reads it."""
  _written(path, _state_dict_writer(state)).publish()


def _state_dict_writer(state: dict[str, np.ndarray]) -> Callable[[BinaryIO], None]:
  def write(f: BinaryIO) -> None:
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
      records = [("data.pkl", _state_dict_pickle([(k, v.shape) for k, v in state.items()])),
                 (".format_version", b"1"), (".storage_alignment", b"64"),
                 ("byteorder", b"little")]
      records += [(f"data/{i}", np.ascontiguousarray(v, "<f4").tobytes())
                  for i, v in enumerate(state.values())]
      records += [("version", b"3\n")]
      for name, data in records:
        _zip_record(zf, f, f"archive/{name}", data)
  return write


def _yaml_float(value: float) -> str:
  """A float as PyYAML writes one (5.0e-05, not 5e-05, which YAML 1.1 reads as text)."""
  text = repr(float(value)).lower()
  return text.replace("e", ".0e") if "." not in text and "e" in text else text


def para_yaml(model: Model, features: int) -> str:
  """The para.yaml DeepCAD-RT writes beside its checkpoints (the keys that describe the
  network and its inference; `key: value` lines, sorted as yaml.dump sorts them)."""
  cfg = model.config
  patch = cfg.infer.patch or cfg.data.patch
  values = {"b1": _yaml_float(cfg.train.b1), "b2": _yaml_float(cfg.train.b2),
            "fmap": str(features), "lr": _yaml_float(cfg.train.lr),
            "overlap_factor": _yaml_float(cfg.infer.overlap),
            "patch_t": str(patch[0]), "patch_x": str(patch[2]), "patch_y": str(patch[1]),
            "scale_factor": _yaml_float(model.scale)}
  return "".join(f"{k}: {v}\n" for k, v in sorted(values.items()))


def export_pth(net: Network, output: str, overwrite: bool = False) -> ExportReport:
  """DeepCAD-RT's .pth (and para.yaml beside it) for `Network_3D_Unet(fmap=f)`."""
  para = os.path.join(os.path.dirname(os.path.abspath(output)), "para.yaml")
  refuse_to_overwrite([output, para], overwrite)
  state = torch_state_dict(net.params)
  files = [_written(output, _state_dict_writer(state))]  # both appear, or neither
  try:
    text = para_yaml(net.model, net.features).encode()
    files.append(_written(para, lambda f: f.write(text)))
  except BaseException:
    for f in files:
      f.abort()
    raise
  commit(files)
  # Read back with the torch-free reader: every tensor must come back bit for bit.
  back = read_state_dict(output)
  if list(back) != list(state) or not all(
      np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items()):
    raise AssertionError(f"{output} does not read back as written")
  return ExportReport("pth", os.path.abspath(output), [os.path.abspath(output), para],
                      os.path.getsize(output), net.features,
                      notes=[f"load it with Network_3D_Unet(f_maps={net.features}) and "
                             "load_state_dict(torch.load(path, weights_only=True))"])
