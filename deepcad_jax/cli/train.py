"""`deepcad-jax train` (a config, --set overrides and the flags that mirror the config)
and `deepcad-jax demo`.
"""

from __future__ import annotations


from absl import flags

from deepcad_jax import config as config_lib
from deepcad_jax.cli.flags import (FORMATS_HELP, Command, _define_distributed,
                                   _define_formats, _define_set, _holdout,
                                   _init_distributed, _movie, _require, _triple, _v)


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
  flags.DEFINE_boolean("require-gain", False, "Exit with code 3 unless the final model "
                       "beats every baseline of the held-out score (for scripts).",
                       flag_values=fv)
  _define_set(fv)
  _define_distributed(fv)


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
    ("normalise", "data.normalise", "spread: each movie's own mean and robust spread "
     "(works in any units); fixed: subtract the mean and divide by --scale, as "
     "DeepCAD-RT."),
    ("scale", "data.scale", "With --normalise fixed: divide intensities by this before "
     "the network (DeepCAD-RT's scale_factor)."),
    ("loss", "train.loss", "l2: mean squared error (keeps the brightness); deepcad: "
     "DeepCAD-RT's 0.5 L1 + 0.5 L2, to reproduce it."),
    ("lr-schedule", "train.lr_schedule", "constant (the paper) or cosine (decays to 5% "
     "of --lr over the run)."),
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
                  "model.ensemble_impl": config_lib.ENSEMBLE_IMPLS,
                  "data.normalise": config_lib.NORMALISE_MODES,
                  "train.loss": config_lib.LOSSES,
                  "train.lr_schedule": config_lib.LR_SCHEDULES}


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
                 fresh=_v(fv, "fresh"), init_from=_v(fv, "init-from"),
                 require_gain=_v(fv, "require-gain"))
  import jax
  if jax.process_index() == 0:  # one report for a run of several processes
    print(result.describe())
  return result.exit_code


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


COMMANDS = [
    Command("demo", "simulate a movie, train, denoise and score it (start here)",
            _define_demo, _run_demo, "deepcad-jax demo"),
    Command("train", "train on a TIFF movie or folder (resumes an existing --workdir)",
            _define_train, _run_train,
            "deepcad-jax train --data movies/ --workdir runs/rt --epochs 10",
            help_defaults=_train_help_defaults),
]
