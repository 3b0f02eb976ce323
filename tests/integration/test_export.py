"""`deepcad-jax export`: DeepCAD-RT .pth, ONNX and bioimage.io packages, with parity."""

import dataclasses
import functools
import importlib.util
import os
import sys
import zipfile

import jax
import numpy as np
import pytest

from tests.helpers import noisy_movie, write_tiff
from deepcad_jax import UserError, cli, config as config_lib, load_model
from deepcad_jax.model_io.checkpoint import Model
from deepcad_jax.model_io.convert import pth_config, read_para, read_state_dict, to_flax_params
from deepcad_jax.export import export
from deepcad_jax.export.onnx import onnx_model, run_onnx
from deepcad_jax.export.network import forward, network, relative_rms
from deepcad_jax.export.pth import torch_state_dict, write_torch_state_dict
from deepcad_jax.core.network import init_params

SHAPE = (2, 1, 12, 20, 18)  # odd sizes after pooling; what the export's own check runs
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
_skip_without_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs PyTorch (pip "
                                         "install torch==2.13.0)")


def needs_torch(test):
  """Marked `torch`, and skipped without it."""
  return pytest.mark.torch(_skip_without_torch(test))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="needs onnx and onnxruntime (pip "
                                "install 'deepcad-jax[export]')")


