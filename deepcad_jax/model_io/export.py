"""Export a trained model for other tools: DeepCAD-RT's .pth, ONNX, a bioimage.io package.

* `pth`: a PyTorch state_dict with DeepCAD-RT's keys and shapes (and its para.yaml),
  written without torch: a `torch.save` file is a zip of a small pickle (which names
  `torch._utils._rebuild_tensor_v2` and the storage type) and one raw little-endian
  record per tensor, the layout `deepcad_jax.model_io.convert` reads.
* `onnx`: the network as an ONNX graph built with the `onnx` package's helpers
  (Conv, Relu, MaxPool, nearest Resize, Concat), NCDHW like DeepCAD-RT's own export:
  input `input` (N, 1, T, Y, X), output `output`, opset 11 unless asked otherwise.
  Neither jax2onnx nor jax2tf + tf2onnx can convert this network (see the README).
* `bioimageio`: a BioImage Model Zoo package (model spec 0.5) with the ONNX graph and
  the PyTorch state dict as weights, test tensors, a cover, documentation and citations.

Every file appears under its final name only once complete and checked.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import io
import logging
import os
import struct
import tempfile
import zipfile
import zlib
from importlib import metadata
from typing import Any, BinaryIO, Callable, Sequence

import jax
import numpy as np
import tifffile

from deepcad_jax import __version__
from deepcad_jax.model_io.checkpoint import Model
from deepcad_jax.model_io.convert import key_map, read_state_dict
from deepcad_jax.data.movie import as_movie, refuse_to_overwrite
from deepcad_jax.data.writers import AtomicFile, commit, os_error
from deepcad_jax.errors import UserError
from deepcad_jax.model_io.loading import load_model
from deepcad_jax.core.network import LEVELS, MIN_SIZE, UNet3D, init_params
from deepcad_jax.analysis.simulate import simulate
from deepcad_jax.denoising.tiling import ceil_to, reach_by_residue

log = logging.getLogger("deepcad_jax")

FORMATS = ("pth", "onnx", "bioimageio")
ONNX_OPSET = 11          # what DeepCAD-RT writes and its TensorRT GUI reads
INPUT_NAME, OUTPUT_NAME = "input", "output"  # DeepCAD-RT's torch.onnx.export names
# bioimage.io tools may cut tiles anywhere (not on the pooling grid), so the halo is the
# network's whole reach (51 voxels), rounded up to a multiple of 8: 56.
HALO = ceil_to(max(max(r) for r in reach_by_residue()))
_WHAT = {"pth": "DeepCAD-RT's Network_3D_Unet (a .pth)", "onnx": "the ONNX export",
         "bioimageio": "a bioimage.io package"}
_EXTRAS = "pip install 'deepcad-jax[export]'"


@dataclasses.dataclass(frozen=True)
class Network:
  """One exportable network: its float32 parameters (Flax layout) and provenance."""

  params: dict
  features: int
  uniform: bool   # widths f, 2f, 4f, 8f exactly as UNet3D(features) has them
  scale: float    # DeepCAD-RT's scale_factor
  model: Model
  member: int | None


@dataclasses.dataclass
class ExportReport:
  """What `export` wrote and what it measured."""

  format: str
  path: str
  files: list[str]               # every file written (the main one first)
  bytes: int                     # size of the main file
  features: int
  parity: dict[str, float] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)

  def describe(self) -> str:
    """The report's lines for the command line."""
    extra = "".join(f" and {p}" for p in self.files[1:])
    lines = [f"wrote {self.path} ({self.bytes / 1e6:.2f} MB, {self.format}, "
             f"f={self.features}){extra}"]
    lines += [f"  parity: {what}: {value:.1e}" for what, value in self.parity.items()]
    return "\n".join(lines + [f"  {note}" for note in self.notes])


# ------------------------------------------------------------------ the network


def _get(params: dict, module: str, conv: str, name: str) -> np.ndarray:
  node = params.get(module, {})
  node = node.get(conv, {}) if conv else node
  if name not in node:
    raise KeyError(name)
  return node[name]


