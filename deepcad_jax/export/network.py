"""What every export format starts from: the network of a trained model as DeepCAD-RT's
layers (`Network`, `network`), its JAX forward pass to check an export against, and the
atomic files an export is written as.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import BinaryIO, Callable

import jax
import numpy as np

from deepcad_jax.model_io.checkpoint import Model
from deepcad_jax.model_io.convert import key_map
from deepcad_jax.runtime.files import AtomicFile, os_error
from deepcad_jax.errors import UserError
from deepcad_jax.core.network import LEVELS, UNet3D, init_params


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
                 scale=float(model.scale), model=model, member=member)


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


def _written(path: str, write: Callable[[BinaryIO], None]) -> AtomicFile:
  """`write` into a temporary file beside `path` (`runtime.files.AtomicFile`), finished
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


def _need(module: str, what: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise UserError(f"{what} needs the {module} package: {_EXTRAS}.") from None
