"""Import DeepCAD-RT PyTorch checkpoints (.pth) without PyTorch.

A `.pth` written by `torch.save` (PyTorch >= 1.6) is a zip holding `data.pkl` (a pickle of
the state_dict whose tensors point at raw storages by key) and `data/<key>` files with
the raw bytes. The pickle is read by `safe_pickle`'s restricted unpickler, which resolves
only the few globals a state_dict needs (OrderedDict, tensor rebuilding, storage types)
and refuses anything else, so a malicious checkpoint cannot run code; each tensor's
offset, shape and strides are checked against its storage before its elements are copied
(never viewed). Tensors become numpy arrays, and the DeepCAD-RT keys are mapped onto the
Flax `UNet3D` parameters.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from typing import Any

import jax
import ml_dtypes
import numpy as np

from deepcad_jax import config as config_lib
from deepcad_jax.data import safe_pickle
from deepcad_jax.model_io.checkpoint import Model, RunMeta, save_model
from deepcad_jax.errors import UserError
from deepcad_jax.runtime.paths import check_input
from deepcad_jax.core.network import LEVELS, init_params

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_FIX = "copy the .pth again, or re-save it with torch.save(model.state_dict(), path)"
_MAX_ZIP_RATIO = 200  # deflated entries above 1 MiB may expand at most this much


class _StorageType(safe_pickle.Stub):
  """torch.<Name>Storage, named by a checkpoint: only its numpy dtype is used."""

  __slots__ = ("name",)
  kind = "storage type"

  def __init__(self, name: str):
    self.name = name

  @property
  def dtype(self) -> np.dtype:
    dtype = _STORAGE_DTYPES[self.name]
    if dtype == "bfloat16":
      dtype = ml_dtypes.bfloat16
    return np.dtype(dtype)


_STORAGE_TYPES = {name: _StorageType(name) for name in _STORAGE_DTYPES}


class _Storage(safe_pickle.Stub):
  """One storage's elements, copied out of the zip; tensors are bounds-checked copies."""

  __slots__ = ("key", "data", "budget")
  kind = "storage"

  def __init__(self, key: str, data: np.ndarray):
    self.key, self.data = key, data
    self.budget = 8 * data.size + 4096  # tensors may share a storage, but not endlessly


@safe_pickle.checked
def _rebuild_tensor(storage, offset, size, stride, *unused):
  """Stand-in for torch._utils._rebuild_tensor_v2: a copy of the elements the tensor
  names, after checking its offset, shape and strides against its storage."""
  if not isinstance(storage, _Storage) or len(unused) > 3:
    raise safe_pickle.Refused("rebuilds a tensor from something that is not a storage")
  offset = safe_pickle.as_int(offset, "a tensor offset")
  size = safe_pickle.as_shape(size, "a tensor of shape")
  stride = safe_pickle.as_shape(stride, "a tensor with strides")
  if len(size) != len(stride):
    raise safe_pickle.Refused(f"has a tensor of shape {size} with strides {stride}")
  data, count = storage.data, math.prod(size)
  safe_pickle.check_extent(size, data.dtype.itemsize, "a tensor")
  if count == 0:
    if offset > data.size:
      raise safe_pickle.Refused(f"has an empty tensor at offset {offset} past the end of "
                                f"storage {storage.key}")
    return safe_pickle.Value(np.zeros(size, data.dtype))
  extent = 0  # sorted by stride, each stride must step past all the smaller ones
  for st, n in sorted((st, n) for n, st in zip(size, stride) if n > 1):
    if st <= extent:
      raise safe_pickle.Refused(f"has a tensor of shape {size} whose strides {stride} "
                                "overlap or interleave, which torch never saves for a "
                                "parameter")
    extent += st * (n - 1)
  if offset + extent >= data.size:
    raise safe_pickle.Refused(f"has a tensor of shape {size} (offset {offset}, strides "
                              f"{stride}) that reaches past the {data.size} elements of "
                              f"storage {storage.key}")
  storage.budget -= count
  if storage.budget < 0:
    raise safe_pickle.Refused(f"rebuilds storage {storage.key} into far more tensors than "
                              "it holds")
  if stride == tuple(math.prod(size[i + 1:]) for i in range(len(size))):
    return safe_pickle.Value(data[offset:offset + count].reshape(size).copy())
  index = np.array(offset, np.int64)  # every index is checked above: < data.size
  for n, st in zip(size, stride):
    index = index[..., None] + np.arange(n, dtype=np.int64) * st
  return safe_pickle.Value(data[index])


