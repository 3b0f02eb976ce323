"""The `deepcad-jax` command: a thin layer of absl flags over the public API.

Each command is a `Command` with its flags (on a FlagValues of its own, so `main` can be
called many times in one process) and a `run` function. User mistakes print one line
(`error: ...`) and exit with status 2; no traceback.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import platform
import signal
import sys
import threading
import warnings
from typing import Callable, Sequence

from absl import flags
from absl import logging as absl_logging

from deepcad_jax import __version__
from deepcad_jax import config as config_lib
from deepcad_jax.errors import Terminated, UserError

log = logging.getLogger("deepcad_jax")


@dataclasses.dataclass
class Command:
  name: str
  summary: str
  define: Callable[[flags.FlagValues], None]
  run: Callable[[flags.FlagValues], int | None]
  example: str = ""
  # For --help: set the flags' defaults from what the command line chose (e.g. the
  # config in use) and return a line saying so.
  help_defaults: Callable[[flags.FlagValues, list[str]], str] | None = None


def _triple(text: str | None, flag: str = "--patch"):
  """'T,Y,X' -> (T, Y, X) (None stays None)."""
  if text is None:
    return None
  try:
    values = tuple(int(v) for v in text.replace("x", ",").split(","))
  except ValueError:
    values = ()
  if len(values) != 3:
    raise UserError(f"{flag} takes three integers T,Y,X (e.g. 32,64,64); got {text!r}.")
  return values


def _v(fv: flags.FlagValues, name: str):
  return fv[name].value


# ---------------------------------------------------------------- shared flag groups

MODEL_HELP = ("Model: a training run directory, a converted model or a DeepCAD-RT .pth.")


def _define_model(fv, help: str = MODEL_HELP, step: bool = False, para: bool = False):
  """--model, and optionally --step (a checkpoint) and --para (a .pth's para.yaml)."""
  flags.DEFINE_string("model", None, help, flag_values=fv)
  if step:
    flags.DEFINE_string("step", None, "Checkpoint step to use: a number, or 'best' (the "
                        "lowest held-out score of a run trained with --holdout); default: "
                        "the last.", flag_values=fv)
  if para:
    flags.DEFINE_string("para", None, "para.yaml for a .pth model (default: the one "
                        "beside it).", flag_values=fv)


def _define_output(fv, help: str, overwrite: str | None = "Replace existing files."):
  """--output, and --overwrite (nothing is replaced without it) unless `overwrite` is
  None."""
  flags.DEFINE_string("output", None, help, flag_values=fv)
  if overwrite is not None:
    flags.DEFINE_boolean("overwrite", False, overwrite, flag_values=fv)


def _define_dtype(fv, default: str | None = "float32"):
  flags.DEFINE_enum("dtype", default, list(config_lib.DTYPES), "Compute dtype.",
                    flag_values=fv)


def _define_run_settings(fv):
  """The `DenoiseConfig` flags that offline denoising and the stream share."""
  flags.DEFINE_string("memory-budget", None, "Exact tiling: memory per device for tiles, "
                      "e.g. 8GB (default: 80% of an accelerator's memory, 40% of RAM on "
                      "a CPU).", flag_values=fv)
  flags.DEFINE_integer("spatial", 1, "Also split each tile's Y axis over this many "
                       "devices.", flag_values=fv)
  flags.DEFINE_integer("uncertainty", 0, "K in 2..8 (1..8 for an ensemble): predict under "
                       "K symmetries of the (y, x) plane with every ensemble member, write "
                       "the samples' mean as the output and their standard deviation "
                       "beside it (*_std.tif); K x members times the compute.",
                       flag_values=fv)
  flags.DEFINE_boolean("save-samples", False, "With --uncertainty: also write every sample "
                       "(*_sample00.tif, ...; float32), e.g. for 'deepcad-jax traces'.",
                       flag_values=fv)


# ---------------------------------------------------------------- file formats
# Every flag about how movies are read and written, in one place. They are folded into
# the movie's spec text (`data.spec`: 'rec.h5[axes=YXT]'), which the public API takes
# wherever it takes a path.

FORMATS_HELP = ("Movies: TIFF, HDF5 (file.h5 or file.h5:/dataset), Zarr (.zarr), NWB "
                "(file.nwb or file.nwb:SeriesName), a suite2p plane folder, or "
                "raw:FILE with --raw-shape/--raw-dtype; FORMAT:PATH names the format.")


def _define_formats(fv, output: bool = False) -> None:
  """The input-layout flags (and, for commands that write movies, the output ones)."""
  flags.DEFINE_string("axes", None, "The input file's axis order where its metadata does "
                      "not say it, e.g. YXT, TZYX, TZCYX (T time, Z plane, C channel); "
                      "each plane and channel becomes a movie of its own.", flag_values=fv)
  flags.DEFINE_integer("planes", None, "Planes interleaved frame by frame (ScanImage; "
                       "default: from the file's metadata).", flag_values=fv)
  flags.DEFINE_integer("channels", None, "Channels interleaved frame by frame (ScanImage; "
                       "default: from the file's metadata).", flag_values=fv)
  flags.DEFINE_string("raw-shape", None, "A raw binary input's shape, e.g. 1000x512x512.",
                      flag_values=fv)
  flags.DEFINE_string("raw-dtype", None, "A raw binary input's dtype, e.g. uint16.",
                      flag_values=fv)
  if output:
    flags.DEFINE_string("compression", None, "HDF5/Zarr output compression: gzip, lzf "
                        "(HDF5), zstd, blosc (Zarr) or none (default: none for HDF5, "
                        "zarr's default for Zarr).", flag_values=fv)
    flags.DEFINE_boolean("nwb-acquisition", False, "NWB output: put the denoised series "
                         "under acquisition (where suite2p reads it) instead of "
                         "processing/ophys.", flag_values=fv)


def _movie(fv, name: str) -> str | None:
  """The movie flag `name` with the layout flags folded into its spec."""
  from deepcad_jax.data.spec import MovieSpec
  text = _v(fv, name)
  if text is None:
    return None
  changes = {"axes": _v(fv, "axes"), "planes": _v(fv, "planes"),
             "channels": _v(fv, "channels"), "shape": _v(fv, "raw-shape"),
             "dtype": _v(fv, "raw-dtype")}
  if all(v is None for v in changes.values()):
    return text
  if changes["shape"] is not None:
    changes["shape"] = MovieSpec.parse(f"x[shape={changes['shape']}]").shape
  return str(MovieSpec.parse(text, **changes))


def _output(fv, name: str) -> str | None:
  """The output flag `name` with the output-format flags folded into its spec."""
  from deepcad_jax.data.spec import MovieSpec
  text = _v(fv, name)
  changes = {"compression": _v(fv, "compression"),
             "nwb_group": "acquisition" if _v(fv, "nwb-acquisition") else None}
  if text is None or all(v is None for v in changes.values()):
    return text
  return str(MovieSpec.parse(text, **changes))


# ---------------------------------------------------------------- multi-process


def _define_distributed(fv):
  flags.DEFINE_string("coordinator", None, "Multi-process run: HOST:PORT of process 0.",
                      flag_values=fv)
  flags.DEFINE_integer("num-processes", None, "Multi-process run: number of processes.",
                       flag_values=fv)
  flags.DEFINE_integer("process-id", None, "Multi-process run: this process's index.",
                       flag_values=fv)
  flags.DEFINE_boolean("distributed", False, "Join the multi-process run that SLURM, "
                       "Open MPI or a TPU slice describes (auto-detected by JAX).",
                       flag_values=fv)


def _init_distributed(fv):
  from deepcad_jax.runtime import distributed
  distributed.initialize(_v(fv, "coordinator"), _v(fv, "num-processes"),
                         _v(fv, "process-id"), auto=_v(fv, "distributed"))


# ---------------------------------------------------------------- train


def _define_train(fv):
  flags.DEFINE_string("data", None, "A movie or a folder of movies. " + FORMATS_HELP,
                      flag_values=fv)
  _define_formats(fv)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints); resumed if it holds "
                      "a run.", flag_values=fv)
  flags.DEFINE_string("config", "deepcad_rt", "Config name (deepcad_rt, deepcad, "
                      "ladder:W, tiny, demo) or a .py file.", flag_values=fv)
  _define_config_flags(fv, TRAIN_CONFIG_FLAGS)
  flags.DEFINE_boolean("fresh", False, "Delete the workdir's checkpoints and start over.",
                       flag_values=fv)
  flags.DEFINE_string("init-from", None, "Start from these weights (a model directory or "
                      "a DeepCAD-RT .pth): fine-tuning.", flag_values=fv)
  _define_set(fv)
  _define_distributed(fv)


