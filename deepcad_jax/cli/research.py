"""Research and measurement: `prune`, `ladder` and `bench`.
"""

from __future__ import annotations

import os

from absl import flags

from deepcad_jax import config as config_lib
from deepcad_jax.errors import UserError
from deepcad_jax.cli.flags import (Command, _define_dtype,
                                   _define_output, _define_set, _given, _holdout,
                                   _refuse_output_is_input, _require, _triple, _v)


def _define_prune(fv):
  flags.DEFINE_string("model", None, "The trained model to prune (a model directory or "
                      ".pth).", flag_values=fv)
  flags.DEFINE_float("keep", None, "Fraction of the parameters to keep, in (0, 1].",
                     flag_values=fv)
  flags.DEFINE_enum("criterion", "l1", ["l1", "taylor"], "Channel importance: l1 (kernel "
                    "magnitude, no data) or taylor (activation x gradient of the training "
                    "loss on pairs from --data).", flag_values=fv)
  flags.DEFINE_string("data", None, "A movie for --criterion taylor.", flag_values=fv)
  flags.DEFINE_integer("batches", 8, "Training pairs the Taylor criterion averages over.",
                       flag_values=fv)
  _define_output(fv, "Model directory to write (fine-tune it with train "
                      "--init-from).",
                 "Replace a model already there.")


def _run_prune(fv):
  from deepcad_jax.model_io.loading import load_model
  from deepcad_jax.model_io.checkpoint import save_model
  from deepcad_jax.research.prune import prune
  _require(fv, "model", "keep", "output")
  _refuse_output_is_input([_given(fv, "output", "model")],
                          [_given(fv, "model", "model"), _given(fv, "data")])
  model = load_model(_v(fv, "model"))
  pruned, r = prune(model, _v(fv, "keep"), _v(fv, "criterion"), _v(fv, "data"),
                    _v(fv, "batches"))
  out = save_model(pruned, _v(fv, "output"), _v(fv, "overwrite"))
  print(r.describe(out))
  return 0


def _define_ladder(fv):
  flags.DEFINE_string("data", None, "The movie (or folder) every rung trains on.",
                      flag_values=fv)
  flags.DEFINE_string("workdir", None, "Folder for the rungs' runs and the results "
                      "(ladder.json, .csv, .png); rerun to resume.", flag_values=fv)
  flags.DEFINE_string("widths", "64,48,32,24,16,12,8", "Widths f trained from scratch.",
                      flag_values=fv)
  flags.DEFINE_string("config", "demo", "Training config shared by every rung (its width "
                      "is replaced).", flag_values=fv)
  flags.DEFINE_integer("epochs", None, "Epochs per rung (default: the config's).",
                       flag_values=fv)
  flags.DEFINE_string("clean", None, "Ground truth of --data (one movie): SNR, PSNR and "
                      "correlations per rung.", flag_values=fv)
  flags.DEFINE_string("holdout", "0.1", "Frames no rung trains on and every rung is "
                      "scored on: a fraction from the end, or a:b.", flag_values=fv)
  flags.DEFINE_string("pruned-from", None, "A trained model, or 'widest' (this ladder's "
                      "widest rung), pruned to every narrower rung's parameter count and "
                      "fine-tuned for the same steps.", flag_values=fv)
  flags.DEFINE_enum("criterion", "l1", ["l1", "taylor"], "Pruning criterion.",
                    flag_values=fv)
  flags.DEFINE_boolean("measure", True, "Time inference and a train step per rung.",
                       flag_values=fv)
  _define_set(fv)