@safe_pickle.checked
def _rebuild_parameter(data, requires_grad=False, hooks=None, *unused):
  if not (isinstance(data, safe_pickle.Value) and isinstance(data.value, np.ndarray)):
    raise safe_pickle.Refused("rebuilds a parameter from something that is not a tensor")
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): safe_pickle.Dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): kind for name, kind in _STORAGE_TYPES.items()},
}


def _read_entry(zf: zipfile.ZipFile, name: str) -> bytes:
  """One zip entry's bytes, refusing what torch never writes (other compressions, a
  deflated entry that would expand like a zip bomb)."""
  try:
    info = zf.getinfo(name)
  except KeyError:
    raise safe_pickle.Refused(f"is missing {name} (the file is damaged or truncated)") \
        from None
  if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or (
      info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > 2**20 and
      info.file_size > _MAX_ZIP_RATIO * max(info.compress_size, 1)):
    raise safe_pickle.Refused(f"stores {name} compressed in a way torch never writes")
  try:
    with zf.open(info) as f:  # at most the declared size, which is checked above
      return f.read(info.file_size)
  except Exception as e:  # zipfile on untrusted bytes: any error is damage
    raise safe_pickle.Refused(f"is damaged ({safe_pickle.why(e)})") from None


class _Storages:
  """persistent_load: ('storage', type, key, location, numel) -> the copied elements of
  <prefix>data/<key>, each read once."""

  def __init__(self, zf: zipfile.ZipFile, prefix: str):
    self.zf, self.prefix, self.loaded = zf, prefix, {}

  @safe_pickle.checked
  def __call__(self, pid):
    if type(pid) is not tuple or len(pid) < 5 or pid[0] != "storage":
      raise safe_pickle.Refused(f"holds an unexpected persistent reference "
                                f"{safe_pickle.show(pid)}")
    _, kind, key, _location, numel = pid[:5]
    if type(kind) is str:  # some writers name the storage type instead of pickling it
      kind = _STORAGE_TYPES.get(kind, kind)
    if not isinstance(kind, _StorageType):
      raise safe_pickle.Refused(f"uses the storage type {safe_pickle.show(kind)}, which "
                                "is not a tensor type deepcad-jax reads")
    if type(key) is not str or not 0 < len(key) <= 100:
      raise safe_pickle.Refused(f"names a storage {safe_pickle.show(key)}, which torch "
                                "never writes")
    numel = safe_pickle.as_int(numel, f"a storage {key} of size")
    if key in self.loaded:
      storage = self.loaded[key]
      if storage.data.dtype != kind.dtype or storage.data.size != numel:
        raise safe_pickle.Refused(f"describes storage {key} in two different ways")
      return storage
    dtype = kind.dtype
    raw = _read_entry(self.zf, f"{self.prefix}data/{key}")
    if len(raw) < numel * dtype.itemsize:
      raise safe_pickle.Refused(f"has storage {key} shorter than it claims (the file is "
                                "damaged or truncated)")
    if dtype.kind == "b":  # any non-zero byte is True; numpy expects 0 or 1
      data = np.frombuffer(raw, np.uint8, count=numel) != 0
    else:
      data = np.frombuffer(raw, dtype.newbyteorder("<"), count=numel).astype(dtype)
    self.loaded[key] = storage = _Storage(key, data)
    return storage


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a PyTorch `.pth` state_dict as numpy arrays, without torch. The file
  is untrusted: the pickle goes through `safe_pickle`, and every tensor's offset, shape
  and strides are checked against its storage before its elements are copied."""
  path = os.fspath(path)
  if not os.path.lexists(path):
    raise UserError(f"{path} does not exist; give the DeepCAD-RT .pth file.")
  check_input(path, folder=False)  # no FIFO, device or looping link
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(2)
    if head[:1] == b"\x80":
      raise UserError(f"{path} is in PyTorch's legacy (pre-1.6) format; re-save it with "
                      "PyTorch >= 1.6: torch.save(torch.load(f), 'new.pth').")
    raise UserError(f"{path} is not a PyTorch checkpoint (not a zip archive), or it is "
                    "truncated; give the .pth that DeepCAD-RT saved.")
  try:
    with zipfile.ZipFile(path) as zf:
      pickles = [n for n in zf.namelist() if n.endswith("data.pkl")]
      if not pickles:
        raise UserError(f"{path} holds no data.pkl; it is not a PyTorch checkpoint.")
      prefix = pickles[0][:-len("data.pkl")]
      byteorder = f"{prefix}byteorder"
      if byteorder in zf.namelist() and _read_entry(zf, byteorder).strip() != b"little":
        raise UserError(f"{path} was saved on a big-endian machine; re-save it on a "
                        "little-endian one.")
      state = safe_pickle.loads(_read_entry(zf, pickles[0]), path, _ALLOWED,
                                what="a state_dict", fix=_FIX,
                                persistent_load=_Storages(zf, prefix))
  except safe_pickle.Refused as e:
    raise safe_pickle.user_error(path, str(e), _FIX) from None
  except UserError:
    raise
  except Exception as e:  # zipfile on untrusted bytes: any error is damage
    raise safe_pickle.user_error(path, f"is damaged or truncated ({safe_pickle.why(e)})",
                                 _FIX) from None
  if isinstance(state, dict) and "state_dict" in state and isinstance(
      state["state_dict"], dict):
    state = state["state_dict"]
  if not isinstance(state, dict) or not all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
    raise UserError(f"{path} does not hold a state_dict of tensors; save "
                    "model.state_dict().")
  return dict(state)


# ------------------------------------------------------------------ key mapping

_ENC = "Generator.encoders.{i}.basic_module.SingleConv{j}.conv.{p}"
_DEC = "Generator.decoders.{i}.basic_module.SingleConv{j}.conv.{p}"
_FINAL = "Generator.final_conv.{p}"


def _strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in state.items():
    while k.startswith("module."):
      k = k[len("module."):]
    out[k] = v
  return out


def key_map() -> dict[str, tuple[str, str, str]]:
  """DeepCAD-RT key -> (Flax module, conv, param) for every expected tensor."""
  m = {}
  for i in range(LEVELS):
    for j in (1, 2):
      for p, fp in (("weight", "kernel"), ("bias", "bias")):
        m[_ENC.format(i=i, j=j, p=p)] = (f"encoder_{i}", f"conv{j}", fp)
  for i in range(LEVELS - 1):  # decoders.0 is the deepest
    for j in (1, 2):
      for p, fp in (("weight", "kernel"), ("bias", "bias")):
        m[_DEC.format(i=i, j=j, p=p)] = (f"decoder_{LEVELS - 2 - i}", f"conv{j}", fp)
  for p, fp in (("weight", "kernel"), ("bias", "bias")):
    m[_FINAL.format(p=p)] = ("final", "", fp)
  return m


def infer_features(state: dict[str, np.ndarray], path: str = "checkpoint") -> int:
  key = _ENC.format(i=0, j=2, p="weight")
  if key not in state:
    raise UserError(f"{path} has no {key}; it is not a DeepCAD-RT (3D U-Net) state_dict.")
  return int(state[key].shape[0])


def to_flax_params(state: dict[str, np.ndarray], path: str = "checkpoint"
                   ) -> tuple[dict, int]:
  """(Flax UNet3D params, features) from a DeepCAD-RT state_dict; checks every key."""
  state = _strip_prefix(state)
  features = infer_features(state, path)
  expected = jax.eval_shape(lambda: init_params(features, 0))
  mapping = key_map()
  missing = sorted(set(mapping) - set(state))
  extra = sorted(set(state) - set(mapping))
  if missing:
    raise UserError(f"{path} lacks {len(missing)} expected key(s), first {missing[0]}; "
                    f"it is not a DeepCAD-RT network of width {features}.")
  if extra:
    raise UserError(f"{path} has {len(extra)} unexpected key(s), first {extra[0]}; it is "
                    "not a DeepCAD-RT network (or a different architecture).")
  params: dict[str, Any] = {}
  for key, (module, conv, name) in mapping.items():
    value = state[key]
    if name == "kernel":  # torch (out, in, kT, kH, kW) -> flax (kT, kH, kW, in, out)
      value = np.transpose(value, (2, 3, 4, 1, 0)) if value.ndim == 5 else value
    target = expected[module][conv][name] if conv else expected[module][name]
    if value.shape != target.shape:
      raise UserError(f"{path}: {key} has shape {tuple(state[key].shape)}, which does not "
                      f"fit a DeepCAD-RT network of width {features}.")
    node = params.setdefault(module, {})
    node = node.setdefault(conv, {}) if conv else node
    node[name] = np.asarray(value, np.float32)
  return params, features


# ------------------------------------------------------------------ para.yaml

_PARA_KEYS = {"patch_x": int, "patch_y": int, "patch_t": int, "overlap_factor": float,
              "fmap": int, "scale_factor": float, "lr": float, "b1": float, "b2": float,
              "n_epochs": int, "train_datasets_size": int, "batch_size": int}


def read_para(path: str) -> dict[str, Any]:
  """The simple `key: value` lines of a DeepCAD-RT para.yaml (parsed, never executed)."""
  values: dict[str, Any] = {}
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = f.readlines()
  except OSError as e:
    raise UserError(f"cannot read {path} ({e.strerror}).") from None
  for line in lines:
    m = re.match(r"^\s*([A-Za-z_][\w]*)\s*:\s*(.*?)\s*$", line.split("#", 1)[0])
    if not m or m.group(1) not in _PARA_KEYS:
      continue
    text = m.group(2).strip("'\"")
    try:
      values[m.group(1)] = _PARA_KEYS[m.group(1)](float(text))
    except ValueError:
      raise UserError(f"{path}: {m.group(1)} should be a number, not {text!r}.") from None
  return values


def find_para(pth: str) -> str | None:
  """A para.yaml beside the .pth, if there is one."""
  folder = os.path.dirname(os.path.abspath(pth))
  for name in ("para.yaml", "para.yml"):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


# ------------------------------------------------------------------ models


def pth_config(features: int, para: dict[str, Any]):
  """A Config from a DeepCAD-RT para.yaml: its patch and overlap become the inference
  defaults; the training patch is the same floored to multiples of 8 (for fine-tuning)."""
  if "fmap" in para and para["fmap"] != features:
    raise UserError(f"para.yaml says fmap={para['fmap']} but the weights have width "
                    f"{features}; give the para.yaml that belongs to this .pth.")
  patch = tuple(para.get(k, 150) for k in ("patch_t", "patch_y", "patch_x"))
  train_patch = tuple(max(8, p // 8 * 8) for p in patch)
  train = {k: para[k] for k in ("lr", "b1", "b2") if k in para}
  return config_lib.from_dict({
      "name": "deepcad_rt_pth", "model": {"features": features},
      "data": {"patch": train_patch, "normalise": "fixed",
               "scale": para.get("scale_factor", 1.0)},
      "train": train,
      "infer": {"patch": patch, "overlap": para.get("overlap_factor", 0.4)}})


def load_pth_model(pth: str, para: str | None = None) -> Model:
  """A `Model` straight from a DeepCAD-RT .pth (and its para.yaml, found beside it)."""
  para = para or find_para(pth)
  para_values = read_para(para) if para else {}
  params, features = to_flax_params(read_state_dict(pth), pth)
  try:
    cfg = pth_config(features, para_values)
  except UserError as e:  # name the file the values came from
    if not para or str(e).startswith(para):
      raise
    raise UserError(f"{para}: {e}") from None
  meta = RunMeta(config=cfg, patch=cfg.data.patch, mean=None, provenance={
      "converted_from": os.path.abspath(pth), "para": para_values,
      "para_file": os.path.abspath(para) if para else None})
  return Model(params=params, meta=meta, source=os.path.abspath(pth))


def convert(pth: str, output: str, para: str | None = None, overwrite: bool = False) -> str:
  """Write a deepcad-jax model directory from a DeepCAD-RT .pth; returns its path."""
  return save_model(load_pth_model(pth, para), output, overwrite)


def describe(model: Model, written: str) -> str:
  """What `convert` wrote, in a line for the command line."""
  para = model.meta.provenance.get("para_file")
  return (f"wrote {written}: features={model.features}, inference patch "
          f"{model.config.infer.patch}, overlap {model.overlap}"
          + (f", para from {para}" if para else
             ", no para.yaml (defaults: patch 150^3, overlap 0.4)"))