def _define_set(fv):
  flags.DEFINE_multi_string("set", [], "Override any config field: section.field=value "
                            "(repeatable; e.g. --set train.log_every=50). Applied after "
                            "the other flags.", flag_values=fv)


# The flags of `train` that set a field of the config in use: (flag, field, help). Their
# types and choices come from the config's own fields, so a flag is one line here.
TRAIN_CONFIG_FLAGS = (
    ("patch", "data.patch", "Patch T,Y,X (T input frames from a 2T window)."),
    ("epochs", "train.epochs", "Train until this many epochs are done."),
    ("pairs-per-epoch", "data.pairs_per_epoch", "Training pairs per epoch."),
    ("batch-size", "train.batch_size", "Global batch (a multiple of the device count; 0 = "
     "one per device)."),
    ("seed", "train.seed", "Random seed."),
    ("features", "model.features", "Network width f."),
    ("dtype", "model.dtype", "Compute dtype."),
    ("lr", "train.lr", "Adam learning rate."),
    ("b1", "train.b1", "Adam beta1."),
    ("b2", "train.b2", "Adam beta2."),
    ("workers", "data.workers", "Grain worker processes (0 = none)."),
    ("scale", "data.scale", "Divide intensities by this before the network (DeepCAD-RT's "
     "scale_factor; default 1)."),
    ("keep", "train.keep_checkpoints", "Epoch checkpoints to keep (the latest checkpoint "
     "is always kept too)."),
    ("save-every", "train.save_every", "Minutes between checkpoints within an epoch, so a "
     "kill loses at most this much (0 = only at the end of each epoch)."),
    ("spatial", "parallel.spatial", "Also split each patch's Y axis over this many devices "
     "(mesh: data x space), for patches too large for one."),
    ("ensemble", "model.ensemble", "Train this many models at once (seeds seed, seed+1, "
     "...; same pairs, own augmentation); denoise then averages them and --uncertainty "
     "adds their spread. M times the memory."),
    ("ensemble-impl", "model.ensemble_impl", "How members run in the compiled step: one "
     "after another (loop) or batched (vmap)."),
    ("holdout", "data.holdout", "Frames never trained on, scored every epoch: the last "
     "fraction of each movie (e.g. 0.1) or a range a:b."),
    ("mean-prior", "model.mean_prior", "Give the network the recording's temporal mean "
     "image as a second input channel (stored with the model; denoise and stream use it "
     "automatically)."),
)
CONFIG_CHOICES = {"model.dtype": config_lib.DTYPES,
                  "model.ensemble_impl": config_lib.ENSEMBLE_IMPLS}


