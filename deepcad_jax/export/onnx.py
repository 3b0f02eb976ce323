"""The ONNX format: the network as an ONNX graph built with the `onnx` package's helpers
(Conv, Relu, MaxPool, nearest Resize, Concat), NCDHW like DeepCAD-RT's own export: input
`input` (N, 1, T, Y, X), output `output`, opset 11 unless asked otherwise, checked
against JAX with ONNX Runtime. Neither jax2onnx nor jax2tf + tf2onnx can convert this
network (see docs/export.md).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np

from deepcad_jax import __version__
from deepcad_jax.model_io.convert import key_map
from deepcad_jax.data.movie import refuse_to_overwrite
from deepcad_jax.errors import UserError
from deepcad_jax.core.network import LEVELS, MIN_SIZE
from deepcad_jax.runtime.files import write_bytes
from deepcad_jax.export.network import (ExportReport, Network, _get, _need,
                                                 forward, relative_rms)
from deepcad_jax.export.pth import torch_state_dict

log = logging.getLogger("deepcad_jax")


ONNX_OPSET = 11          # what DeepCAD-RT writes and its TensorRT GUI reads


INPUT_NAME, OUTPUT_NAME = "input", "output"  # DeepCAD-RT's torch.onnx.export names


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
  write_bytes(output, data)
  dims = f"(1, 1, {', '.join(map(str, patch))})" if patch else "(N, 1, T, Y, X) dynamic"
  report.notes.append(f"opset {opset}; input '{INPUT_NAME}' {dims}, output "
                      f"'{OUTPUT_NAME}' the same shape")
  return report
