"""The package's structure: folders by activity that import one way, small modules, no
import cycles, the model format's owner, the normalisation convention, inference
without the training stack, and the CLI's shared pieces."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import noisy_movie, tiny_config, write_tiff
from deepcad_jax import UserError, cli, config as config_lib, load_model
from deepcad_jax.model_io.checkpoint import Model, RunMeta, save_model
from deepcad_jax.core.normalise import Normalisation


def test_inference_imports_no_training_stack():
  code = ("import sys, deepcad_jax; from deepcad_jax import Denoiser, denoise, load_model; "
          "print(sorted(m for m in sys.modules if m in ('grain', 'optax') "
          "or m.startswith('deepcad_jax.training')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "[]"


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "deepcad_jax")
# The folders of the package, bottom up: a module may import its own folder's modules
# and those of folders below it, never above (docs/architecture.md).
LAYERS = [("errors",), ("config", "core"), ("runtime",), ("data",), ("model_io",),
          ("denoising",), ("analysis", "stream"), ("training",), ("export", "research", "bench"),
          ("viewer",), ("cli",), ("__init__", "__main__")]  # the package's face: the public API, the CLI
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules():
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        yield os.path.join(folder, name)


def test_the_folders_are_the_architecture():
  """At most two levels below the package, a few modules in each, none much over 600
  lines, and every folder of the package is one of the layers."""
  for path in _modules():
    rel = os.path.relpath(path, PACKAGE).split(os.sep)
    assert len(rel) <= 3, rel  # deepcad_jax/<activity>/<sub>/module.py at most
    assert rel[0][:-3] in RANK or rel[0] in RANK, rel
    with open(path) as f:
      assert sum(1 for _ in f) <= 620, path
  for folder, dirs, files in os.walk(PACKAGE):
    modules = [f for f in files if f.endswith(".py") and f != "__init__.py"]
    if folder != PACKAGE and "__pycache__" not in folder:
      assert len(modules) <= 9, (folder, modules)


def test_imports_point_down_the_layers():
  import ast
  for path in _modules():
    rel = os.path.relpath(path, PACKAGE).split(os.sep)
    here = rel[0][:-3] if len(rel) == 1 else rel[0]
    tree = ast.parse(open(path).read())
    for node in tree.body:  # module level: imports inside functions are the CLI's own
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepcad_jax"):
        parts = node.module.split(".")
        targets = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
        for target in targets:
          if target in RANK and not (here == "config" and target == "core"):
            assert RANK[target] <= RANK[here], f"{path} imports {node.module}"


def test_no_import_cycles_and_no_imports_inside_functions_but_the_documented_ones(tmp_path):
  out = tmp_path / "metrics.json"
  subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "code_metrics.py"),
                  "--root", ROOT, "--json", str(out)], capture_output=True, check=True)
  metrics = json.loads(out.read_text())
  assert metrics["cycles_module_level"] == [] and metrics["cycles_with_function_imports"] == []
  documented = {"deepcad_jax.bench.workloads",         # torch, when there
                "deepcad_jax.export.torch_reference"}  # shipped alone with torch
  lazy = set(metrics["imports_inside_functions"])
  assert all(m.startswith("deepcad_jax.cli.") or m in documented for m in lazy), lazy


def test_run_meta_round_trips_and_reads_as_a_mapping():
  cfg = tiny_config()
  meta = RunMeta(config=cfg, patch=(8, 16, 16), mean=3.5, step=7, holdout=((10, 20), None),
                 holdout_score=0.25, holdout_curve=((7, 0.25),),
                 provenance={"converted_from": "/x.pth"})
  again = RunMeta.from_json(json.loads(json.dumps(meta.to_json())))
  assert again == meta
  assert meta["step"] == 7 and meta["features"] == cfg.model.features
  assert meta["converted_from"] == "/x.pth" and meta.get("missing") is None
  with pytest.raises(ValueError, match="format"):
    RunMeta.from_json({**meta.to_json(), "format": "other/1"})


def test_a_saved_model_restores_its_params_alone(tmp_path):
  from deepcad_jax.core.network import ensemble_params
  cfg = tiny_config()
  params = ensemble_params(cfg.model.features, 3)
  out = save_model(Model.create(params, cfg, mean=1.5, source="test"), str(tmp_path / "m"))
  items = sorted(os.listdir(os.path.join(out, "checkpoints", "0")))
  assert "params" in items and "meta" in items and "opt" not in items
  model = load_model(out)
  assert model.mean == 1.5 and model.features == cfg.model.features
  for a, b in zip(*(jax_leaves(p) for p in (params, model.params))):
    np.testing.assert_array_equal(np.asarray(a), b)


def jax_leaves(tree):
  import jax
  return jax.tree_util.tree_leaves(tree)


def test_normalisation_maps_intensities_and_back():
  norm = Normalisation(np.float32(100.0), np.float32(4.0))
  x = np.array([96.0, 100.0, 108.0], np.uint16)
  values = norm.to_network(x)
  np.testing.assert_allclose(values, [-1.0, 0.0, 2.0])
  np.testing.assert_allclose(norm.from_network(values), x)
  np.testing.assert_allclose(norm.spread_from_network(np.float32(0.5)), 2.0)


def test_set_overrides_any_config_field_with_clear_errors():
  cfg = config_lib.override_strings(tiny_config(), [
      "train.lr=2e-4", "data.patch=16,16,16", "model.mean_prior=true",
      "data.holdout=10:20"])
  assert cfg.train.lr == 2e-4 and cfg.data.patch == (16, 16, 16)
  assert cfg.model.mean_prior and cfg.data.holdout == "10:20"
  with pytest.raises(UserError, match="known field"):
    config_lib.override_strings(cfg, ["train.lrr=1"])
  with pytest.raises(UserError, match="not a valid float"):
    config_lib.override_strings(cfg, ["train.lr=fast"])


def test_train_set_flag_reaches_the_config(capsys, tmp_path):
  movie = write_tiff(tmp_path / "m.tif", noisy_movie((40, 24, 24))[0])
  code = cli.main(["deepcad-jax", "train", "--data", movie, "--workdir",
                   str(tmp_path / "run"), "--config", "tiny", "--set", "train.epochs=0"])
  err = capsys.readouterr().err
  assert code == 2 and "train.epochs" in err  # validated like the config itself
  code = cli.main(["deepcad-jax", "train", "--data", movie, "--workdir",
                   str(tmp_path / "run"), "--config", "tiny", "--set", "nonsense"])
  assert code == 2 and "--set takes section.field=value" in capsys.readouterr().err


def test_evaluate_std_and_its_deprecated_alias(capsys, tmp_path):
  noisy, clean = noisy_movie((24, 16, 16))
  den = write_tiff(tmp_path / "d.tif", clean + 0.1)
  ref = write_tiff(tmp_path / "c.tif", clean)
  std = write_tiff(tmp_path / "s.tif", np.full(clean.shape, 0.1, np.float32))
  base = ["deepcad-jax", "evaluate", "--denoised", den, "--reference", ref]
  assert cli.main(base + ["--std", std]) == 0
  new = capsys.readouterr().out
  assert cli.main(base + ["--uncertainty", std]) == 0
  captured = capsys.readouterr()
  assert captured.out == new
  # The CLI's logger writes to stderr and does not propagate (so caplog sees nothing).
  assert "deprecated" in captured.err
  assert cli.main(base + ["--uncertainty", std, "--std", std]) == 2


def test_denoiser_is_an_immutable_handle_checked_by_its_config(trained_model):
  from deepcad_jax import DenoiseConfig, Denoiser, denoise
  with pytest.raises(UserError, match="--tiling must be one of"):
    DenoiseConfig(tiling="seamless")
  with pytest.raises(UserError, match="compute dtype must be one of float32, bfloat16"):
    DenoiseConfig(dtype="float16")
  settings = DenoiseConfig(tiling="exact", tile=(24, 16, 16), memory_budget="1GB")
  assert settings.memory_budget == 1e9 and settings.tile == (24, 16, 16)
  den = Denoiser(trained_model, settings, symmetries=2)  # keywords replace fields
  assert den.config == DenoiseConfig(tiling="exact", tile=(24, 16, 16), memory_budget=1e9,
                                     symmetries=2)
  assert den.samples == 2 * den.model.config.model.ensemble and den.channels == 2
  with pytest.raises(AttributeError, match="immutable"):
    den.tiling = "overlap"
  with pytest.raises(UserError, match="already holds its settings; give dtype"):
    denoise(np.zeros((8, 16, 16), np.float32), den, dtype="bfloat16")
  with pytest.raises(UserError, match="Denoiser was given where a model is expected"):
    Denoiser(den)
  with pytest.raises(TypeError, match="second argument is a DenoiseConfig, not tuple"):
    Denoiser(trained_model, (16, 16, 16))
  with pytest.raises(TypeError, match="uncertainty is now symmetries"):
    Denoiser(trained_model, uncertainty=2)


def test_with_params_reuses_the_compiled_step(trained_model):
  import jax
  from deepcad_jax import Denoiser, denoise
  movie, _ = noisy_movie((24, 16, 16), seed=4)
  model = load_model(trained_model)
  den = Denoiser(model, tiling="exact", devices=jax.devices()[:1])
  first = denoise(movie, den, output_dtype="float32")
  halved = jax.tree_util.tree_map(lambda p: np.asarray(p) * 0.5, model.params)
  other = den.with_params(halved)
  second = denoise(movie, other, output_dtype="float32")
  assert other.engine._compiled is den.engine._compiled  # nothing compiled again
  assert len(den.engine._compiled) == 1
  expected = denoise(movie, model.with_params(halved), tiling="exact",
                     devices=jax.devices()[:1], output_dtype="float32")
  np.testing.assert_allclose(second, expected, rtol=1e-5, atol=1e-4)
  assert not np.allclose(first, second)
  np.testing.assert_array_equal(denoise(movie, den, output_dtype="float32"), first)