def _define_config_flags(fv, table) -> None:
  """One flag per (flag, 'section.field', help), typed like the field's default value;
  None default: the config in use decides (shown by --help)."""
  defaults = config_lib.Config().to_dict()
  for flag, field, help in table:
    section, _, key = field.partition(".")
    value = defaults[section][key]
    if field in CONFIG_CHOICES:
      flags.DEFINE_enum(flag, None, list(CONFIG_CHOICES[field]), help, flag_values=fv)
    elif isinstance(value, bool):
      flags.DEFINE_boolean(flag, None, help, flag_values=fv)
    elif isinstance(value, float) and field != "data.holdout":
      flags.DEFINE_float(flag, None, help, flag_values=fv)
    elif isinstance(value, int):
      flags.DEFINE_integer(flag, None, help, flag_values=fv)
    else:  # tuples (T,Y,X) and fields that also take text
      flags.DEFINE_string(flag, None, help, flag_values=fv)


def _train_config(fv):
  cfg = config_lib.load_config(_v(fv, "config"))
  values = {field: _v(fv, flag) for flag, field, _ in TRAIN_CONFIG_FLAGS}
  values["data.patch"] = _triple(values["data.patch"])
  if values["data.holdout"] is not None:
    values["data.holdout"] = _holdout(values["data.holdout"])
  return config_lib.override_strings(config_lib.override(cfg, **values), _v(fv, "set"))


def _config_arg(args: list[str], default: str) -> str:
  """The --config given on a command line (--config X or --config=X), else `default`."""
  found = default
  for i, a in enumerate(args):
    if a.startswith("--config="):
      found = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(args):
      found = args[i + 1]
  return found


def _train_help_defaults(fv, args: list[str]) -> str:
  name = _config_arg(args, fv["config"].default)
  values = config_lib.load_config(name).to_dict()
  fv.set_default("config", name)
  for flag, field, _ in TRAIN_CONFIG_FLAGS:
    section, _, key = field.partition(".")
    value = values[section][key]
    if isinstance(value, (list, tuple)):
      value = ",".join(map(str, value))
    elif isinstance(fv[flag], flags.Flag) and fv[flag].parser.flag_type() == "string":
      value = None if value is None else str(value)
    fv.set_default(flag, value)
  return (f"Defaults shown are those of --config {name}; a flag given overrides its "
          "config field.")


def _run_train(fv):
  from deepcad_jax.training.loop import train
  _require(fv, "data", "workdir")
  _init_distributed(fv)
  result = train(_movie(fv, "data"), _v(fv, "workdir"), _train_config(fv),
                 fresh=_v(fv, "fresh"), init_from=_v(fv, "init-from"))
  import jax
  if jax.process_index() == 0:  # one report for a run of several processes
    print(result.describe())
  return result.exit_code


# ---------------------------------------------------------------- denoise


def _define_denoise(fv):
  _define_model(fv, step=True, para=True)
  flags.DEFINE_boolean("reference-stitching", False, "Reproduce DeepCAD-RT's stitching "
                       "exactly (its kept regions and per-patch intensity rescale).",
                       flag_values=fv)
  flags.DEFINE_string("input", None, "A movie or a folder of them. " + FORMATS_HELP,
                      flag_values=fv)
  _define_output(fv, "Output movie, in the format its name says (.tif, .h5, .zarr, .nwb, "
                 "suite2p:FOLDER), or a folder (same names and formats as the inputs).",
                 "Replace an existing output.")
  _define_formats(fv, output=True)
  flags.DEFINE_enum("tiling", "auto", ["auto", "exact", "overlap"], "exact: seamless, "
                    "equal to one pass over the whole movie; overlap: DeepCAD-RT's "
                    "overlapping patches (--patch, --overlap); auto: exact unless it costs "
                    "more network voxels than overlap within the memory budget.",
                    flag_values=fv)
  flags.DEFINE_string("tile", None, "Exact tiling: the largest tile T,Y,X (multiples of "
                      "8; default: as large as --memory-budget allows).", flag_values=fv)
  flags.DEFINE_string("patch", None, "Overlap tiling: patch T,Y,X (default: the model's; "
                      "selects overlap tiling under --tiling auto).", flag_values=fv)
  flags.DEFINE_float("overlap", None, "Overlap tiling: overlap factor in [0, 1) (default: "
                     "the model's; selects overlap tiling under --tiling auto).",
                     flag_values=fv)
  flags.DEFINE_integer("batch-size", 0, "Tiles per device call (0 = one per device).",
                       flag_values=fv)
  flags.DEFINE_string("output-dtype", None, "Output dtype: float32 (default: the "
                      "network's precision), input (the input's type, rounded), uint16, "
                      "int16...", flag_values=fv)
  _define_dtype(fv)
  flags.DEFINE_boolean("blend", False, "Overlap tiling: blend overlaps with linear weights "
                       "instead of cropping.", flag_values=fv)
  _define_run_settings(fv)
  _define_distributed(fv)


