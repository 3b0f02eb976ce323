"""The pruning ladder: quality against network size, reproducible in one command.

`run_ladder` trains one network per width (the paper's 64, 48, 32, 24, 16, 12, 8 by
default) on the same data with the same config, pairs, steps and seed, each in its own
resumable run directory (`<workdir>/f<width>`), so a killed study resumes where it
stopped. With `pruned_from`, it also prunes that trained model (structured pruning) to
the parameter count of every narrower rung and fine-tunes it for the same number of
steps (`<workdir>/pruned_f<width>`): trained small from scratch against pruned from
large, at matching parameter counts. Every rung is scored on the held-out frames
(`score`), against the ground truth where one is given (SNR, PSNR, slice
correlations), and measured on the current device: parameters, FLOPs per voxel,
inference voxels/s, train-step time and peak memory of the compiled step. The table goes
to `ladder.json` and `ladder.csv`, the Pareto plot (quality against FLOPs and against
time, the paper's f=16 marked) to `ladder.png`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from typing import Sequence

import numpy as np

from deepcad_jax import config as config_lib
from deepcad_jax.bench.workloads import train_step
from deepcad_jax.bench.measure import environment
from deepcad_jax.model_io.loading import load_model
from deepcad_jax.model_io.checkpoint import save_model
from deepcad_jax.data.movie import list_movies, open_movie
from deepcad_jax.runtime.files import AtomicFile
from deepcad_jax.errors import UserError
from deepcad_jax.denoising.denoiser import Denoiser, denoise
from deepcad_jax.denoising.memory import compiled_bytes
from deepcad_jax.analysis.metrics import evaluate
from deepcad_jax.core.network import LADDER, flops_per_voxel, param_count, uniform_widths, widths_of
from deepcad_jax.research.prune import CRITERIA, parameters, prune
from deepcad_jax.analysis.score import HeldOutScorer, holdout_range
from deepcad_jax.training.loop import train

log = logging.getLogger("deepcad_jax")

PAPER_CHOICE = 16  # DeepCAD-RT's width


@dataclasses.dataclass
class Rung:
  """One row of the ladder table."""

  name: str
  kind: str                  # 'scratch' or 'pruned'
  features: int              # the width it was built from
  widths: list[int]
  parameters: int
  flops_per_voxel: float
  steps: int
  train_seconds: float | None
  holdout_score: float | None
  snr_db: float | None = None
  psnr_db: float | None = None
  r_xy: float | None = None
  r_yt: float | None = None
  r_xt: float | None = None
  infer_voxels_per_s: float | None = None
  train_step_s: float | None = None
  train_step_memory_bytes: int | None = None
  infer_step_memory_bytes: int | None = None
  run: str = ""


def _segments(data: str, holdout: float | str) -> tuple[list, list]:
  movies = [open_movie(p) for p in list_movies(data)]
  segs = [holdout_range(m.shape[0], holdout) for m in movies]
  if any(s is None for s in segs):
    raise UserError("the ladder scores every rung on held-out frames; give --holdout "
                    "(e.g. 0.1 for the last 10%).")
  return movies, segs


def _check_before_training(data: str, holdout, clean: str | None,
                           pruned_from: str | None, criterion: str) -> None:
  """What would fail only after rungs were trained, refused before the first one."""
  movies, _ = _segments(data, holdout)
  if clean is not None:
    ref = open_movie(clean)
    if ref.shape != movies[0].shape:
      raise UserError(f"--clean {clean} {ref.shape} and {movies[0].name} "
                      f"{movies[0].shape} differ in shape; give the ground truth of the "
                      "--data movie.")
  if pruned_from not in (None, "widest"):
    load_model(pruned_from)
  if pruned_from is not None and criterion not in CRITERIA:
    raise UserError(f"--criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}.")


def _evaluate(run: str, kind: str, data: str, holdout, clean: str | None,
              train_seconds: float | None, measure: bool, batch: tuple[int, int, int]
              ) -> Rung:
  model = load_model(run)
  movies, segs = _segments(data, holdout)
  den = Denoiser(model, tiling="exact")
  held = HeldOutScorer(movies, segs, [None] * len(movies), [None] * len(movies))(
      den).estimated_mse
  in_ch = model.config.model.in_channels
  widths = widths_of(model.params)
  rung = Rung(os.path.basename(run), kind, model.features, list(widths),
              param_count(model.params), flops_per_voxel(widths, in_ch),
              model.meta.step, train_seconds, held, run=run)
  if clean is not None or measure:
    movie = movies[0]
    den.plan(movie.shape, movie.dtype, np.float32)  # compile outside the timing
    t0 = time.perf_counter()
    out = denoise(movie, den, output_dtype="float32")
    seconds = time.perf_counter() - t0
    rung.infer_voxels_per_s = float(np.prod(movie.shape)) / seconds
    steps = [c for e in (den.engine, *den.engine._fewer.values()) for c in e._compiled.values()]
    rung.infer_step_memory_bytes = max((compiled_bytes(c) or 0) for c in steps) or None
    if clean is not None:
      ref = open_movie(clean)
      if ref.shape != movie.shape:
        raise UserError(f"--clean {clean} {ref.shape} and {movie.name} {movie.shape} differ "
                        "in shape; give the ground truth of the --data movie.")
      scores_clean = evaluate(out, ref.read(0, ref.shape[0]).astype(np.float32))
      rung.snr_db, rung.psnr_db = scores_clean["snr_db"], scores_clean["psnr_db"]
      rung.r_xy, rung.r_yt, rung.r_xt = (scores_clean[f"r_{k}"]["median"]
                                         for k in ("xy", "yt", "xt"))
  if measure:
    rec = train_step(environment(), batch, model.features, model.config.model.dtype, 0, 3,
                     "ladder-train", widths=model.config.model.widths)
    rung.train_step_s = rec["median_s"]
    rung.train_step_memory_bytes = rec.get("compiled_memory_bytes")
  return rung


def run_ladder(data: str, workdir: str, *, widths: Sequence[int] = LADDER,
               config: config_lib.Config | str = "demo", clean: str | None = None,
               holdout: float | str = 0.1, pruned_from: str | None = None,
               criterion: str = "l1", measure: bool = True, progress: bool = True
               ) -> list[Rung]:
  """Train, score and measure every rung; write ladder.json, ladder.csv, ladder.png.

  Args:
    data: the movie (or folder of movies) every rung trains on.
    workdir: where the rungs' run directories and the results go; rerun to resume.
    widths: the widths trained from scratch.
    config: the training config shared by every rung (its width is replaced).
    clean: the ground truth of `data` (one movie), for SNR, PSNR and correlations.
    holdout: the frames no rung trains on and every rung is scored on (a fraction from
      the end, or 'a:b').
    pruned_from: a trained model, or 'widest' for this ladder's widest rung, to prune to
      the parameter count of every narrower rung and fine-tune for the same steps.
    criterion: the pruning criterion ('l1' or 'taylor').
    measure: also time inference and a train step on this device.
    progress: show training progress.
  """
  if not widths:
    raise UserError("--widths needs at least one width.")
  base = config_lib.load_config(config) if isinstance(config, str) else config
  base = config_lib.override(base, **{"data.holdout": holdout})
  _check_before_training(data, holdout, clean, pruned_from, criterion)
  os.makedirs(workdir, exist_ok=True)
  rows: list[Rung] = []
  runs = {}
  for f in sorted(widths, reverse=True):
    run = os.path.join(workdir, f"f{f:02d}")
    cfg = dataclasses.replace(base, name=f"ladder-f{f}", model=dataclasses.replace(
        base.model, features=f, widths=None))
    log.info("ladder: training f=%d in %s", f, run)
    t0 = time.perf_counter()
    train(data, run, cfg, progress=progress).stop_if_interrupted()
    runs[f] = (run, time.perf_counter() - t0, cfg)
  for f, (run, seconds, cfg) in runs.items():
    rows.append(_evaluate(run, "scratch", data, holdout, clean, seconds, measure,
                          cfg.data.patch))
    log.info("ladder: f=%d scored %.6g", f, rows[-1].holdout_score)
  if pruned_from is not None:
    source = runs[max(runs)][0] if pruned_from == "widest" else pruned_from
    big = load_model(source)
    in_ch = big.config.model.in_channels
    total = parameters(widths_of(big.params), in_ch)
    for f in sorted(widths, reverse=True):
      target = parameters(uniform_widths(f, in_ch), in_ch)
      if target >= total:
        continue
      run = os.path.join(workdir, f"pruned_f{f:02d}")
      start = os.path.join(workdir, "pruned_starts", f"f{f:02d}")
      if not os.path.isdir(os.path.join(start, "checkpoints")):
        pruned, report = prune(big, target / total, criterion, data)
        save_model(pruned, start, overwrite=True)
        log.info("ladder: pruned %s to %d parameters for f=%d", source,
                 report.parameters_after, f)
      cfg = runs[f][2] if f in runs else base
      t0 = time.perf_counter()
      resuming = os.path.isdir(os.path.join(run, "checkpoints"))
      start_model = load_model(start)
      fine = dataclasses.replace(cfg, name=f"ladder-pruned-f{f}", model=dataclasses.replace(
          cfg.model, features=start_model.features, widths=start_model.config.model.widths))
      train(data, run, fine, init_from=None if resuming else start,
            progress=progress).stop_if_interrupted()
      rows.append(_evaluate(run, "pruned", data, holdout, clean,
                            time.perf_counter() - t0, measure, cfg.data.patch))
  write_results(rows, workdir)
  return rows


def format_rows(rows: Sequence[Rung]) -> str:
  """The ladder as a text table, one line per rung."""
  lines = [f"{'rung':<12} {'kind':<8} {'parameters':>11} {'FLOPs/voxel':>12} "
           f"{'held-out':>10} {'SNR dB':>7} {'voxels/s':>9}"]
  for r in rows:
    lines.append(f"{r.name:<12} {r.kind:<8} {r.parameters:>11,} {r.flops_per_voxel:>12,.0f} "
                 f"{r.holdout_score:>10.5g} "
                 + (f"{r.snr_db:>7.2f} " if r.snr_db is not None else f"{'':>7} ")
                 + (f"{r.infer_voxels_per_s:>9.3g}" if r.infer_voxels_per_s else ""))
  return "\n".join(lines)


def write_results(rows: Sequence[Rung], workdir: str) -> dict[str, str]:
  """ladder.json, ladder.csv and (with matplotlib) ladder.png in `workdir`."""
  paths = {k: os.path.join(workdir, f"ladder.{k}") for k in ("json", "csv", "png")}
  env = {k: v for k, v in environment().items() if k != "xla_flags"}
  with AtomicFile(paths["json"], overwrite=True) as f:
    json.dump({"environment": env, "rungs": [dataclasses.asdict(r) for r in rows]},
              f.text(), indent=1)
  fields = [f.name for f in dataclasses.fields(Rung)]
  with AtomicFile(paths["csv"], overwrite=True) as f:
    writer = csv.DictWriter(f.text(newline=""), fields)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: (" ".join(map(str, v)) if isinstance(v, list) else v)
                       for k, v in dataclasses.asdict(r).items()})
  if plot(rows, paths["png"]) is None:
    del paths["png"]
  return paths


def plot(rows: Sequence[Rung], path: str) -> str | None:
  """Quality against FLOPs per voxel and against inference time per voxel, from
  scratch and pruned, the paper's f=16 marked (needs matplotlib)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  use_snr = all(r.snr_db is not None for r in rows)
  quality = [r.snr_db if use_snr else -r.holdout_score for r in rows]
  label = "SNR against the ground truth (dB)" if use_snr else "- held-out score"
  panels = [("FLOPs per voxel", [r.flops_per_voxel for r in rows])]
  if all(r.infer_voxels_per_s for r in rows):
    panels.append(("inference time per voxel (s)", [1 / r.infer_voxels_per_s for r in rows]))
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
  for ax, (xlabel, xs) in zip(axes[0], panels):
    for kind, marker in (("scratch", "o"), ("pruned", "^")):
      sel = [i for i, r in enumerate(rows) if r.kind == kind]
      if not sel:
        continue
      order = sorted(sel, key=lambda i: xs[i])
      ax.plot([xs[i] for i in order], [quality[i] for i in order], marker=marker,
              label="trained from scratch" if kind == "scratch" else "pruned + fine-tuned")
      for i in sel:
        ax.annotate(f"f={rows[i].features}" if kind == "scratch" else
                    f"{rows[i].parameters / 1e3:.0f}k", (xs[i], quality[i]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    for i, r in enumerate(rows):
      if r.kind == "scratch" and r.features == PAPER_CHOICE:
        ax.scatter([xs[i]], [quality[i]], s=160, facecolors="none", edgecolors="red",
                   label="DeepCAD-RT's choice (f=16)")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
  fig.suptitle("Quality against cost")
  fig.tight_layout()
  with AtomicFile(path, overwrite=True) as f:
    fig.savefig(f.open(), format="png", dpi=120)
  plt.close(fig)
  return path