def _run_ladder(fv):
  from deepcad_jax.research.ladder import format_rows, run_ladder, write_results
  _require(fv, "data", "workdir")
  cfg = config_lib.load_config(_v(fv, "config"))
  if _v(fv, "epochs"):
    cfg = config_lib.override(cfg, **{"train.epochs": _v(fv, "epochs")})
  cfg = config_lib.override_strings(cfg, _v(fv, "set"))
  rows = run_ladder(_v(fv, "data"), _v(fv, "workdir"), widths=_widths(_v(fv, "widths")),
                    config=cfg, clean=_v(fv, "clean"), holdout=_holdout(_v(fv, "holdout")),
                    pruned_from=_v(fv, "pruned-from"), criterion=_v(fv, "criterion"),
                    measure=_v(fv, "measure"))
  print(format_rows(rows))
  paths = write_results(rows, _v(fv, "workdir"))
  print("results: " + ", ".join(paths.values()))
  return 0


def _define_bench(fv):
  from deepcad_jax.bench.workloads import WORKLOADS
  flags.DEFINE_enum("workload", "quick", list(WORKLOADS), "What to measure.", flag_values=fv)
  _define_dtype(fv)
  flags.DEFINE_integer("batch-size", 0, "Patches per step (0 = one per device); for "
                       "--workload scaling, patches per device.", flag_values=fv)
  flags.DEFINE_integer("repeats", None, "Timed runs per measurement (default: by workload).",
                       flag_values=fv)
  flags.DEFINE_integer("features", 16, "Network width (16 = DeepCAD-RT).", flag_values=fv)
  _define_output(fv, "JSON file to append the records to (default: "
                      "benchmarks/results/<device>_<date>.json).", overwrite=None)
  flags.DEFINE_boolean("torch", True, "Also time the PyTorch twin when torch is installed.",
                       flag_values=fv)
  flags.DEFINE_string("movie", None, "Movie shape T,Y,X for reference/quick (default: the "
                      "workload's, 300,490,490 for reference).", flag_values=fv)
  flags.DEFINE_string("patch", None, "Patch T,Y,X (default: 150,150,150 for the paper's "
                      "workloads).", flag_values=fv)
  flags.DEFINE_integer("spatial", 1, "reference-device / train-step: also split each "
                       "patch's Y axis over this many devices.", flag_values=fv)
  flags.DEFINE_string("widths", None, "ladder: network widths f to measure, e.g. 16,8 "
                      "(default: the paper's 64,48,32,24,16,12,8).", flag_values=fv)


def _widths(text: str | None):
  if text is None:
    return None
  try:
    widths = [int(w) for w in text.split(",")]
  except ValueError:
    widths = []
  if not widths or min(widths) < 1:
    raise UserError(f"--widths takes positive integers such as 16,8; got {text!r}.")
  return widths


def _run_bench(fv):
  # Peak device memory means the peak allocation: no preallocated pool (GPU).
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  from deepcad_jax.bench.results import check_output, write_results
  from deepcad_jax.bench.workloads import run_workload
  check_output(_v(fv, "output"))
  records = run_workload(_v(fv, "workload"), _v(fv, "dtype"), _v(fv, "batch-size"),
                         _v(fv, "repeats"), _v(fv, "features"), _v(fv, "torch"),
                         _triple(_v(fv, "movie"), "--movie"), _triple(_v(fv, "patch")),
                         _v(fv, "spatial"), _widths(_v(fv, "widths")))
  print(write_results(records, _v(fv, "output")))
  return 0


COMMANDS = [
    Command("bench", "measure throughput and memory (the paper's 490x490x300 protocol "
            "and more)", _define_bench, _run_bench,
            "deepcad-jax bench --workload quick"),
    Command("prune", "remove whole channels from a trained network (structured pruning)",
            _define_prune, _run_prune,
            "deepcad-jax prune --model runs/rt --keep 0.25 --output runs/rt_pruned"),
    Command("ladder", "train every width on the same data: quality against size "
            "(the paper's pruning ladder), from scratch and pruned",
            _define_ladder, _run_ladder,
            "deepcad-jax ladder --data sim/noisy.tif --clean sim/clean.tif --workdir "
            "runs/ladder --pruned-from widest"),
]