def _denoise_config(fv):
  """The `DenoiseConfig` of the denoise flags present in `fv` (checked there)."""
  from deepcad_jax.config import DenoiseConfig
  names = {"patch": "patch", "overlap": "overlap", "batch_size": "batch-size",
           "dtype": "dtype", "tiling": "tiling", "tile": "tile",
           "memory_budget": "memory-budget", "blend": "blend",
           "reference_stitching": "reference-stitching", "spatial": "spatial",
           "symmetries": "uncertainty", "save_samples": "save-samples"}
  values = {field: _v(fv, flag) for field, flag in names.items() if flag in fv}
  for field in ("patch", "tile"):
    if values.get(field) is not None:
      values[field] = _triple(values[field], "--" + field)
  return DenoiseConfig(**{k: v for k, v in values.items() if v is not None})


def _run_denoise(fv):
  from deepcad_jax.model_io.loading import load_model
  from deepcad_jax.denoising.denoiser import denoise_files
  _require(fv, "model", "input", "output")
  _init_distributed(fv)
  config = _denoise_config(fv)
  model = load_model(_v(fv, "model"), _v(fv, "step"), para=_v(fv, "para"))
  reports = denoise_files(_movie(fv, "input"), _output(fv, "output"), model, config,
                          overwrite=_v(fv, "overwrite"),
                          output_dtype=_v(fv, "output-dtype"))
  for r in reports:
    print(r.describe())
  return 0


# ---------------------------------------------------------------- convert


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
  out = convert(_v(fv, "pth"), _v(fv, "output"), _v(fv, "para"), _v(fv, "overwrite"))
  print(describe(load_model(out), out))
  return 0


# ---------------------------------------------------------------- export


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
  from deepcad_jax.model_io.export import export
  _require(fv, "model", "format", "output")
  fmt = _v(fv, "format")
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


# ---------------------------------------------------------------- simulate


def _define_simulate(fv):
  _define_output(fv, "Folder for noisy.tif, clean.tif and info.json.",
                 "Replace existing files.")
  flags.DEFINE_enum("format", "tiff", ["tiff", "hdf5", "zarr", "nwb", "suite2p"],
                    "Format of noisy and clean (noisy.tif, .h5, .zarr, .nwb; suite2p: "
                    "plane folders noisy/ and clean/, int16).", flag_values=fv)
  flags.DEFINE_string("shape", "300,128,128", "Movie shape T,Y,X.", flag_values=fv)
  flags.DEFINE_float("snr", -2.0, "Target SNR of the noisy movie (dB).", flag_values=fv)
  flags.DEFINE_integer("neurons", None, "Number of neurons (default: by area).",
                       flag_values=fv)
  flags.DEFINE_integer("vessels", 1, "Number of blood vessels.", flag_values=fv)
  flags.DEFINE_float("frame-rate", 30.0, "Frame rate (Hz).", flag_values=fv)
  flags.DEFINE_float("spike-rate", 0.3, "Mean spike rate per neuron (Hz).", flag_values=fv)
  flags.DEFINE_float("tau-rise", 0.05, "Calcium rise time (s).", flag_values=fv)
  flags.DEFINE_float("tau-decay", 0.4, "Calcium decay time (s).", flag_values=fv)
  flags.DEFINE_float("read-noise", 1.0, "Gaussian read noise (photons).", flag_values=fv)
  flags.DEFINE_float("neuropil-coupling", 0.5, "How much the neuropil follows population "
                     "activity (0: constant background, for the wobble metric).",
                     flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)
  

def _run_simulate(fv):
  from deepcad_jax.analysis.simulate import describe as simulation_report, write_simulation
  _require(fv, "output")
  shape = _triple(_v(fv, "shape"), "--shape")
  info = write_simulation(
      _v(fv, "output"), overwrite=_v(fv, "overwrite"), shape=shape, snr_db=_v(fv, "snr"),
      movie_format=_v(fv, "format"),
      neurons=_v(fv, "neurons"), vessels=_v(fv, "vessels"),
      frame_rate=_v(fv, "frame-rate"), spike_rate=_v(fv, "spike-rate"),
      tau_rise=_v(fv, "tau-rise"), tau_decay=_v(fv, "tau-decay"),
      read_noise=_v(fv, "read-noise"), neuropil_coupling=_v(fv, "neuropil-coupling"),
      seed=_v(fv, "seed"))
  print(simulation_report(info))
  return 0


# ---------------------------------------------------------------- evaluate


