"""Shared pieces of the commands: the `Command` record and the flag groups several
commands define (model, output, dtype, run settings, file formats, several processes).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from absl import flags

from deepcad_jax import config as config_lib
from deepcad_jax.errors import UserError


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


def uncertainty_mode(fv) -> str | int:
  """--uncertainty as 'calibrated' or a number of symmetries K (0: off)."""
  text = str(_v(fv, "uncertainty") if "uncertainty" in fv else "0").strip().lower()
  if text == "calibrated":
    return text
  try:
    return int(text)
  except ValueError:
    raise UserError(f"--uncertainty takes 'calibrated' or a number of symmetries K; got "
                    f"{text!r}.") from None


def _define_bootstrap(fv):
  """The calibrated uncertainty's flags (denoise, traces)."""
  flags.DEFINE_integer("draws", config_lib.UNCERTAINTY_DRAWS, "With --uncertainty "
                       "calibrated: bootstrap draws (one network pass each).",
                       flag_values=fv)
  flags.DEFINE_integer("bias-probes", config_lib.UNCERTAINTY_BIAS_PROBES, "With "
                       "--uncertainty calibrated: network passes that tell the "
                       "estimator's bias from the estimate's own error in the draws' mean "
                       "deviation (at most --draws / 2; 0 keeps the mean deviation whole).",
                       flag_values=fv)


def _define_run_settings(fv):
  """The `DenoiseConfig` flags that offline denoising and the stream share."""
  flags.DEFINE_string("memory-budget", None, "Exact tiling: memory per device for tiles, "
                      "e.g. 8GB (default: 80% of an accelerator's memory, 40% of RAM on "
                      "a CPU).", flag_values=fv)
  flags.DEFINE_integer("spatial", 1, "Also split each tile's Y axis over this many "
                       "devices.", flag_values=fv)
  flags.DEFINE_string("uncertainty", "0", "'calibrated' (recommended): the error std "
                      "of every voxel from a bootstrap of the recording's own noise model, "
                      "checked on held-out frames (docs/trust.md), written beside the "
                      "output (*_std.tif, *_uncertainty.json); --draws + --bias-probes + 1 "
                      "more network passes. Or K in 2..8 (1..8 for an ensemble): the spread of K "
                      "symmetries of the (y, x) plane (too narrow for an error bar).",
                      flag_values=fv)
  _define_bootstrap(fv)
  flags.DEFINE_boolean("save-samples", False, "With --uncertainty: also write every sample "
                       "(*_sample00.tif, ...; float32), e.g. for 'deepcad-jax traces'; "
                       "calibrated: plausible truths whose spread is the error.",
                       flag_values=fv)


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


def _require(fv, *names):
  missing = [n for n in names if fv[n].value is None]
  if missing:
    raise UserError(f"missing required flag(s): {', '.join('--' + n for n in missing)}.")


def _holdout(text: str):
  try:
    return float(text)
  except ValueError:
    return text


def _define_set(fv):
  flags.DEFINE_multi_string("set", [], "Override any config field: section.field=value "
                            "(repeatable; e.g. --set train.log_every=50). Applied after "
                            "the other flags.", flag_values=fv)


def _given(fv, name: str, kind: str = "movie", path: str | None = None
           ) -> tuple[str, str, str] | None:
  """(--name, what the user gave, the path it really names) for
  `runtime.files.refuse_output_is_input`: a movie spec's file, a model directory's
  checkpoints folder (kind 'model'), or the path itself ('file'); None if not given.
  `path` stands for the flag's value (an output derived from it, e.g. *_raw.tif)."""
  text = path if path is not None else (fv[name].value if name in fv else None)
  if not text:
    return None
  compared = text
  if kind == "model" and os.path.isdir(text):
    from deepcad_jax.model_io.checkpoint import checkpoint_dir
    compared = checkpoint_dir(text)
  elif kind == "movie":
    from deepcad_jax.data.spec import MovieSpec
    try:
      compared = MovieSpec.parse(text).path
    except UserError:
      compared = text
  return "--" + name, text, compared


def _refuse_output_is_input(outputs, inputs) -> None:
  """`runtime.files.refuse_output_is_input` over `_given` entries (None: not given)."""
  from deepcad_jax.runtime.files import refuse_output_is_input
  refuse_output_is_input([o for o in outputs if o], [i for i in inputs if i])
