"""Benchmark results: the JSON file records are appended to, a markdown table (with the
paper's figures and PyTorch ratios beside ours) and the ladder's plot.
"""

from __future__ import annotations

import json
import os


from deepcad_jax.errors import UserError
from deepcad_jax.runtime.files import AtomicFile
from deepcad_jax.bench.workloads import PAPER


def results_path(folder: str, env: dict) -> str:
  slug = "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()
  return os.path.join(folder, f"{slug}_{env['date']}.json")


def check_output(path: str | None) -> None:
  """Refuse, before a benchmark runs, an --output that exists but is not a JSON list of
  records (bench appends to it)."""
  if not path or not os.path.lexists(path):
    return
  try:
    with open(path) as f:
      records = json.load(f)
  except (OSError, UnicodeDecodeError, ValueError):
    records = None
  if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
    raise UserError(f"{path} exists and is not a JSON list of benchmark records; bench "
                    "appends its records to such a file: choose another --output.")


def save_records(records: list[dict], path: str) -> None:
  """Append records to a JSON list (one file per device kind and date)."""
  existing = []
  if os.path.exists(path):
    with open(path) as f:
      existing = json.load(f)
  with AtomicFile(path, overwrite=True) as f:
    json.dump(existing + records, f.text(), indent=1)


def write_results(records: list[dict], path: str | None = None) -> str:
  """Append `records` to `path` (default: benchmarks/results/<device>_<date>.json),
  rewrite its markdown table and ladder plot beside it; returns the report: this run's
  table and where the files are."""
  path = path or results_path(os.path.join("benchmarks", "results"),
                              records[0]["environment"])
  save_records(records, path)
  with open(path) as f:
    all_records = json.load(f)
  stem = os.path.splitext(path)[0]
  with AtomicFile(stem + ".md", overwrite=True) as f:
    f.text().write(markdown_table(all_records) + "\n")
  plot = plot_ladder(all_records, stem + "_ladder.png")
  return (markdown_table(records) + f"\n\nrecords: {path} (table: {stem}.md"
          + (f", plot: {plot}" if plot else "") + ")")


def _paper_figure(r: dict) -> str:
  """The paper's figure for a record measured at the paper's protocol, else ''."""
  p150 = list(PAPER["patch"])
  if r["workload"] == "reference" and r.get("movie") == list(PAPER["movie"]) and (
      r.get("patch") == p150 or r.get("tiling") == "exact"):
    return (f"{PAPER['inference_s']} s on an RTX 3090 (recorded in "
            f"{PAPER['acquisition_s']} s)")
  if r["workload"] == "reference-device" and r.get("patch") == p150 and \
      r.get("patches") == PAPER["patches"]:
    return f"{PAPER['inference_s']} s end to end"
  if r["workload"] == "train-step" and r.get("patch") == p150:
    return f"{PAPER['train_step_s']} s/step"
  return ""


def _torch_ratios(records: list[dict]) -> list[str]:
  """'JAX / PyTorch' time ratios for records measured side by side (same patch)."""
  lines = []
  for r in records:
    if "-torch-" not in r["workload"]:
      continue
    prefix, kind = r["workload"].split("-torch-")
    want = (f"{prefix}-ladder-infer" if prefix == "quick" else None, "reference-device") \
        if kind == "forward" else (f"{prefix}-train-step" if prefix == "quick" else
                                   "train-step",)
    for j in records:
      if j["workload"] in want and j.get("patch") == r.get("patch") and \
          j.get("features") == r.get("features") and j.get("patches", 1) == 1 and \
          j["dtype"] == "float32" and j.get("commit") == r.get("commit"):
        lines.append(f"JAX / PyTorch time, {kind} {'x'.join(map(str, r['patch']))}: "
                     f"{j['median_s'] / r['median_s']:.2f} ({j['median_s']:.4g} s vs "
                     f"{r['median_s']:.4g} s, {r.get('framework', 'torch')}).")
        break
  return lines + ([""] if lines else [])