def _define_evaluate(fv):
  flags.DEFINE_string("denoised", None, "The movie to score.", flag_values=fv)
  _define_formats(fv)
  flags.DEFINE_string("reference", None, "Ground truth (e.g. clean.tif).", flag_values=fv)
  flags.DEFINE_string("raw", None, "Optional noisy input, scored too.", flag_values=fv)
  _define_output(fv, "Write the results as JSON here.", overwrite=None)
  flags.DEFINE_string("std", None, "The *_std.tif of 'denoise --uncertainty': report its "
                      "calibration.", flag_values=fv)
  flags.DEFINE_string("uncertainty", None, "Deprecated: the old name of --std (kept for "
                      "one release).", flag_values=fv)


def _run_evaluate(fv):
  from deepcad_jax.analysis.metrics import describe, evaluate_files
  _require(fv, "denoised", "reference")
  std = _v(fv, "std")
  if _v(fv, "uncertainty") is not None:
    if std is not None:
      raise UserError("give the std file once, with --std (--uncertainty is its old name).")
    log.warning("evaluate --uncertainty FILE is deprecated; use --std FILE (the same file). "
                "--uncertainty will take a number of samples, as in the other commands.")
    std = _v(fv, "uncertainty")
  results = evaluate_files(_movie(fv, "denoised"), _movie(fv, "reference"),
                           _movie(fv, "raw"), std, _v(fv, "output"))
  print(describe(results, _v(fv, "output")))
  return 0


# ---------------------------------------------------------------- traces


def _define_traces(fv):
  _define_formats(fv)
  flags.DEFINE_string("rois", None, "ROIs: a label TIFF (0 = background), a JSON of "
                      "polygons/masks/pixels, or suite2p's stat.npy.", flag_values=fv)
  _define_output(fv, "Folder for traces.csv, traces.json, traces.png.",
                 "Replace existing results.")
  flags.DEFINE_string("movie", None, "The denoised movie (the samples' mean).",
                      flag_values=fv)
  flags.DEFINE_string("samples", None, "Sample movies for the band: comma-separated files "
                      "or a glob, e.g. 'den_sample*.tif' (from denoise --save-samples).",
                      flag_values=fv)
  flags.DEFINE_string("raw", None, "The raw movie (plotted; with --model, denoised here).",
                      flag_values=fv)
  flags.DEFINE_string("model", None, "Instead of --movie/--samples: denoise --raw with "
                      "this model and keep only the samples' traces.", flag_values=fv)
  flags.DEFINE_integer("uncertainty", 8, "With --model: test-time symmetries K (times the "
                       "ensemble's members) giving the samples.", flag_values=fv)
  flags.DEFINE_string("f0", "percentile:8", "Baseline of dF/F: 'percentile:P' or 'mean'.",
                      flag_values=fv)
  flags.DEFINE_string("band", "5,95", "Percentiles across samples that bound the band.",
                      flag_values=fv)
  flags.DEFINE_integer("plot-rois", 12, "ROIs drawn in traces.png (the first N).",
                       flag_values=fv)
  flags.DEFINE_float("frame-rate", None, "Frames per second, for a time axis in seconds.",
                     flag_values=fv)
  

def _run_traces(fv):
  from deepcad_jax.analysis.traces import trace_files
  _require(fv, "rois", "output")
  r = trace_files(_v(fv, "rois"), _v(fv, "output"), movie=_movie(fv, "movie"),
                  samples=_v(fv, "samples") or (), raw=_movie(fv, "raw"), model=_v(fv, "model"),
                  symmetries=_v(fv, "uncertainty"), f0=_v(fv, "f0"), band=_v(fv, "band"),
                  plot_rois=_v(fv, "plot-rois"), frame_rate=_v(fv, "frame-rate"),
                  overwrite=_v(fv, "overwrite"))
  print(r.describe())
  return 0


# ---------------------------------------------------------------- events


def _define_events(fv):
  flags.DEFINE_string("raw", None, "The raw (noisy) movie.", flag_values=fv)
  _define_formats(fv)
  flags.DEFINE_string("denoised", None, "Its denoised version.", flag_values=fv)
  _define_output(fv, "Folder for z_map.tif, events.csv, events.json.",
                 "Replace existing results.")
  flags.DEFINE_float("threshold", 6.0, "Standardised excess (z) that flags an event.",
                     flag_values=fv)
  flags.DEFINE_string("box", "3,5,5", "Averaging box T,Y,X.", flag_values=fv)
  

def _run_events(fv):
  from deepcad_jax.analysis.events import check_files
  _require(fv, "raw", "denoised", "output")
  report = check_files(_movie(fv, "raw"), _movie(fv, "denoised"), _v(fv, "output"),
                       _v(fv, "threshold"), _triple(_v(fv, "box"), "--box"),
                       _v(fv, "overwrite"))
  print(report.describe())
  return 0


# ---------------------------------------------------------------- calibrate


