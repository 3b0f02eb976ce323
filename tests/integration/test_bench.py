import json

import pytest

from deepcad_jax import cli

from deepcad_jax.bench import workloads as bench
from deepcad_jax.bench.results import markdown_table
from deepcad_jax.denoising.tiling import patch_plan

REQUIRED = {"workload", "device", "dtype", "batch_size", "median_s", "compile_s",
            "peak_memory_bytes", "voxels_per_s", "jax_version", "commit"}


def test_reference_protocol_geometry():
  p = bench.PAPER
  assert len(patch_plan(p["movie"], p["patch"], p["overlap"])) == p["patches"] == 75
  voxels = 75 * 150**3
  assert abs(voxels - 2.53e8) < 0.01e8  # "about 2.53e8 voxels through the network"


@pytest.mark.slow
def test_quick_workload_records_and_files(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(bench, "LADDER", (4,))  # one rung keeps the test short
  out = tmp_path / "results.json"
  code = cli.main(["deepcad-jax", "bench", "--workload", "quick", "--movie", "16,24,24",
                   "--patch", "8,16,16", "--repeats", "1", "--features", "4",
                   "--output", str(out), "--notorch"])
  assert code == 0, capsys.readouterr().err
  records = json.loads(out.read_text())
  names = [r["workload"] for r in records]
  assert names[:4] == ["quick-reference", "quick-reference", "quick-reference-device",
                       "quick-train-step"]
  assert [records[0]["tiling"], records[1]["tiling"]] == ["overlap", "exact"]
  assert records[1]["recompute"] == 1.0 and records[1]["patches"] == 1  # one whole tile
  assert records[0]["recompute"] == records[0]["network_voxels"] / (16 * 24 * 24) > 2
  assert names.count("quick-ladder-infer") == 1 and "quick-scaling-train" in names
  for r in records:
    assert REQUIRED <= set(r), REQUIRED - set(r)
    assert r["median_s"] > 0 and r["compile_s"] > 0 and r["peak_memory_bytes"] > 0
    assert r["dtype"] == "float32" and r["device"] == r["environment"]["device"]
  e2e = records[0]
  assert e2e["voxels"] == 16 * 24 * 24 and e2e["patches"] == len(
      patch_plan((16, 24, 24), (8, 16, 16), 0.4))
  assert records[2]["flops"] > 0 and records[2]["flop_per_s"] > 0
  table = (tmp_path / "results.md").read_text()
  assert "| quick-reference (overlap) |" in table and "RTX 3090" in table
  assert "| quick-reference (exact) |" in table
  # A second run appends to the same file.
  code = cli.main(["deepcad-jax", "bench", "--workload", "reference-device", "--movie",
                   "16,24,24", "--patch", "8,16,16", "--repeats", "1", "--features", "4",
                   "--output", str(out), "--dtype", "bfloat16"])
  assert code == 0
  records = json.loads(out.read_text())
  assert records[-1]["workload"] == "reference-device" and records[-1]["dtype"] == "bfloat16"


def test_uncertainty_workload_times_symmetries_and_members(tmp_path, monkeypatch):
  monkeypatch.setattr(bench, "UNCERTAINTY_CASES", ((0, 1), (2, 1), (2, 2)))  # keep it short
  out = tmp_path / "u.json"
  assert cli.main(["deepcad-jax", "bench", "--workload", "uncertainty", "--movie",
                   "8,16,16", "--patch", "8,16,16", "--repeats", "1", "--features", "4",
                   "--output", str(out)]) == 0
  records = json.loads(out.read_text())
  assert [(r["uncertainty"], r["members"]) for r in records] == [(0, 1), (2, 1), (2, 2)]
  assert all(r["median_s"] > 0 for r in records)
  assert "uncertainty K=2 M=2" in (tmp_path / "u.md").read_text()


def test_bad_workload_is_a_clear_error(capsys):
  assert cli.main(["deepcad-jax", "bench", "--workload", "nope"]) == 2
  assert "--workload" in capsys.readouterr().err
  with pytest.raises(bench.UserError, match="unknown workload"):
    bench.run_workload("nope")


def test_torch_ratio_lines():
  common = {"device": "cpu", "dtype": "float32", "batch_size": 1, "peak_memory_bytes": 1,
            "features": 16, "patch": [16, 32, 32], "commit": "abc"}
  records = [dict(common, workload="quick-train-step", median_s=0.08),
             dict(common, workload="quick-torch-train-step", median_s=0.16,
                  framework="torch 2.13")]
  table = markdown_table(records)
  assert "JAX / PyTorch time, train-step 16x32x32: 0.50 (0.08 s vs 0.16 s" in table


@pytest.mark.slow
def test_the_gpu_suite_runs_every_step_at_small_shapes(tmp_path):
  """benchmarks/gpu_suite.sh --small: what a GPU machine runs, at CPU-sized shapes."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHON=sys.executable)
  env.pop("XLA_FLAGS", None)  # one device, as on a GPU machine
  done = subprocess.run(["bash", os.path.join(root, "benchmarks", "gpu_suite.sh"),
                         str(tmp_path), "--small"], capture_output=True, text=True,
                        env=env, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  summary = (tmp_path / "summary.txt").read_text()
  steps = [line.split()[0] for line in summary.splitlines()]
  assert steps == ["tests", "reference_fp32", "reference_bf16", "reference_device_fp32",
                   "reference_device_bf16", "train_step", "ladder", "overhead",
                   "stream_512"], summary
  assert summary.count("rc=0") == len(steps), summary
  reference = json.loads((tmp_path / "reference_fp32.json").read_text())
  assert [r["tiling"] for r in reference] == ["overlap", "exact"]
  assert all(r["recompute"] >= 1 and r["voxels_per_s"] > 0 for r in reference)
  overhead = json.loads((tmp_path / "overhead.json").read_text())
  assert {r["network"] for r in overhead} == {"identity"}
  stream = json.loads((tmp_path / "stream_512.json").read_text())[0]
  assert stream["frames"] == 96 and stream["latency_p99_s"] > 0
  assert json.loads((tmp_path / "device.json").read_text())["platform"] == "cpu"