@functools.lru_cache(maxsize=None)
def _params(features, seed=0, in_channels=1):
  """UNet3D parameters drawn as PyTorch initialises them, with numpy (no compilation)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: init_params(features, 0, in_channels))

  def draw(path, leaf):
    kernel = shapes_by_module[jax.tree_util.keystr(path[:-1])]
    bound = 1 / np.sqrt(np.prod(kernel.shape[:-1]))
    return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)

  shapes_by_module = {jax.tree_util.keystr(p[:-1]): leaf for p, leaf in
                      jax.tree_util.tree_leaves_with_path(shapes) if p[-1].key == "kernel"}
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _stack(members):
  return jax.tree_util.tree_map(lambda *a: np.stack(a), *members)


def _model(features, seed=0, **config):
  """A Model of random (PyTorch-initialised) weights, as a converted .pth gives."""
  params = _params(features, seed)
  cfg = pth_config(features, {})
  if config:
    cfg = config_lib.override(cfg, **config)
  return Model.create(params, cfg, source=f"random-f{features}")


def _one_sentence(message):
  assert "\n" not in message and message.endswith(".") and "Traceback" not in message


# ------------------------------------------------------------------ .pth


def test_pth_round_trip_is_bit_exact_and_deterministic(tmp_path):
  src = tmp_path / "rt" / "E_01_Iter_0100.pth"
  src.parent.mkdir()
  state = torch_state_dict(_model(4).params)
  write_torch_state_dict(state, str(src))
  (src.parent / "para.yaml").write_text(
      "b1: 0.5\nb2: 0.999\nfmap: 4\nlr: 1.0e-05\noverlap_factor: 0.25\npatch_t: 40\n"
      "patch_x: 200\npatch_y: 200\nscale_factor: 2.0\n")
  back = read_state_dict(str(src))
  assert list(back) == list(state)

  out = tmp_path / "out" / "model.pth"
  report = export(str(src), str(out), "pth")
  assert report.files == [str(out), str(out.parent / "para.yaml")]
  again = read_state_dict(str(out))
  assert list(again) == list(state)
  for key, value in state.items():
    assert again[key].dtype == np.float32 and again[key].shape == value.shape
    np.testing.assert_array_equal(again[key], value)
  assert read_para(str(out.parent / "para.yaml")) == read_para(str(src.parent / "para.yaml"))
  assert out.read_bytes() == src.read_bytes()  # the writer is deterministic
  assert not list(out.parent.glob("*.partial"))


@needs_torch
def test_pth_loads_in_pytorch_strictly_and_matches_jax(tmp_path, trained_model):
  import torch

  from deepcad_jax.export.torch_reference import Network_3D_Unet
  out = tmp_path / "model.pth"
  assert cli.main(["deepcad-jax", "export", "--model", trained_model, "--format", "pth",
                   "--output", str(out)]) == 0
  state = torch.load(str(out), weights_only=True)
  reference = Network_3D_Unet(4).state_dict()
  assert list(state) == list(reference)
  assert all(state[k].shape == v.shape and state[k].dtype == torch.float32
             for k, v in reference.items())
  net = Network_3D_Unet(4).eval()
  net.load_state_dict(state, strict=True)
  x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
  with torch.no_grad():
    got = net(torch.from_numpy(x)).numpy()
  expected = forward(network(load_model(trained_model), "pth"), x)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@needs_torch
def test_torch_saved_pth_round_trips_bit_exact(tmp_path):
  import torch

  from deepcad_jax.export.torch_reference import Network_3D_Unet
  torch.manual_seed(0)
  original = Network_3D_Unet(16).state_dict()
  torch.save(original, tmp_path / "in.pth")
  export(str(tmp_path / "in.pth"), str(tmp_path / "out" / "out.pth"), "pth")
  back = torch.load(tmp_path / "out" / "out.pth", weights_only=True)
  assert list(back) == list(original)
  assert all(torch.equal(back[k], v) for k, v in original.items())


# ------------------------------------------------------------------ ONNX


@needs_onnx
@pytest.mark.parametrize("features", [4, 16])
def test_onnx_matches_jax(tmp_path, features):
  import onnx
  net = network(_model(features, seed=features), "onnx")
  path = tmp_path / "model.onnx"
  report = export(net.model, str(path), "onnx")
  model = onnx.load(str(path))
  onnx.checker.check_model(model, full_check=True)
  assert [o.version for o in model.opset_import] == [11] and model.ir_version == 6
  (inp,), (out,) = model.graph.input, model.graph.output
  assert (inp.name, out.name) == ("input", "output")
  dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
  assert dims == ["batch", 1, "t", "y", "x"]
  x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
  rms = relative_rms(run_onnx(model, x), forward(net, x))
  assert rms <= 1e-5, rms
  assert list(report.parity.values()) == [pytest.approx(rms, rel=1, abs=1e-6)]


@needs_onnx
def test_onnx_fixed_patch_and_other_opsets(tmp_path, trained_model):
  import onnx
  path = tmp_path / "gui.onnx"
  assert cli.main(["deepcad-jax", "export", "--model", trained_model, "--format", "onnx",
                   "--output", str(path), "--patch", "16,24,20"]) == 0
  model = onnx.load(str(path))
  dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
  assert dims == [1, 1, 16, 24, 20]
  net = network(load_model(trained_model), "onnx")
  x = np.random.default_rng(2).standard_normal((1, 1, 16, 24, 20)).astype(np.float32)
  assert relative_rms(run_onnx(model, x), forward(net, x)) <= 1e-5
  for opset in (13, 18):
    model = onnx_model(net, opset)
    assert [o.version for o in model.opset_import] == [opset]
    assert relative_rms(run_onnx(model, x), forward(net, x)) <= 1e-5


@needs_onnx
def test_onnx_expresses_non_uniform_widths(tmp_path):
  """A network whose widths are not f, 2f, 4f, 8f (what pruning would give) cannot be a
  DeepCAD-RT .pth but is a valid ONNX graph."""
  model = _pruned(_model(4))
  with pytest.raises(UserError, match="widths other than f, 2f, 4f, 8f") as e:
    export(model, str(tmp_path / "m.pth"), "pth")
  _one_sentence(str(e.value))
  report = export(model, str(tmp_path / "m.onnx"), "onnx")
  assert not report.parity  # the JAX network has uniform widths only
  y = run_onnx(open(tmp_path / "m.onnx", "rb").read(), np.ones((1, 1, 8, 16, 8), np.float32))
  assert y.shape == (1, 1, 8, 16, 8) and np.isfinite(y).all()


def _pruned(model):
  """Keep 3 of encoder_1's 8 channels (and the matching inputs of the layers after)."""
  p = jax.tree_util.tree_map(np.array, model.params)
  keep = [0, 2, 5]
  p["encoder_1"]["conv2"]["kernel"] = p["encoder_1"]["conv2"]["kernel"][..., keep]
  p["encoder_1"]["conv2"]["bias"] = p["encoder_1"]["conv2"]["bias"][keep]
  p["encoder_2"]["conv1"]["kernel"] = p["encoder_2"]["conv1"]["kernel"][:, :, :, keep]
  k = p["decoder_1"]["conv1"]["kernel"]  # input: [encoder_1 (skip), decoder_2 (up)]
  p["decoder_1"]["conv1"]["kernel"] = np.concatenate([k[:, :, :, keep], k[:, :, :, 8:]], 3)
  return dataclasses.replace(model, params=p)