def _define_calibrate(fv):
  flags.DEFINE_string("model", None, "Model directory to calibrate.", flag_values=fv)
  flags.DEFINE_string("noisy", None, "A noisy movie with known ground truth.", flag_values=fv)
  flags.DEFINE_string("clean", None, "Its ground truth (e.g. from simulate).", flag_values=fv)
  flags.DEFINE_integer("uncertainty", 8, "Test-time symmetries K, as for denoise.",
                       flag_values=fv)
  flags.DEFINE_boolean("overwrite", False, "Replace the model's calibration.json.",
                       flag_values=fv)
  flags.DEFINE_boolean("accept-uncorrelated", False, "Store the scale even when the std "
                       "does not track the error (correlation below 0.1); with a warning.",
                       flag_values=fv)


def _run_calibrate(fv):
  from deepcad_jax.analysis.calibrate import calibrate, describe as calibration_report
  _require(fv, "model", "noisy", "clean")
  record = calibrate(_v(fv, "model"), _v(fv, "noisy"), _v(fv, "clean"),
                     _v(fv, "uncertainty"), overwrite=_v(fv, "overwrite"),
                     accept_uncorrelated=_v(fv, "accept-uncorrelated"))
  print(calibration_report(record, _v(fv, "model")))
  return 0


# ---------------------------------------------------------------- demo