def markdown_table(records: list[dict]) -> str:
  """Measured records, and the paper's figures where a record used the paper's protocol."""
  rows = ["| workload | shape | device | dtype | batch | median s | compile s | voxels/s | "
          "recompute | TFLOP/s | peak memory MB | paper |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in records:
    tflops = f"{r['flop_per_s'] / 1e12:.3g}" if r.get("flop_per_s") else ""
    vps = f"{r['voxels_per_s']:.3g}" if r.get("voxels_per_s") else ""
    name = r["workload"] + (f" f={r['features']}" if "ladder" in r["workload"] else "")
    name += f" ({r['devices_used']} dev)" if "devices_used" in r else ""
    if "uncertainty" in r:
      name += f" K={r['uncertainty']} M={r['members']}"
    if r.get("tiling"):
      name += f" ({r['tiling']})"
    shape = "x".join(map(str, r["movie"])) + " movie, " if "movie" in r else ""
    shape += ("x".join(map(str, r["patch"])) + " tiles") if "patch" in r else ""
    if r.get("patches"):
      shape += f" x{r['patches']}"
    if "latency_p99_s" in r:
      shape += (f"; latency median {r['latency_median_s']:.3g} s, p99 "
                f"{r['latency_p99_s']:.3g} s")
    recompute = f"{r['recompute']:.2f}" if r.get("recompute") else ""
    rows.append(f"| {name} | {shape} | {r['device']} | {r['dtype']} | {r['batch_size']} | "
                f"{r.get('median_s', float('nan')):.4g} | {r.get('compile_s', 0):.3g} | "
                f"{vps} | {recompute} | {tflops} | {r['peak_memory_bytes'] / 2**20:.0f} | "
                f"{_paper_figure(r)} |")
  rows.append("")
  rows += _torch_ratios(records)
  rows.append(f"Paper (Li et al. 2022): {PAPER['inference_s']} s for the 490x490x300 "
              f"movie (75 patches of 150^3) on one RTX 3090 (PyTorch, batch 1), recorded "
              f"in {PAPER['acquisition_s']} s; {PAPER['train_step_s']} s per 150^3 "
              "training step; 701 MB GPU memory for the TensorRT float16 deployment. "
              "Shapes are T x Y x X. Peak memory is the device's peak allocation on GPUs "
              "and the process's peak RSS on CPUs (cumulative over the run). Voxels/s "
              "counts movie voxels for end-to-end and stream rows and network voxels "
              "otherwise; recompute is network voxels / movie voxels (overlap: "
              "DeepCAD-RT's overlapping patches; exact: seamless tiles as large as the "
              "memory budget allows). A stream row's median s is the whole replay.")
  return "\n".join(rows)


def plot_ladder(records: list[dict], path: str) -> str | None:
  """Time and memory against parameters for the ladder (needs matplotlib)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  rows = [r for r in records if "ladder" in r["workload"] and "parameters" in r]
  if not rows:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for kind, marker in (("infer", "o"), ("train", "s")):
    sel = sorted((r for r in rows if r["workload"].endswith(kind)),
                 key=lambda r: r["parameters"])
    xs = [r["parameters"] for r in sel]
    axes[0].plot(xs, [r["median_s"] for r in sel], marker=marker, label=kind)
    axes[1].plot(xs, [r.get("compiled_memory_bytes") or 0 for r in sel], marker=marker,
                 label=kind)
  for ax, label in zip(axes, ("median time per patch batch (s)", "compiled memory (bytes)")):
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(label)
    ax.legend()
  fig.suptitle(f"Pruning ladder on {rows[0]['device']} ({rows[0]['dtype']})")
  fig.tight_layout()
  try:
    with AtomicFile(path, overwrite=True) as f:
      fig.savefig(f.open(), dpi=120, format="png")
  finally:
    plt.close(fig)
  return path