def _check_structure(params: dict, source: str) -> None:
  """Every DeepCAD-RT layer is there, and each layer's input channels are what the layers
  before it produce (whatever the widths)."""
  try:
    for where in key_map().values():
      _get(params, *where)
  except KeyError:
    raise UserError(f"{source} does not hold a DeepCAD-RT 3D U-Net (a layer is "
                    "missing); export a model trained or converted by deepcad-jax.") from None
  out = {}  # (module, conv) -> output channels

  def check(module: str, conv: str, cin: int) -> None:
    kernel = np.shape(_get(params, module, conv, "kernel"))
    bias = np.shape(_get(params, module, conv, "bias"))
    if len(kernel) != 5 or kernel[3] != cin or bias != kernel[4:]:
      raise UserError(f"{source}: layer {module}/{conv} has kernel {kernel} and bias "
                      f"{bias}, which do not follow from the layer before it ({cin} "
                      "channels); the model is damaged.")
    out[(module, conv)] = kernel[4]

  cin = 1
  for level in range(LEVELS):
    check(f"encoder_{level}", "conv1", cin)
    check(f"encoder_{level}", "conv2", out[(f"encoder_{level}", "conv1")])
    cin = out[(f"encoder_{level}", "conv2")]
  for level in range(LEVELS - 2, -1, -1):
    check(f"decoder_{level}", "conv1", out[(f"encoder_{level}", "conv2")] + cin)
    check(f"decoder_{level}", "conv2", out[(f"decoder_{level}", "conv1")])
    cin = out[(f"decoder_{level}", "conv2")]
  check("final", "", cin)
  if out[("final", "")] != 1:
    raise UserError(f"{source} has {out[('final', '')]} output channels where "
                    "DeepCAD-RT's network has one; export a denoising model.")


def network(model: Model, fmt: str, member: int | None = None) -> Network:
  """The one network of `model` that format `fmt` can hold; refuses, in one sentence,
  what the format cannot express (a mean-image prior, a whole ensemble, and for a .pth
  widths other than f, 2f, 4f, 8f)."""

  what, source, cfg = _WHAT[fmt], model.source, model.config.model
  if cfg.mean_prior:
    raise UserError(f"{source} was trained with the mean-image prior (a second input "
                    f"channel), but {what} has DeepCAD-RT's single input channel; export "
                    "a model trained without --mean-prior.")
  params = model.params
  if cfg.ensemble > 1:
    if member is None:
      raise UserError(f"{source} is an ensemble of {cfg.ensemble} networks and {what} "
                      f"holds one; choose it with --member K (0 to {cfg.ensemble - 1}).")
    if not 0 <= member < cfg.ensemble:
      raise UserError(f"--member {member} is out of range; {source} has members 0 to "
                      f"{cfg.ensemble - 1}.")
    params = jax.tree_util.tree_map(lambda a: a[member], params)
  elif member is not None:
    raise UserError(f"--member chooses a network of an ensemble, but {source} is a "
                    "single network; leave --member out.")
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
  _check_structure(params, source)
  f = int(model.features)
  expected = jax.eval_shape(lambda: init_params(f, 0))
  uniform = (jax.tree_util.tree_structure(expected) == jax.tree_util.tree_structure(params)
             and all(a.shape == b.shape for a, b in zip(
                 jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(params))))
  if fmt == "pth" and not uniform:
    raise UserError(f"{source} has layer widths other than f, 2f, 4f, 8f for f={f} (a "
                    f"pruned network), which {what} cannot express; export it as onnx.")
  return Network(params=params, features=f, uniform=uniform,
                 scale=float(model.config.data.scale), model=model, member=member)


@functools.lru_cache(maxsize=8)
def _jitted_apply(features: int):

  return jax.jit(lambda p, a: UNet3D(features).apply({"params": p}, a[:, 0, ..., None]))


def forward(net: Network, x: np.ndarray) -> np.ndarray:
  """The JAX network on an (N, 1, T, Y, X) float32 array, as DeepCAD-RT lays it out."""
  if not net.uniform:
    raise UserError("the JAX network has uniform widths only; this model cannot be "
                    "run for a parity check.")
  out = _jitted_apply(net.features)(net.params, np.asarray(x, np.float32))
  return np.asarray(out)[:, None, ..., 0]


def relative_rms(got: np.ndarray, expected: np.ndarray) -> float:
  """sqrt(sum (got - expected)^2 / sum expected^2), in float64."""
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  return float(np.sqrt(np.sum((got - expected) ** 2) / max(np.sum(expected ** 2), 1e-300)))


# ------------------------------------------------------------------ writing files


def _written(path: str, write: Callable[[BinaryIO], None]) -> AtomicFile:
  """`write` into a temporary file beside `path` (`data.output.AtomicFile`), finished
  but not yet renamed: `publish()` (or `commit` with others) makes it appear."""
  f = AtomicFile(path, overwrite=True)
  try:
    write(f.open())
  except OSError as e:
    f.abort()
    raise os_error(e, path) from None
  except BaseException:
    f.abort()
    raise
  f.finish()
  return f