def _define_demo(fv):
  flags.DEFINE_string("workdir", "deepcad-jax-demo", "Folder for the demo's files.",
                      flag_values=fv)
  flags.DEFINE_boolean("quick", False, "A much shorter run (for tests).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)
  flags.DEFINE_boolean("overwrite", False, "Reuse a workdir that holds an earlier demo.",
                       flag_values=fv)


def _run_demo(fv):
  from deepcad_jax.cli.demo import run_demo
  run_demo(_v(fv, "workdir"), quick=_v(fv, "quick"), seed=_v(fv, "seed"),
           overwrite=_v(fv, "overwrite"))
  return 0


# ---------------------------------------------------------------- stream


def _define_stream(fv):
  flags.DEFINE_string("model", None, "Model directory or DeepCAD-RT .pth.", flag_values=fv)
  flags.DEFINE_string("source", None, "A TIFF to replay, or a folder to watch for TIFFs "
                      "dropped by the acquisition program (ends on a file named STOP).",
                      flag_values=fv)
  _define_output(fv, "Denoised movie, in the format its name says (the raw frames go "
                 "beside it, *_raw).", "Replace existing outputs.")
  _define_formats(fv, output=True)
  flags.DEFINE_float("rate", 30.0, "Replay rate in frames/s (0 = as fast as possible).",
                     flag_values=fv)
  flags.DEFINE_enum("tiling", None, ["exact", "overlap"], "exact (default): every frame "
                    "equals offline exact denoising; overlap: DeepCAD-RT's batches "
                    "(--batch-frames, --overlap-frames; chosen when either is given).",
                    flag_values=fv)
  flags.DEFINE_integer("core-frames", None, "Exact: frames completed per device call (a "
                       "multiple of 8; default 32). Fewer: lower latency, more compute.",
                       flag_values=fv)
  flags.DEFINE_integer("lookahead", None, "Exact: future frames each frame waits for (a "
                       "multiple of 8, default 48 = the network's halo: exact). Less lowers "
                       "the latency and is no longer exact.", flag_values=fv)
  flags.DEFINE_integer("batch-frames", None, "Overlap: frames per temporal batch (default: "
                       "the model's patch T).", flag_values=fv)
  flags.DEFINE_integer("overlap-frames", None, "Overlap: frames shared by consecutive "
                       "batches (default: from the model's overlap).", flag_values=fv)
  flags.DEFINE_enum("policy", "block", ["block", "drop"], "When processing falls behind: "
                    "block acquisition (no frame lost) or drop frames (counted).",
                    flag_values=fv)
  flags.DEFINE_string("mean", "model", "Normalisation: 'model' (training mean), "
                      "'running', or a number.", flag_values=fv)
  flags.DEFINE_string("mean-image", None, "For a model trained with --mean-prior: the "
                      "mean image to give it (a 2-D TIFF, or a movie whose temporal mean is "
                      "used); default: the running mean of the frames seen so far.",
                      flag_values=fv)
  flags.DEFINE_float("preview-every", 5.0, "Seconds between preview PNGs (0 = none).",
                     flag_values=fv)
  flags.DEFINE_float("idle-timeout", 10.0, "Folder source: end after this many seconds "
                     "without a new file.", flag_values=fv)
  flags.DEFINE_integer("batch-size", 0, "Patches per device call.", flag_values=fv)
  _define_dtype(fv)
  _define_run_settings(fv)
  flags.DEFINE_string("output-dtype", "float32", "Denoised output dtype: float32, input "
                      "(the source's type, rounded), uint16...", flag_values=fv)
  flags.DEFINE_boolean("live", False, "Show raw and denoised side by side in a window "
                       "(needs a display and matplotlib; headless: preview images).",
                       flag_values=fv)


def _run_stream(fv):
  from deepcad_jax.model_io.loading import load_model
  from deepcad_jax.data.movie import read_mean_image, refuse_to_overwrite
  from deepcad_jax.denoising.denoiser import Denoiser
  from deepcad_jax.stream import (ReplaySource, StreamDenoiser, open_source, raw_path,
                                  run_pipeline)
  _require(fv, "model", "source", "output")
  output = _output(fv, "output")
  raw = raw_path(output)
  refuse_to_overwrite((output, raw), _v(fv, "overwrite"))
  source = open_source(_movie(fv, "source"), _v(fv, "rate"), _v(fv, "idle-timeout"))
  image = _v(fv, "mean-image")
  den = Denoiser(load_model(_v(fv, "model")), _denoise_config(fv))
  refuse_to_overwrite(den.extra_outputs(output), _v(fv, "overwrite"))
  stream = StreamDenoiser(den, _v(fv, "batch-frames"), _v(fv, "overlap-frames"),
                          tiling=_v(fv, "tiling"), core_frames=_v(fv, "core-frames"),
                          lookahead=_v(fv, "lookahead"), mean=_v(fv, "mean"),
                          mean_image=read_mean_image(image) if image else None)
  view, preview_every = None, _v(fv, "preview-every")
  if _v(fv, "live"):
    from deepcad_jax.stream import LiveView, display_available
    if display_available():
      view = LiveView()
    else:
      preview_every = preview_every or 5.0
      print(f"no display: writing preview images every {preview_every:g} s instead of a "
            "live window.")
  r = run_pipeline(source, stream, output, policy=_v(fv, "policy"), raw_output=raw,
                   rate=_v(fv, "rate") if isinstance(source, ReplaySource) else 0.0,
                   output_dtype=_v(fv, "output-dtype"), preview_every_s=preview_every,
                   on_output=view.update if view else None,
                   on_idle=view.draw if view else None, overwrite=_v(fv, "overwrite"))
  print(r.describe())
  return 0


# ---------------------------------------------------------------- prune


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
  model = load_model(_v(fv, "model"))
  pruned, r = prune(model, _v(fv, "keep"), _v(fv, "criterion"), _v(fv, "data"),
                    _v(fv, "batches"))
  out = save_model(pruned, _v(fv, "output"), _v(fv, "overwrite"))
  print(r.describe(out))
  return 0


# ---------------------------------------------------------------- ladder


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


def _holdout(text: str):
  try:
    return float(text)
  except ValueError:
    return text


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


# ---------------------------------------------------------------- score


def _define_score(fv):
  _define_model(fv, "Model directory or .pth.", step=True)
  flags.DEFINE_string("movie", None, "A movie (TIFF).", flag_values=fv)
  flags.DEFINE_string("frames", None, "Frames a:b to score (frames training never saw; "
                      "e.g. -100: for the last 100; default all).", flag_values=fv)
  _define_dtype(fv)


def _run_score(fv):
  from deepcad_jax.model_io.loading import load_model
  from deepcad_jax.data.movie import open_movie
  from deepcad_jax.denoising.denoiser import Denoiser
  from deepcad_jax.analysis.score import parse_frames, score
  _require(fv, "model", "movie")
  movie = open_movie(_v(fv, "movie"))
  frames = parse_frames(_v(fv, "frames"), movie.shape[0], movie.name)
  den = Denoiser(load_model(_v(fv, "model"), _v(fv, "step")), dtype=_v(fv, "dtype"))
  print(score(den, movie, frames).describe(den.model.source))
  return 0


# ---------------------------------------------------------------- bench


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
  from deepcad_jax.bench import workloads as bench
  records = bench.run_workload(_v(fv, "workload"), _v(fv, "dtype"), _v(fv, "batch-size"),
                               _v(fv, "repeats"), _v(fv, "features"), _v(fv, "torch"),
                               _triple(_v(fv, "movie"), "--movie"), _triple(_v(fv, "patch")),
                               _v(fv, "spatial"), _widths(_v(fv, "widths")))
  print(bench.write_results(records, _v(fv, "output")))
  return 0


# ---------------------------------------------------------------- dispatch


COMMANDS = {c.name: c for c in [
    Command("demo", "simulate a movie, train, denoise and score it (start here)",
            _define_demo, _run_demo, "deepcad-jax demo"),
    Command("train", "train on a TIFF movie or folder (resumes an existing --workdir)",
            _define_train, _run_train,
            "deepcad-jax train --data movies/ --workdir runs/rt --epochs 10",
            help_defaults=_train_help_defaults),
    Command("denoise", "denoise a TIFF movie or folder with a trained model",
            _define_denoise, _run_denoise,
            "deepcad-jax denoise --model runs/rt --input movie.tif --output den.tif"),
    Command("traces", "ROI traces and dF/F with confidence bands from uncertainty samples",
            _define_traces, _run_traces,
            "deepcad-jax traces --movie den.tif --samples 'den_sample*.tif' --raw movie.tif "
            "--rois rois.json --output traces/"),
    Command("events", "find where denoising removed more than noise (rare events)",
            _define_events, _run_events,
            "deepcad-jax events --raw movie.tif --denoised den.tif --output check/"),
    Command("calibrate", "fit the uncertainty scale of a model on data with ground truth",
            _define_calibrate, _run_calibrate,
            "deepcad-jax calibrate --model runs/rt --noisy sim/noisy.tif --clean "
            "sim/clean.tif"),
    Command("convert", "import a DeepCAD-RT PyTorch model (.pth) as a model directory",
            _define_convert, _run_convert,
            "deepcad-jax convert --pth E_10_Iter_6000.pth --output models/rt"),
    Command("export", "write a model for DeepCAD-RT (.pth), ONNX Runtime/TensorRT (.onnx) "
            "or the BioImage Model Zoo (.zip)", _define_export, _run_export,
            "deepcad-jax export --model runs/rt --format onnx --output rt.onnx"),
    Command("stream", "denoise a live frame stream (replayed TIFF or watched folder)",
            _define_stream, _run_stream,
            "deepcad-jax stream --model runs/rt --source movie.tif --output live.tif "
            "--rate 30"),
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
    Command("score", "held-out self-supervised score of a model on frames it never saw",
            _define_score, _run_score,
            "deepcad-jax score --model runs/rt --movie movie.tif --frames -300:"),
    Command("simulate", "write a synthetic calcium movie with its ground truth",
            _define_simulate, _run_simulate,
            "deepcad-jax simulate --output sim/ --shape 300,128,128 --snr -2"),
    Command("evaluate", "score a denoised movie against a reference (SNR, correlations)",
            _define_evaluate, _run_evaluate,
            "deepcad-jax evaluate --denoised den.tif --reference sim/clean.tif"),
]}


def _require(fv, *names):
  missing = [n for n in names if fv[n].value is None]
  if missing:
    raise UserError(f"missing required flag(s): {', '.join('--' + n for n in missing)}.")


def version() -> str:
  """'deepcad-jax X (jax Y, jaxlib Z, Python P)': what a bug report needs."""
  def installed(name: str) -> str:
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return "not installed"
  return (f"deepcad-jax {__version__} (jax {installed('jax')}, jaxlib "
          f"{installed('jaxlib')}, Python {platform.python_version()})")


def usage() -> str:
  lines = ["usage: deepcad-jax COMMAND [--flags]", "       deepcad-jax --version", "",
           "commands:"]
  lines += [f"  {c.name:<10} {c.summary}" for c in COMMANDS.values()]
  lines += ["", "'deepcad-jax COMMAND --help' lists a command's flags.", "", "examples:"]
  lines += [f"  {c.example}" for c in COMMANDS.values()]
  return "\n".join(lines)


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever sys.stderr is at the time (it may be replaced after set-up)."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    pass


def _setup_logging() -> None:
  # Orbax and grain are chatty, and log failures they also raise (a full disk) with
  # tracebacks, from each of their threads and abandoned asyncio tasks: the command
  # reports the failure in one line.
  absl_logging.set_verbosity(absl_logging.FATAL)
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  logger = logging.getLogger("deepcad_jax")
  if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname).1s %(asctime)s %(message)s",
                                           "%H:%M:%S"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False


