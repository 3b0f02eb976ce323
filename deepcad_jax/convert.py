"""Import DeepCAD-RT PyTorch checkpoints (.pth) without PyTorch.

A `.pth` written by `torch.save` (PyTorch >= 1.6) is a zip holding `data.pkl` (a pickle of
the state_dict whose tensors point at raw storages by key) and `data/<key>` files with
the raw bytes. The pickle is read with a restricted unpickler that resolves only the few
globals a state_dict needs (OrderedDict, tensor rebuilding, storage types) and refuses
anything else, so a malicious checkpoint cannot run code. Tensors become numpy arrays,
and the DeepCAD-RT keys are mapped onto the Flax `UNet3D` parameters.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import zipfile
from typing import Any

import numpy as np

from deepcad_jax.errors import UserError
from deepcad_jax.model import LEVELS

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  def __init__(self, name: str):
    self.name = name
    dtype = _STORAGE_DTYPES[name]
    if dtype == "bfloat16":
      import ml_dtypes
      dtype = ml_dtypes.bfloat16
    self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """Stand-in for torch._utils._rebuild_tensor_v2: a numpy copy of the view."""
  if not size:
    return storage[offset].copy()
  itemsize = storage.dtype.itemsize
  needed = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
  if needed > storage.size:
    raise UserError("a tensor in the checkpoint points past the end of its storage; the "
                    "file is damaged.")
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(st * itemsize for st in stride))
  return np.array(view)


def _rebuild_parameter(data, requires_grad, hooks, *unused):
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only what a state_dict of tensors needs; refuses every other global."""

  def __init__(self, file, zf: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self.zf, self.prefix, self.path = zf, prefix, path

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise UserError(f"{self.path} asks to load {module}.{name}, which a state_dict does "
                    "not need; refusing it (a checkpoint is untrusted input and pickle "
                    "can run code). Save only model.state_dict().")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise UserError(f"{self.path} holds an unexpected persistent reference {pid!r}.")
    _, storage_type, key, _location, numel = pid[:5]
    if isinstance(storage_type, str):  # newer writers name the dtype directly
      storage_type = _StorageType(storage_type)
    name = f"{self.prefix}data/{key}"
    try:
      raw = self.zf.read(name)
    except KeyError:
      raise UserError(f"{self.path} is missing storage {name}; the file is damaged.") from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
      raise UserError(f"{self.path} is damaged ({e}).") from None
    array = np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder("<"))
    if array.size < int(numel):
      raise UserError(f"{self.path}: storage {key} is shorter than it claims; the file is "
                      "damaged or truncated.")
    return array.astype(storage_type.dtype)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a PyTorch `.pth` state_dict as numpy arrays, without torch."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist; give the DeepCAD-RT .pth file.")
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
      if byteorder in zf.namelist() and zf.read(byteorder).strip() != b"little":
        raise UserError(f"{path} was saved on a big-endian machine; re-save it on a "
                        "little-endian one.")
      data = io.BytesIO(zf.read(pickles[0]))
      state = _RestrictedUnpickler(data, zf, prefix, path).load()
  except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError) as e:
    if isinstance(e, UserError):
      raise
    raise UserError(f"{path} is damaged or truncated ({e}); copy the .pth again.") from None
  if isinstance(state, dict) and "state_dict" in state and isinstance(
      state["state_dict"], dict):
    state = state["state_dict"]
  if not isinstance(state, dict) or not all(
      isinstance(v, np.ndarray) for v in state.values()):
    raise UserError(f"{path} does not hold a state_dict of tensors; save "
                    "model.state_dict().")
  return {k: v for k, v in state.items()}


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
  import jax
  from deepcad_jax.model import init_params

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
  from deepcad_jax import config as config_lib
  if "fmap" in para and para["fmap"] != features:
    raise UserError(f"para.yaml says fmap={para['fmap']} but the weights have width "
                    f"{features}; give the para.yaml that belongs to this .pth.")
  patch = tuple(para.get(k, 150) for k in ("patch_t", "patch_y", "patch_x"))
  train_patch = tuple(max(8, p // 8 * 8) for p in patch)
  train = {k: para[k] for k in ("lr", "b1", "b2") if k in para}
  return config_lib.from_dict({
      "name": "deepcad_rt_pth", "model": {"features": features},
      "data": {"patch": train_patch, "scale": para.get("scale_factor", 1.0)},
      "train": train,
      "infer": {"patch": patch, "overlap": para.get("overlap_factor", 0.4)}})


def load_pth_model(pth: str, para: str | None = None):
  """A `Model` straight from a DeepCAD-RT .pth (and its para.yaml, found beside it)."""
  from deepcad_jax.checkpoint import FORMAT, Model
  para = para or find_para(pth)
  para_values = read_para(para) if para else {}
  params, features = to_flax_params(read_state_dict(pth), pth)
  cfg = pth_config(features, para_values)
  meta = {"format": FORMAT, "config": cfg.to_dict(), "features": features,
          "patch": list(cfg.data.patch), "mean": None, "data": [],
          "converted_from": os.path.abspath(pth), "para": para_values,
          "para_file": os.path.abspath(para) if para else None, "step": 0}
  return Model(params=params, features=features, patch=cfg.data.patch, mean=None,
               config=cfg, meta=meta, source=os.path.abspath(pth))


def convert(pth: str, output: str, para: str | None = None, overwrite: bool = False) -> str:
  """Write a deepcad-jax model directory from a DeepCAD-RT .pth; returns its path."""
  import orbax.checkpoint as ocp

  from deepcad_jax import checkpoint as ckpt
  from deepcad_jax.train import create_state
  if os.path.exists(ckpt.checkpoint_dir(output)):
    if not overwrite:
      raise UserError(f"{output} already holds a model; add --overwrite or choose another "
                      "--output.")
    ckpt.clear(output)
  model = load_pth_model(pth, para)
  state = create_state(model.config, model.params)
  os.makedirs(output, exist_ok=True)
  mgr = ckpt.manager(output, keep=1)
  mgr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(model.meta)), force=True)
  mgr.wait_until_finished()
  mgr.close()
  return os.path.abspath(output)