def _write_atomic(path: str, write: Callable[[BinaryIO], None]) -> None:
  """`write` into a temporary file beside `path`, then rename: never a half file at
  `path`, and never two runs writing it at once."""
  _written(path, write).publish()


def _write_bytes(path: str, data: bytes) -> None:
  _write_atomic(path, lambda f: f.write(data))


# ------------------------------------------------------------------ .pth


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
            "scale_factor": _yaml_float(cfg.data.scale)}
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


# ------------------------------------------------------------------ ONNX


def _need(module: str, what: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise UserError(f"{what} needs the {module} package: {_EXTRAS}.") from None


def check_opset(opset: int) -> None:
  onnx = _need("onnx", "ONNX export")
  top = onnx.defs.onnx_opset_version()
  if not 11 <= opset <= top:
    raise UserError(f"--opset {opset} is not supported; choose 11 (DeepCAD-RT's, the "
                    f"default) up to {top} (the newest this onnx package knows).")


def onnx_model(net: Network, opset: int = ONNX_OPSET,
               patch: Sequence[int] | None = None) -> Any:
  """The network as an `onnx.ModelProto`: input `input` (N, 1, T, Y, X) float32, output
  `output` of the same shape. `patch` (T, Y, X) fixes the input to (1, 1, T, Y, X), as
  DeepCAD-RT exports it for TensorRT; without it N, T, Y and X are dynamic."""
  onnx = _need("onnx", "ONNX export")
  from onnx import TensorProto, helper, numpy_helper
  check_opset(opset)
  names = {where: key for key, where in key_map().items()}
  nodes: list = []
  inits = [numpy_helper.from_array(v, k) for k, v in torch_state_dict(net.params).items()]

  def const(name: str, array: np.ndarray) -> str:
    inits.append(numpy_helper.from_array(array, name))
    return name

  def conv(x: str, module: str, conv_name: str, relu: bool = True) -> str:
    weight = names[(module, conv_name, "kernel")]
    prefix = weight.rsplit(".", 1)[0]
    k = int(np.shape(_get(net.params, module, conv_name, "kernel"))[0])
    out = prefix if relu else OUTPUT_NAME
    nodes.append(helper.make_node(
        "Conv", [x, weight, names[(module, conv_name, "bias")]], [out], name=prefix,
        kernel_shape=[k] * 3, pads=[k // 2] * 6, strides=[1, 1, 1]))
    if relu:
      nodes.append(helper.make_node("Relu", [out], [prefix + ".relu"], name=prefix + ".relu"))
      out = prefix + ".relu"
    return out

  if patch is not None:
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3 or min(patch) < MIN_SIZE:
      raise UserError(f"--patch must be three sizes T,Y,X of at least {MIN_SIZE}; got "
                      f"{patch}.")
    sizes = [patch]
    for _ in range(LEVELS - 1):
      sizes.append(tuple(s // 2 for s in sizes[-1]))
    io_shape: list = [1, 1, *patch]
  else:
    io_shape = ["batch", 1, "t", "y", "x"]
  if opset < 13:
    empty = const("resize.empty", np.zeros((0,), np.float32))
    roi = scales = empty
  else:
    roi = scales = ""
  if patch is None:
    starts = {a: const(f"resize.{a}", np.array([a], np.int64)) for a in (0, 2, 5)}

  x, skips = INPUT_NAME, []
  for level in range(LEVELS):
    module = f"encoder_{level}"
    if level > 0:
      pooled = f"Generator.encoders.{level}.pooling"
      nodes.append(helper.make_node("MaxPool", [x], [pooled], name=pooled,
                                    kernel_shape=[2, 2, 2], strides=[2, 2, 2]))
      x = pooled
    x = conv(conv(x, module, "conv1"), module, "conv2")
    skips.append(x)
  for i, level in enumerate(range(LEVELS - 2, -1, -1)):
    module, prefix = f"decoder_{level}", f"Generator.decoders.{i}"
    skip = skips[level]
    channels = int(np.shape(_get(net.params, f"{'encoder' if i == 0 else 'decoder'}_"
                                 f"{level + 1}", "conv2", "kernel"))[-1])
    if patch is not None:
      size = const(f"{prefix}.size", np.array([1, channels, *sizes[level]], np.int64))
    else:
      for what, source, a, b in (("nc", x, 0, 2), ("tyx", skip, 2, 5)):
        nodes.append(helper.make_node("Shape", [source], [f"{prefix}.shape_{what}"],
                                      name=f"{prefix}.shape_{what}"))
        nodes.append(helper.make_node("Slice", [f"{prefix}.shape_{what}", starts[a],
                                                starts[b]], [f"{prefix}.{what}"],
                                      name=f"{prefix}.{what}"))
      size = f"{prefix}.size"
      nodes.append(helper.make_node("Concat", [f"{prefix}.nc", f"{prefix}.tyx"], [size],
                                    name=size, axis=0))
    up = f"{prefix}.upsample"
    nodes.append(helper.make_node("Resize", [x, roi, scales, size], [up], name=up,
                                  mode="nearest", nearest_mode="floor",
                                  coordinate_transformation_mode="asymmetric"))
    nodes.append(helper.make_node("Concat", [skip, up], [f"{prefix}.cat"],
                                  name=f"{prefix}.cat", axis=1))
    x = conv(conv(f"{prefix}.cat", module, "conv1"), module, "conv2")
  conv(x, "final", "", relu=False)

  value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, io_shape)
  graph = helper.make_graph(nodes, "deepcad_rt_unet3d", [value(INPUT_NAME)],
                            [value(OUTPUT_NAME)], inits)
  opsets = [helper.make_opsetid("", opset)]
  model = helper.make_model(graph, opset_imports=opsets, producer_name="deepcad-jax",
                            ir_version=helper.find_min_ir_version_for(opsets))
  model.producer_version = __version__
  model.doc_string = (
      f"DeepCAD-RT 3D U-Net (f={net.features}) exported by deepcad-jax. Input 'input' "
      "(N, 1, T, Y, X) float32: the movie minus its mean intensity, divided by "
      f"scale_factor={net.scale:g}; output 'output' likewise: multiply by scale_factor "
      "and add the mean back.")
  helper.set_model_props(model, {
      "features": str(net.features), "scale_factor": repr(net.scale),
      "source": net.model.source, "layout": "NCDHW (N, 1, T, Y, X)"})
  onnx.checker.check_model(model, full_check=True)
  return model


def run_onnx(model: Any, x: np.ndarray) -> np.ndarray:
  """Run an ONNX model (a ModelProto or its bytes) on `x` with ONNX Runtime's CPU
  provider."""
  ort = _need("onnxruntime", "Checking the ONNX export")
  data = model if isinstance(model, bytes) else model.SerializeToString()
  options = ort.SessionOptions()
  options.log_severity_level = 3
  session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
  return session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(x, np.float32)})[0]


def onnx_parity(net: Network, model: Any, shape: Sequence[int], seed: int = 0) -> float:
  """Relative RMS between ONNX Runtime and the JAX network on standard-normal input of
  `shape` (N, 1, T, Y, X)."""
  x = np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)
  return relative_rms(run_onnx(model, x), forward(net, x))


def _verify_shape(patch: Sequence[int] | None) -> tuple[int, ...]:
  """The input a parity check uses: the fixed patch, or batch 2 of an odd-sized block
  (so pooling floors and nearest resizes to odd sizes are exercised)."""
  return (1, 1, *patch) if patch is not None else (2, 1, 12, 20, 18)


def export_onnx(net: Network, output: str, opset: int = ONNX_OPSET,
                patch: Sequence[int] | None = None, overwrite: bool = False,
                verify: bool = True) -> ExportReport:
  """The ONNX graph at `output`, checked by onnx.checker and (when `verify` and the
  widths are the JAX network's) by ONNX Runtime against JAX before it is written.

  Args:
    net: the network (from `network(model, "onnx")`).
    output: the .onnx file to write.
    opset: the ONNX opset (ONNX_OPSET, 11, is what DeepCAD-RT writes).
    patch: (T, Y, X) fixes the input to (1, 1, T, Y, X), as DeepCAD-RT exports it for
      TensorRT (default: N, T, Y and X dynamic).
    overwrite: replace an existing `output`.
    verify: compare ONNX Runtime with JAX (relative RMS at most 1e-5, else nothing is
      written); without ONNX Runtime the parity is noted as not measured.
  """
  refuse_to_overwrite([output], overwrite)
  model = onnx_model(net, opset, patch)
  data = model.SerializeToString()
  report = ExportReport("onnx", os.path.abspath(output), [os.path.abspath(output)],
                        len(data), net.features)
  if verify and net.uniform:
    shape = _verify_shape(patch)
    log.info("checking the ONNX graph against JAX with ONNX Runtime on a %s input...",
             "x".join(map(str, shape)))
    try:
      rms = onnx_parity(net, data, shape)
    except UserError as e:
      report.notes.append(f"parity not measured: {e}")
    else:
      if not rms <= 1e-5:
        raise UserError(f"ONNX Runtime and JAX disagree on this model (relative RMS "
                        f"{rms:.2e} > 1e-5); nothing was written.")
      report.parity[f"onnxruntime vs JAX, relative RMS on {shape}"] = rms
  _write_bytes(output, data)
  dims = f"(1, 1, {', '.join(map(str, patch))})" if patch else "(N, 1, T, Y, X) dynamic"
  report.notes.append(f"opset {opset}; input '{INPUT_NAME}' {dims}, output "
                      f"'{OUTPUT_NAME}' the same shape")
  return report


# ------------------------------------------------------------------ bioimage.io

BIOIMAGEIO_MIN = ceil_to(2 * HALO + 1)  # smallest input per axis: a multiple of 8 above
                                        # 2 x HALO (120)
_CITATIONS = (
    ("Li, X., Li, Y., Zhou, Y. et al. Real-time denoising enables high-sensitivity "
     "fluorescence time-lapse imaging beyond the shot-noise limit. Nat. Biotechnol. "
     "(2022).", "10.1038/s41587-022-01450-8"),
    ("Li, X., Zhang, G., Wu, J. et al. Reinforcing neuron extraction and spike inference "
     "in calcium imaging using deep self-supervised denoising. Nat. Methods 18, "
     "1395-1400 (2021).", "10.1038/s41592-021-01225-0"),
)


def _png(image: np.ndarray) -> bytes:
  """An 8-bit grayscale PNG of a 2-D uint8 array."""
  h, w = image.shape
  rows = b"".join(b"\x00" + np.ascontiguousarray(image[y], np.uint8).tobytes()
                  for y in range(h))

  def chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data +
            struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def cover_image(raw: np.ndarray, denoised: np.ndarray, zoom: int = 2) -> bytes:
  """PNG of one raw frame beside the same frame denoised (2:1), with the denoised
  frame's 0.5-99.5 percentile contrast on both."""
  lo, hi = np.percentile(denoised, [0.5, 99.5])
  both = np.concatenate([raw, denoised], axis=1).astype(np.float64)
  scaled = np.clip((both - lo) / max(hi - lo, 1e-12), 0, 1) * 255
  image = np.round(scaled).astype(np.uint8)
  return _png(np.repeat(np.repeat(image, zoom, 0), zoom, 1))


def _sample_movie(sample: str, size: int):
  movie = as_movie(sample)
  if min(movie.shape) < size:
    raise UserError(f"{sample} is {movie.shape}; a bioimage.io test input needs at least "
                    f"{size} frames of {size}x{size} pixels, so give a larger --sample.")
  return movie


def _test_movie(movie, mean: float, size: int) -> tuple[np.ndarray, str]:
  """A (size, size, size) block: the centre of `movie` (a sample Movie), or without one
  a simulated calcium movie brought to the normalisation mean; with a sentence saying
  which."""
  if movie is not None:
    t0, y0, x0 = ((n - size) // 2 for n in movie.shape)
    block = movie.read(t0, t0 + size)[:, y0:y0 + size, x0:x0 + size]
    return block.astype(np.float32), f"the centre of {os.path.basename(movie.name)}"
  noisy, _, _ = simulate(shape=(size, size, size), seed=0)
  if mean > 0:  # at the model's intensity; whole counts where that is bright enough
    noisy = noisy * np.float32(mean / max(float(noisy.mean()), 1e-12))
    noisy = np.round(noisy) if mean >= 10 else noisy  # (whole counts compress better)
  else:
    noisy = noisy - np.float32(noisy.mean() - mean)
  return noisy.astype(np.float32), "a simulated calcium-imaging movie (deepcad-jax simulate)"


def _package_readme(net: Network, mean: float, what_input: str, parity: float | None,
                    weights: Sequence[str]) -> str:
  f, s = net.features, net.scale
  member = f" (member {net.member} of an ensemble)" if net.member is not None else ""
  measured = (f"ONNX Runtime reproduced that output with a relative RMS difference of "
              f"{parity:.1e}." if parity is not None else "")
  return f"""# DeepCAD-RT denoiser (f={f}), exported by deepcad-jax

A DeepCAD-RT 3D U-Net{member} for self-supervised denoising of fluorescence
time-lapse movies (two-photon calcium imaging and similar). It was trained (or
converted from a DeepCAD-RT .pth) with deepcad-jax and exported with
`deepcad-jax export --format bioimageio`. Source model: `{net.model.source}`.

## Network

Four levels of width {f}, {2 * f}, {4 * f}, {8 * f}; two 3x3x3 convolutions with bias
and ReLU per level; 2x2x2 max pooling; nearest upsampling to the skip's size; a final
1x1x1 convolution to one channel. Weights: {', '.join(weights)}.

## Input and output

One tensor `raw` with axes (batch, channel, time, y, x), one channel: a stretch of the
movie. Each of time, y and x must be at least {BIOIMAGEIO_MIN} and a multiple of 8 beyond
that. The network sees about +-51 voxels around each output voxel, so tiles overlap by a
halo of {HALO} on every axis. The output `denoised` has the input's shape.

Preprocessing subtracts {mean:g} (the mean intensity of the training data) and divides
by {s:g} (DeepCAD-RT's `scale_factor`); postprocessing undoes both. DeepCAD-RT and
`deepcad-jax denoise` subtract each movie's own mean instead, so recordings whose mean
differs much from {mean:g} are best denoised there.

## Validation

The package's test input is {what_input}; the test output is what the JAX network
(deepcad-jax) computes from it.
{measured}

The model was trained self-supervised on noisy recordings, without ground truth: check
its results on a movie of the kind it was trained on, for example against a simulated
movie with known ground truth (`deepcad-jax simulate` and `deepcad-jax evaluate`),
before relying on it.

## Citation

Please cite DeepCAD-RT (Li et al., Nature Biotechnology 2022,
doi:10.1038/s41587-022-01450-8) and DeepCAD (Li et al., Nature Methods 2021,
doi:10.1038/s41592-021-01225-0).
"""


def _bioimageio_error(e: Exception) -> UserError:
  text = " ".join(str(e).split())
  return UserError(f"the bioimage.io description is not valid ({text[:300]}); check "
                   "--name, --author and --license.")


def export_bioimageio(net: Network, output: str, *, mean: float | None = None,
                      sample: str | None = None, name: str | None = None,
                      authors: Sequence[str] = (), license: str = "CC-BY-4.0",
                      opset: int = ONNX_OPSET, overwrite: bool = False) -> ExportReport:
  """A BioImage Model Zoo package (zip, model spec 0.5) at `output`.

  Args:
    net: the network (from `network(model, "bioimageio")`).
    output: the .zip to write.
    mean: the intensity subtracted before the network (default: the training data's
      mean, which a converted .pth does not record: then the mean of `sample`).
    sample: a TIFF movie whose centre becomes the test input and the cover (default: a
      simulated movie).
    name, authors, license: the package's metadata (SPDX license id).
    opset: ONNX opset of the ONNX weights.
    overwrite: replace an existing `output`.
  """
  refuse_to_overwrite([output], overwrite)
  if mean is None:
    mean = net.model.mean
  movie = None if sample is None else _sample_movie(sample, BIOIMAGEIO_MIN)
  if mean is None and movie is not None:
    mean = movie.mean()
  if mean is None:
    raise UserError(f"{net.model.source} does not record the mean intensity of its "
                    "training data (a converted DeepCAD-RT .pth); give it with --mean, "
                    "or give --sample with a typical recording.")
  spec = _need("bioimageio.spec", "bioimage.io export")
  log.info("building the bioimage.io package: a %d^3 test input through the network and "
           "ONNX Runtime, the weights, then the format's validation...", BIOIMAGEIO_MIN)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  from bioimageio.spec.model import v0_5 as bm
  from bioimageio.spec.model.v0_5 import AxisId, TensorId
  model_onnx = onnx_model(net, opset)
  mean, s, size = float(mean), net.scale, BIOIMAGEIO_MIN
  raw, what_input = _test_movie(movie, mean, size)
  x = raw[None, None]
  gain, offset = np.float32(1 / s), np.float32(-mean / s)
  normalised = x * gain + offset
  y = forward(net, normalised) if net.uniform else run_onnx(model_onnx, normalised)
  out = (y * np.float32(s) + np.float32(mean)).astype(np.float32)
  parity = None
  try:
    parity = relative_rms(run_onnx(model_onnx, normalised), y) if net.uniform else None
  except UserError:
    pass
  if parity is not None and not parity <= 1e-5:
    raise UserError(f"ONNX Runtime and JAX disagree on this model (relative RMS "
                    f"{parity:.2e} > 1e-5); nothing was written.")

  with tempfile.TemporaryDirectory(prefix=".bioimageio-", dir=os.path.dirname(
      os.path.abspath(output))) as tmp:
    def path(name: str, data: bytes) -> str:
      full = os.path.join(tmp, name)
      with open(full, "wb") as fh:
        fh.write(data)
      return full

    def npy(name: str, array: np.ndarray) -> str:
      buffer = io.BytesIO()
      np.save(buffer, array)
      return path(name, buffer.getvalue())

    def tiff(name: str, frames: np.ndarray) -> str:
      full = os.path.join(tmp, name)
      tifffile.imwrite(full, frames, photometric="minisblack", compression="zlib",
                       metadata={"axes": "TYX"})
      return full

    weights_names = ["ONNX (opset %d)" % opset]
    onnx_file = path("deepcad_rt.onnx", model_onnx.SerializeToString())
    # The state dict is the original; the ONNX graph is built from the same tensors.
    parent = "pytorch_state_dict" if net.uniform else None
    weights = {"onnx": bm.OnnxWeightsDescr(source=onnx_file, opset_version=opset,
                                           parent=parent)}
    if net.uniform:
      pth = os.path.join(tmp, "deepcad_rt.pth")
      write_torch_state_dict(torch_state_dict(net.params), pth)
      arch_src = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              "torch_reference.py")
      with open(arch_src, "rb") as fh:
        arch = path("deepcad_rt_network.py", fh.read())
      weights["pytorch_state_dict"] = bm.PytorchStateDictWeightsDescr(
          source=pth, pytorch_version=bm.Version(_torch_version()),
          architecture=bm.ArchitectureFromFileDescr(
              source=arch, callable=bm.Identifier("Network_3D_Unet"),
              kwargs={"f_maps": net.features}))
      weights_names.append("PyTorch state dict (DeepCAD-RT's keys)")
    t = size // 2
    cover = path("cover.png", cover_image(raw[t], out[0, 0, t]))
    samples = slice(t - 4, t + 4)  # a few frames for people to look at
    sample_in = tiff("sample_input.tif", raw[samples])
    sample_out = tiff("sample_output.tif", out[0, 0, samples])
    readme = path("README.md", _package_readme(net, mean, what_input, parity,
                                               weights_names).encode())
    size_param = bm.ParameterizedSize(min=size, step=8)
    ref = lambda axis: bm.SizeReference(tensor_id=TensorId("raw"), axis_id=AxisId(axis))
    preprocessing = [bm.EnsureDtypeDescr(kwargs=bm.EnsureDtypeKwargs(dtype="float32"))]
    postprocessing = []
    if gain != 1 or offset != 0:
      preprocessing.append(bm.ScaleLinearDescr(kwargs=bm.ScaleLinearKwargs(
          gain=float(gain), offset=float(offset))))
      postprocessing.append(bm.ScaleLinearDescr(kwargs=bm.ScaleLinearKwargs(
          gain=float(s), offset=mean)))
    postprocessing.append(bm.EnsureDtypeDescr(kwargs=bm.EnsureDtypeKwargs(dtype="float32")))
    f = net.features
    try:
      descr = bm.ModelDescr(
          name=name or f"DeepCAD-RT denoiser f{f} (deepcad-jax)",
          description=(f"DeepCAD-RT 3D U-Net (width {f}) for self-supervised denoising "
                       "of fluorescence time-lapse movies such as two-photon calcium "
                       "imaging; exported by deepcad-jax."),
          authors=[bm.Author(name=a) for a in (authors or ["unknown"])],
          cite=[bm.CiteEntry(text=text, doi=bm.Doi(doi)) for text, doi in _CITATIONS],
          license=license, documentation=bm.FileDescr(source=readme),
          covers=[bm.FileDescr(source=cover)],
          tags=["denoising", "self-supervised", "3d", "unet", "deepcad-rt",
                "calcium-imaging", "two-photon", "fluorescence-light-microscopy",
                "onnx", "pytorch"],
          inputs=[bm.InputTensorDescr(
              id=TensorId("raw"), description="noisy movie stretch (T, Y, X)",
              axes=[bm.BatchAxis(), bm.ChannelAxis(channel_names=[bm.Identifier("raw")]),
                    bm.TimeInputAxis(size=size_param),
                    bm.SpaceInputAxis(id=AxisId("y"), size=size_param),
                    bm.SpaceInputAxis(id=AxisId("x"), size=size_param)],
              test_tensor=bm.FileDescr(source=npy("test_input.npy", x)),
              sample_tensor=bm.FileDescr(source=sample_in),
              data=bm.IntervalOrRatioDataDescr(type="float32"),
              preprocessing=preprocessing)],
          outputs=[bm.OutputTensorDescr(
              id=TensorId("denoised"), description="denoised movie stretch",
              axes=[bm.BatchAxis(),
                    bm.ChannelAxis(channel_names=[bm.Identifier("denoised")]),
                    bm.TimeOutputAxisWithHalo(size=ref("time"), halo=HALO),
                    bm.SpaceOutputAxisWithHalo(id=AxisId("y"), size=ref("y"), halo=HALO),
                    bm.SpaceOutputAxisWithHalo(id=AxisId("x"), size=ref("x"), halo=HALO)],
              test_tensor=bm.FileDescr(source=npy("test_output.npy", out)),
              sample_tensor=bm.FileDescr(source=sample_out),
              data=bm.IntervalOrRatioDataDescr(type="float32"),
              postprocessing=postprocessing)],
          weights=bm.WeightsDescr(**weights),
          config={"deepcad_jax": {
              "features": f, "scale_factor": s, "mean": mean, "source": net.model.source,
              "member": net.member, "test_input": what_input}})
    except Exception as e:  # pydantic's ValidationError: the metadata given is invalid
      if isinstance(e, UserError):
        raise
      raise _bioimageio_error(e) from None
    package = AtomicFile(output, overwrite=True)
    try:
      package.open()  # the package is saved over this run's own temporary file
      spec.save_bioimageio_package(descr, output_path=package.temp)
      package.commit()
    except BaseException as e:
      package.abort()
      if isinstance(e, OSError):
        raise os_error(e, output) from None
      if isinstance(e, ValueError) and not isinstance(e, UserError):
        raise _bioimageio_error(e) from None
      raise
  report = ExportReport("bioimageio", os.path.abspath(output), [os.path.abspath(output)],
                        os.path.getsize(output), f)
  if parity is not None:
    report.parity[f"onnxruntime vs JAX, relative RMS on the test input {x.shape}"] = parity
  report.notes += [f"weights: {', '.join(weights_names)}",
                   f"normalisation: (x - {mean:g}) / {s:g}; test input: {what_input}",
                   f"check it with: bioimageio test {output}"]
  return report


def _torch_version() -> str:
  """The installed PyTorch's version (for the package's metadata), else 1.6 (the
  oldest that reads the zip format the state dict is written in)."""
  try:
    return metadata.version("torch").split("+")[0]
  except metadata.PackageNotFoundError:
    return "1.6"


# ------------------------------------------------------------------ one entry point


def export(model: Model | str, output: str, format: str, *, member: int | None = None,
           opset: int = ONNX_OPSET, patch: Sequence[int] | None = None,
           verify: bool = True, mean: float | None = None, sample: str | None = None,
           name: str | None = None, authors: Sequence[str] = (),
           license: str = "CC-BY-4.0", overwrite: bool = False) -> ExportReport:
  """Write `model` (a Model, or a path `load_model` accepts) as `format` at `output`.

  Args:
    model: a trained, converted or imported model.
    output: the file to write (a .zip for bioimageio; a .pth gets para.yaml beside it).
    format: "pth", "onnx" or "bioimageio".
    member: which network of an ensemble to export (an ensemble needs one).
    opset: ONNX opset (onnx, bioimageio); 11 is DeepCAD-RT's.
    patch: (T, Y, X) to fix the ONNX input to (1, 1, T, Y, X); default dynamic.
    verify: check the ONNX graph against JAX with ONNX Runtime before writing it.
    mean, sample, name, authors, license: for bioimageio, see `export_bioimageio`.
    overwrite: replace existing files.
  """
  if format not in FORMATS:
    raise UserError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
  if format == "bioimageio" and not output.lower().endswith(".zip"):
    raise UserError(f"{output}: a bioimage.io package is a zip file; give an --output "
                    "ending in .zip.")
  if format != "pth":
    check_opset(opset)
  if isinstance(model, (str, os.PathLike)):
    model = load_model(os.fspath(model))
  net = network(model, format, member)
  try:
    if format == "pth":
      return export_pth(net, output, overwrite)
    if format == "onnx":
      return export_onnx(net, output, opset, patch, overwrite, verify)
    return export_bioimageio(net, output, mean=mean, sample=sample, name=name,
                             authors=authors, license=license, opset=opset,
                             overwrite=overwrite)
  except OSError as e:  # e.g. the package's working folder beside a read-only output
    raise os_error(e, output) from None
