"""Models in and out: `deepcad-jax convert` (a DeepCAD-RT .pth) and `deepcad-jax export`
(.pth, ONNX, bioimage.io).
"""

from __future__ import annotations


from absl import flags

from deepcad_jax.errors import UserError
import os

from deepcad_jax.cli.flags import (Command, _define_model, _define_output, _given,
                                   _refuse_output_is_input, _require, _triple, _v)


def _define_convert(fv):
  flags.DEFINE_string("pth", None, "DeepCAD-RT checkpoint (.pth).", flag_values=fv)
  flags.DEFINE_string("para", None, "Its para.yaml (default: the one beside the .pth).",
                      flag_values=fv)
  _define_output(fv, "Model directory to write.",
                 "Replace a model already there.")


def _run_convert(fv):
  from deepcad_jax.model_io.loading import load_model
  from deepcad_jax.model_io.convert import convert, describe
  _require(fv, "pth", "output")
  _refuse_output_is_input([_given(fv, "output", "model")],
                          [_given(fv, "pth", "file"), _given(fv, "para", "file")])
  out = convert(_v(fv, "pth"), _v(fv, "output"), _v(fv, "para"), _v(fv, "overwrite"))
  print(describe(load_model(out), out))
  return 0


def _define_export(fv):
  _define_model(fv, step=True, para=True)
  flags.DEFINE_enum("format", None, ["pth", "onnx", "bioimageio"], "pth: DeepCAD-RT's "
                    "state_dict (+ para.yaml beside it); onnx: the network as an ONNX "
                    "graph; bioimageio: a BioImage Model Zoo package (.zip).",
                    flag_values=fv)
  _define_output(fv, "File to write.",
                 "Replace existing files.")
  flags.DEFINE_integer("member", None, "The ensemble member to export (an ensemble "
                       "needs one: the formats hold a single network).", flag_values=fv)
  flags.DEFINE_integer("opset", 11, "ONNX opset (onnx, bioimageio); 11 is what "
                       "DeepCAD-RT writes and its TensorRT GUI reads.", flag_values=fv)
  flags.DEFINE_string("patch", None, "onnx: fix the input to (1, 1, T, Y, X), as "
                      "DeepCAD-RT exports for its GUI (default: dynamic N, T, Y, X).",
                      flag_values=fv)
  flags.DEFINE_boolean("verify", True, "onnx: compare ONNX Runtime with JAX before "
                       "writing (--noverify skips it).", flag_values=fv)
  flags.DEFINE_float("mean", None, "bioimageio: intensity subtracted before the network "
                     "(default: the training data's mean).", flag_values=fv)
  flags.DEFINE_string("sample", None, "bioimageio: a TIFF movie (at least 120^3) whose "
                      "centre becomes the test input and cover (default: simulated).",
                      flag_values=fv)
  flags.DEFINE_string("name", None, "bioimageio: the model's name.", flag_values=fv)
  flags.DEFINE_string("author", None, "bioimageio: author name(s), separated by ';'.",
                      flag_values=fv)
  flags.DEFINE_string("license", "CC-BY-4.0", "bioimageio: SPDX license id of the "
                      "weights.", flag_values=fv)


_EXPORT_ONLY = {"patch": ("onnx",), "verify": ("onnx",), "opset": ("onnx", "bioimageio"),
                "mean": ("bioimageio",), "sample": ("bioimageio",),
                "name": ("bioimageio",), "author": ("bioimageio",),
                "license": ("bioimageio",)}


def _run_export(fv):
  from deepcad_jax.model_io.loading import load_model
  from deepcad_jax.export import export
  _require(fv, "model", "format", "output")
  fmt = _v(fv, "format")
  model_path, output = _v(fv, "model"), _v(fv, "output")
  beside = (lambda path: os.path.join(os.path.dirname(os.path.abspath(path)), "para.yaml"))
  _refuse_output_is_input(
      [_given(fv, "output", "file"),
       _given(fv, "output", "file", beside(output)) if fmt == "pth" else None],
      [_given(fv, "model", "model"), _given(fv, "para", "file"), _given(fv, "sample"),
       None if os.path.isdir(model_path) else _given(fv, "model", "file",
                                                     beside(model_path))])
  for name, formats in _EXPORT_ONLY.items():
    if fv[name].present and fmt not in formats:
      raise UserError(f"--{name} applies to --format {' or '.join(formats)}, not {fmt}; "
                      "leave it out.")
  model = load_model(_v(fv, "model"), _v(fv, "step"), para=_v(fv, "para"))
  authors = [a.strip() for a in (_v(fv, "author") or "").split(";") if a.strip()]
  report = export(model, _v(fv, "output"), fmt, member=_v(fv, "member"),
                  opset=_v(fv, "opset"), patch=_triple(_v(fv, "patch")),
                  verify=_v(fv, "verify"), mean=_v(fv, "mean"), sample=_v(fv, "sample"),
                  name=_v(fv, "name"), authors=authors, license=_v(fv, "license"),
                  overwrite=_v(fv, "overwrite"))
  print(report.describe())
  return 0


COMMANDS = [
    Command("convert", "import a DeepCAD-RT PyTorch model (.pth) as a model directory",
            _define_convert, _run_convert,
            "deepcad-jax convert --pth E_10_Iter_6000.pth --output models/rt"),
    Command("export", "write a model for DeepCAD-RT (.pth), ONNX Runtime/TensorRT (.onnx) "
            "or the BioImage Model Zoo (.zip)", _define_export, _run_export,
            "deepcad-jax export --model runs/rt --format onnx --output rt.onnx"),
]