# ------------------------------------------------------------------ refusals


def test_refusals_are_one_sentence(tmp_path):
  out = str(tmp_path / "x.pth")
  small = write_tiff(tmp_path / "small.tif", noisy_movie((40, 24, 24))[0])
  prior = dataclasses.replace(
      _model(4, **{"model.mean_prior": True}),
      params=_params(4, 0, in_channels=2))
  ens_params = _stack([_model(4, seed=s).params for s in (0, 1)])
  ensemble = dataclasses.replace(_model(4, **{"model.ensemble": 2}), params=ens_params)
  cases = [
      (prior, {}, "mean-image prior.*single input channel"),
      (ensemble, {}, "ensemble of 2 networks.*--member K \\(0 to 1\\)"),
      (ensemble, {"member": 2}, "--member 2 is out of range"),
      (_model(4), {"member": 0}, "single network; leave --member out"),
  ]
  for fmt in ("pth", "onnx", "bioimageio"):
    for model, kwargs, message in cases:
      with pytest.raises(UserError, match=message) as e:
        export(model, out + (".zip" if fmt == "bioimageio" else ""), fmt, **kwargs)
      _one_sentence(str(e.value))
  for kwargs, fmt, message, onnx_first in [
      ({"opset": 9}, "onnx", "--opset 9 is not supported", True),
      ({}, "bioimageio", "ending in .zip", False),
      ({"output": out + ".zip"}, "bioimageio", "does not record the mean intensity.*--mean",
       True),  # a converted .pth without --mean or --sample
      ({"output": out + ".zip", "sample": small}, "bioimageio",
       r"is \(40, 24, 24\); a bioimage.io test input needs at least 120 frames", True),
      ({}, "tflite", "unknown export format", False)]:
    if HAS_ONNX or not onnx_first:
      with pytest.raises(UserError, match=message) as e:
        export(_model(4), kwargs.pop("output", out), fmt, **kwargs)
      _one_sentence(str(e.value))
  assert os.listdir(tmp_path) == ["small.tif"]


def test_ensemble_member_is_exported(tmp_path):
  members = [_model(4, seed=s).params for s in (0, 1)]
  ensemble = dataclasses.replace(_model(4, **{"model.ensemble": 2}),
                                 params=_stack(members))
  export(ensemble, str(tmp_path / "m1.pth"), "pth", member=1)
  params, f = to_flax_params(read_state_dict(str(tmp_path / "m1.pth")))
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(members[1])):
    np.testing.assert_array_equal(a, b)