def _terminate(signum, frame):
  raise Terminated()


def _raise_on_sigterm() -> Callable[[], None]:
  """SIGTERM unwinds like Ctrl-C (clean-ups run; exit 143); returns what undoes it."""
  if threading.current_thread() is not threading.main_thread():
    return lambda: None
  previous = signal.signal(signal.SIGTERM, _terminate)
  return lambda: signal.signal(signal.SIGTERM, previous if previous is not None
                               else signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the `deepcad-jax` console script; returns the exit status."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    return 0
  if argv[1] in ("--version", "-V", "version"):
    print(version())
    return 0
  name = argv[1]
  if name not in COMMANDS:
    print(f"error: unknown command {name!r}.\n\n{usage()}", file=sys.stderr)
    return 2
  command = COMMANDS[name]
  fv = flags.FlagValues()
  command.define(fv)
  if any(a in ("-h", "--help", "-help") for a in argv[2:]):
    note = ""
    if command.help_defaults is not None:
      try:
        note = command.help_defaults(fv, argv[2:]) + "\n\n"
      except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"usage: deepcad-jax {name} [--flags]\n\n{command.summary}\n\n"
          f"example: {command.example}\n\n{note}{fv.get_help()}")
    return 0
  try:
    rest = fv([f"deepcad-jax {name}"] + argv[2:])
  except flags.Error as e:
    print(f"error: {e}. See 'deepcad-jax {name} --help'.", file=sys.stderr)
    return 2
  if len(rest) > 1:
    print(f"error: unexpected argument(s) {rest[1:]}; every input is a --flag. See "
          f"'deepcad-jax {name} --help'.", file=sys.stderr)
    return 2
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
  _setup_logging()
  restore_sigterm = _raise_on_sigterm()
  try:
    return int(command.run(fv) or 0)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Terminated:
    print("terminated (SIGTERM).", file=sys.stderr)
    return 128 + signal.SIGTERM
  except KeyboardInterrupt:
    print("interrupted.", file=sys.stderr)
    return 128 + signal.SIGINT
  finally:
    restore_sigterm()


def _quiet_unraisable(unraisable) -> None:
  """Errors Python can only ignore (callbacks of a library's threads that outlive a
  failure, e.g. Orbax's after a failed save) go to the debug log, not the terminal."""
  log.debug("ignored %s: %s", unraisable.exc_type.__name__, unraisable.exc_value)


def entry() -> None:
  sys.unraisablehook = _quiet_unraisable
  # The coroutines a library abandoned on a failure it raised (Orbax's writers after a
  # failed save) are reported again at exit: the failure has had its sentence.
  warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
  try:
    sys.exit(main())
  except BrokenPipeError:  # output piped into a command that stopped reading (head)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)
