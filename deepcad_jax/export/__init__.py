"""Export a trained model for other tools: DeepCAD-RT's .pth, ONNX, a bioimage.io package.

* `pth`: a PyTorch state_dict with DeepCAD-RT's keys and shapes (and its para.yaml),
  written without torch: a `torch.save` file is a zip of a small pickle (which names
  `torch._utils._rebuild_tensor_v2` and the storage type) and one raw little-endian
  record per tensor, the layout `deepcad_jax.model_io.convert` reads.
* `onnx`: the network as an ONNX graph built with the `onnx` package's helpers
  (Conv, Relu, MaxPool, nearest Resize, Concat), NCDHW like DeepCAD-RT's own export:
  input `input` (N, 1, T, Y, X), output `output`, opset 11 unless asked otherwise.
  Neither jax2onnx nor jax2tf + tf2onnx can convert this network (see docs/deepcad-rt.md).
* `bioimageio`: a BioImage Model Zoo package (model spec 0.5) with the ONNX graph and
  the PyTorch state dict as weights, test tensors, a cover, documentation and citations.

Every file appears under its final name only once complete and checked. This module is
the one entry point, `export`; `network` holds what the formats share, `pth`, `onnx`
and `bioimageio` one format each, and `torch_reference` is the PyTorch twin of the
network (for parity tests and benchmarks).
"""

from __future__ import annotations

import os
from typing import Sequence

from deepcad_jax.errors import UserError, check_number
from deepcad_jax.model_io.checkpoint import Model
from deepcad_jax.export.bioimageio import export_bioimageio
from deepcad_jax.export.network import ExportReport, network
from deepcad_jax.export.onnx import ONNX_OPSET, check_opset, export_onnx
from deepcad_jax.export.pth import export_pth
from deepcad_jax.model_io.loading import load_model
from deepcad_jax.runtime.files import os_error

__all__ = ["FORMATS", "ExportReport", "export"]

FORMATS = ("pth", "onnx", "bioimageio")




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
  check_number("--mean", mean, fix="the intensity subtracted before the network")
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