def test_missing_extra_is_named(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
  with pytest.raises(UserError, match=r"needs the onnx package: pip install "
                     r"'deepcad-jax\[export\]'") as e:
    export(_model(4), str(tmp_path / "m.onnx"), "onnx")
  _one_sentence(str(e.value))


def test_existing_output_is_kept_without_overwrite(tmp_path, capsys, trained_model):
  out = tmp_path / "model.pth"
  out.write_bytes(b"precious")
  args = ["deepcad-jax", "export", "--model", trained_model, "--format", "pth",
          "--output", str(out)]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "already exists; add --overwrite" in err
  assert err.count("\n") == 1 and out.read_bytes() == b"precious"
  assert not (tmp_path / "para.yaml").exists()
  (tmp_path / "para.yaml").write_text("fmap: 99\n")
  out.unlink()
  assert cli.main(args) == 2  # para.yaml beside it is the user's too
  assert "para.yaml already exists" in capsys.readouterr().err and not out.exists()
  assert cli.main(args + ["--overwrite"]) == 0
  assert "wrote" in capsys.readouterr().out and read_para(str(tmp_path / "para.yaml"))[
      "fmap"] == 4
  if HAS_ONNX:
    onnx_out = tmp_path / "model.onnx"
    onnx_out.write_bytes(b"precious")
    assert cli.main(["deepcad-jax", "export", "--model", trained_model, "--format", "onnx",
                     "--output", str(onnx_out)]) == 2
    assert onnx_out.read_bytes() == b"precious"
    capsys.readouterr()


def test_flags_for_another_format_are_refused(tmp_path, capsys, trained_model):
  code = cli.main(["deepcad-jax", "export", "--model", trained_model, "--format", "pth",
                   "--output", str(tmp_path / "m.pth"), "--opset", "13"])
  assert code == 2
  assert "--opset applies to --format onnx or bioimageio, not pth" in capsys.readouterr().err


# ------------------------------------------------------------------ bioimage.io


@pytest.mark.slow
def test_bioimageio_package_passes_bioimageio_core(tmp_path, capsys, trained_model):
  pytest.importorskip("bioimageio.core", reason="needs bioimageio.core (pip install "
                      "'deepcad-jax[test]')")
  from bioimageio.core import test_model
  from bioimageio.spec import load_model_description
  out = tmp_path / "pkg" / "deepcad.zip"
  assert cli.main(["deepcad-jax", "export", "--model", trained_model, "--format",
                   "bioimageio", "--output", str(out), "--author", "A. Tester"]) == 0
  printed = capsys.readouterr().out
  assert "parity: onnxruntime vs JAX" in printed
  assert os.listdir(out.parent) == ["deepcad.zip"]  # no temporary files left
  before = out.stat().st_mtime_ns
  assert cli.main(["deepcad-jax", "export", "--model", trained_model, "--format",
                   "bioimageio", "--output", str(out)]) == 2
  assert "already exists; add --overwrite" in capsys.readouterr().err
  assert out.stat().st_mtime_ns == before
  names = set(zipfile.ZipFile(out).namelist())
  assert {"rdf.yaml", "deepcad_rt.onnx", "deepcad_rt.pth", "deepcad_rt_network.py",
          "test_input.npy", "test_output.npy", "cover.png", "README.md"} <= names
  descr = load_model_description(str(out))
  assert descr.format_version.startswith("0.5")
  axes = descr.outputs[0].axes
  assert [str(a.type) for a in axes] == ["batch", "channel", "time", "space", "space"]
  assert [getattr(a, "halo", None) for a in axes] == [None, None, 56, 56, 56]
  assert descr.inputs[0].axes[2].size.min == 120 and descr.inputs[0].axes[2].size.step == 8
  assert [c.doi for c in descr.cite] == ["10.1038/s41587-022-01450-8",
                                         "10.1038/s41592-021-01225-0"]
  # bioimageio.core's own test (what `bioimageio test` runs) on the ONNX weights: it
  # reproduces the test output and runs 6 input sizes; the PyTorch weights take 3x as
  # long there, so here they are loaded the way its PyTorch backend loads them instead.
  summary = test_model(str(out), weight_format="onnx")
  assert summary.status == "passed", summary.format()
  if HAS_TORCH:
    _check_torch_weights(out, tmp_path, trained_model)


def _check_torch_weights(package, tmp_path, trained_model):
  import importlib

  import torch
  with zipfile.ZipFile(package) as zf:
    zf.extractall(tmp_path / "unzipped")
  sys.path.insert(0, str(tmp_path / "unzipped"))
  try:
    arch = importlib.import_module("deepcad_rt_network")
  finally:
    sys.path.remove(str(tmp_path / "unzipped"))
  net = arch.Network_3D_Unet(f_maps=4).eval()
  state = torch.load(tmp_path / "unzipped" / "deepcad_rt.pth", weights_only=True)
  net.load_state_dict(state, strict=True)
  x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
  with torch.no_grad():
    got = net(torch.from_numpy(x)).numpy()
  expected = forward(network(load_model(trained_model), "bioimageio"), x)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
