"""Configuration as data: frozen, validated dataclasses and the named configs.

A config has four sections (model, data, train, infer). Named configs are the
modules beside this one in `deepcad_jax/config/` (`demo.py`, `ladder.py`, ...); each exposes
`get_config(arg=None)`. `load_config("ladder:32")` or `load_config("my_config.py:arg")`
resolves one; `override` applies CLI flags; `from_dict` restores a saved config and
rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
from typing import Any, Mapping, Sequence

from deepcad_jax.errors import UserError, check_number, check_seed

Patch = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  features: int = 16           # f: widths f, 2f, 4f, 8f (16 = DeepCAD-RT, 64 = DeepCAD)
  dtype: str = "float32"       # compute dtype: float32 or bfloat16 (params stay float32)
  mean_prior: bool = False     # second input channel: the recording's temporal mean image
  ensemble: int = 1            # members trained together (different seeds); >1 stacks
                               # their parameters on a leading axis
  ensemble_impl: str = "loop"  # how members run in one compiled step: "loop" (one after
                               # another) or "vmap" (batched; grouped convolutions)
  widths: tuple[int, ...] | None = None  # output channels of each 3x3x3 conv (14, in
                               # model.LAYERS order), e.g. after pruning; None: those of
                               # `features` (f, 2f, 4f, 8f)

  @property
  def in_channels(self) -> int:
    return 2 if self.mean_prior else 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
  patch: Patch = (144, 144, 144)  # (pt, py, px): pt input frames from a 2*pt window
  pairs_per_epoch: int = 4000     # training pairs drawn per epoch, spread over all files
  workers: int = 2                # grain worker processes (0 = read in this process)
  normalise: str = "spread"       # "spread": each movie's own mean and robust spread
                                  # (independent of the recording's units); "fixed":
                                  # the mean and `scale` (DeepCAD-RT's scale_factor)
  scale: float = 1.0              # with normalise="fixed": intensities minus the mean
                                  # are divided by this before the network
  holdout: float | str = 0.0      # frames never trained on, scored every epoch: the last
                                  # fraction of each movie (0.1), or a range 'a:b'; 0: none


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  epochs: int = 10
  loss: str = "l2"             # "l2": mean squared error (unbiased brightness);
                               # "deepcad": 0.5 L1 + 0.5 L2, DeepCAD-RT's (losses.py)
  batch_size: int = 0          # global batch; 0 = one pair per device (the reference)
  lr: float = 5e-5             # the paper's Adam settings
  lr_schedule: str = "constant"  # "constant" (the paper), or "cosine": decays to 5% of
                               # lr over the run's epochs
  b1: float = 0.5
  b2: float = 0.9
  seed: int = 0
  keep_checkpoints: int = 3    # epoch checkpoints kept (the latest checkpoint always is)
  log_every: int = 10          # steps between progress lines
  save_every: float = 5.0      # minutes between checkpoints within an epoch (0: epochs only)


@dataclasses.dataclass(frozen=True)
class InferConfig:
  patch: Patch | None = None   # None: the training patch (any size >= 8; e.g. 150^3)
  overlap: float = 0.4         # fraction of a patch shared with its neighbour
  batch_size: int = 0          # patches per device call; 0 = one per device


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  spatial: int = 1             # devices that split each patch's Y axis (mesh: data x space)


@dataclasses.dataclass(frozen=True)
class Config:
  name: str = "custom"
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  infer: InferConfig = InferConfig()
  parallel: ParallelConfig = ParallelConfig()

  def __post_init__(self):
    validate(self)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
            "infer": InferConfig, "parallel": ParallelConfig}
DTYPES = ("float32", "bfloat16")
NORMALISE_MODES = ("spread", "fixed")  # normalise.MODES
LOSSES = ("l2", "deepcad")             # losses.LOSSES
LR_SCHEDULES = ("constant", "cosine")
CONV_LAYERS = 14  # 3x3x3 convolutions of the 4-level U-Net (model.LAYERS)
ENSEMBLE_IMPLS = ("loop", "vmap")


def validate_patch(patch: Patch, what: str = "patch") -> None:
  """A patch is three positive multiples of 8 (every pooling level stays exact)."""
  if len(patch) != 3 or any(int(p) != p or p <= 0 or p % 8 for p in patch):
    raise UserError(
        f"{what} must be three positive multiples of 8 as T,Y,X (e.g. 32,64,64); "
        f"got {tuple(patch)}.")


def validate(cfg: Config) -> None:
  if cfg.model.features < 1:
    raise UserError(f"model.features must be at least 1; got {cfg.model.features}.")
  if cfg.model.dtype not in DTYPES:
    raise UserError(f"model.dtype must be one of {DTYPES}; got {cfg.model.dtype!r}.")
  if cfg.model.ensemble < 1:
    raise UserError(f"model.ensemble must be at least 1; got {cfg.model.ensemble}.")
  if cfg.model.widths is not None and (
      len(cfg.model.widths) != CONV_LAYERS or any(int(w) != w or w < 1
                                                  for w in cfg.model.widths)):
    raise UserError(f"model.widths must be {CONV_LAYERS} positive integers (one per 3x3x3 "
                    f"convolution) or None; got {cfg.model.widths}.")
  if cfg.model.ensemble_impl not in ENSEMBLE_IMPLS:
    raise UserError(f"model.ensemble_impl must be one of {ENSEMBLE_IMPLS}; got "
                    f"{cfg.model.ensemble_impl!r}.")
  validate_patch(cfg.data.patch, "data.patch")
  if cfg.infer.patch is not None and (len(cfg.infer.patch) != 3 or
                                      min(cfg.infer.patch) < 8):
    raise UserError("infer.patch must be three sizes of at least 8 as T,Y,X (multiples "
                    f"of 8 are fastest); got {tuple(cfg.infer.patch)}.")
  if not 0.0 <= cfg.infer.overlap < 1.0:
    raise UserError(f"infer.overlap must be in [0, 1); got {cfg.infer.overlap}.")
  for name, value in (("data.pairs_per_epoch", cfg.data.pairs_per_epoch),
                      ("train.epochs", cfg.train.epochs),
                      ("train.keep_checkpoints", cfg.train.keep_checkpoints),
                      ("train.log_every", cfg.train.log_every)):
    if value < 1:
      raise UserError(f"{name} must be at least 1; got {value}.")
  if cfg.parallel.spatial < 1:
    raise UserError(f"parallel.spatial must be at least 1; got {cfg.parallel.spatial}.")
  if not cfg.train.save_every >= 0:
    raise UserError(f"train.save_every (minutes) must be 0 or more; got "
                    f"{cfg.train.save_every}.")
  if not (cfg.data.scale > 0 and math.isfinite(cfg.data.scale)):
    raise UserError(f"data.scale must be positive and finite; got {cfg.data.scale}.")
  if cfg.data.normalise not in NORMALISE_MODES:
    raise UserError(f"data.normalise must be one of {NORMALISE_MODES}; got "
                    f"{cfg.data.normalise!r}.")
  if cfg.train.lr_schedule not in LR_SCHEDULES:
    raise UserError(f"train.lr_schedule must be one of {LR_SCHEDULES}; got "
                    f"{cfg.train.lr_schedule!r}.")
  if cfg.train.loss not in LOSSES:
    raise UserError(f"train.loss must be one of {LOSSES}; got {cfg.train.loss!r}.")
  holdout = cfg.data.holdout
  if isinstance(holdout, str):
    if holdout.count(":") != 1:
      raise UserError(f"data.holdout takes a fraction such as 0.1 or a frame range a:b; "
                      f"got {holdout!r}.")
  elif not 0 <= holdout < 1:
    raise UserError(f"data.holdout must be a fraction in [0, 1) or a range a:b; got "
                    f"{holdout}.")
  for name, value in (("data.workers", cfg.data.workers),
                      ("train.batch_size", cfg.train.batch_size),
                      ("infer.batch_size", cfg.infer.batch_size)):
    if value < 0:
      raise UserError(f"{name} must be 0 or more; got {value}.")
  check_number("train.lr (--lr)", cfg.train.lr, above=0)
  check_number("train.b1 (--b1)", cfg.train.b1, at_least=0, below=1)
  check_number("train.b2 (--b2)", cfg.train.b2, at_least=0, below=1)
  check_seed("train.seed (--seed)", cfg.train.seed)


TILINGS = ("auto", "exact", "overlap")
PLANE_SYMMETRIES = 8  # the (y, x) plane's rotations and flips (augment.N_SYMMETRIES)
# Calibrated uncertainty (`analysis.uncertainty`): bootstrap draws (one network pass each),
# one held-out pair of frames in HOLDOUT_EVERY for the check, which compares the error
# of CHECK_BOX x CHECK_BOX pixel means (the std map's resolution) in BINS bins of the
# estimate's activity.
UNCERTAINTY_DRAWS = 8
UNCERTAINTY_HOLDOUT_EVERY = 8
UNCERTAINTY_BINS = 4
UNCERTAINTY_CHECK_BOX = 3
# ... and BIAS_PROBES more passes that split the re-estimates' mean deviation into the
# estimator's bias and the estimate's own error, which the network takes out again.
UNCERTAINTY_BIAS_PROBES = 2
# The hallucination audit (`analysis.audit`): frames of the control scenes (at most), the
# simple cell finder's rule (local contrast above BLOB_SIGMA x the image's noise std as
# if raw, against the mean of a BLOB_WINDOW square, over BLOB_AREA connected pixels or
# more), the frames
# it looks at one by one, and the events check's threshold.
AUDIT_FRAMES = 256
AUDIT_BLOB_SIGMA = 3.0
AUDIT_BLOB_WINDOW = 15
AUDIT_BLOB_AREA = 12
AUDIT_BLOB_FRAMES = 32
AUDIT_EVENT_THRESHOLD = 6.0


def parse_bytes(text: str | float | int | None) -> float | None:
  """'8GB', '512MiB', '2e9' or a number of bytes -> bytes (None stays None)."""
  if text is None:
    return None
  units = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6,
           "MIB": 2**20, "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12,
           "TIB": 2**40}
  if isinstance(text, (int, float)):
    value = float(text)
  else:
    s = str(text).strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    try:
      value = float(number) * units[s[len(number):]]
    except (ValueError, KeyError):
      value = -1
  if not value > 0:
    raise UserError(f"--memory-budget takes a size such as 8GB, 512MiB or 2e9 bytes; "
                    f"got {text!r}.")
  return value


@dataclasses.dataclass(frozen=True)
class DenoiseConfig:
  """How a `Denoiser` runs a model, checked here once (a model's own limits by
  `check_model`). Built from keywords: `DenoiseConfig(tiling="exact", symmetries=4)`.

  patch, overlap: the overlap scheme's patch (T, Y, X) and overlap factor (None: the
    model's); giving either selects that scheme under tiling 'auto'.
  batch_size: tiles per network call, a multiple of the devices (0: one per device).
  dtype: compute dtype, one of DTYPES.
  tiling: 'exact' (seamless: equal to one pass over the whole movie), 'overlap'
    (DeepCAD-RT's scheme) or 'auto' (exact unless it needs more network voxels than the
    overlap scheme, or the overlap scheme's patch/overlap/blend was asked for).
  tile: exact tiling's largest tile (T, Y, X), multiples of 8 (None: from the budget).
  memory_budget: bytes per device for exact tiles ('8GB', 2e9; None: a share of the
    device's memory).
  blend: blend the overlap scheme's patches with linear weights instead of cropping.
  reference_stitching: DeepCAD-RT's stitching (its kept regions and per-patch rescale).
  spatial: devices that split each tile's Y axis.
  symmetries: K test-time symmetries of the (y, x) plane for uncertainty (0: off); the
    samples per voxel are K x the model's ensemble members.
  save_samples: keep every sample beside the mean and std.
  """

  patch: Patch | None = None
  overlap: float | None = None
  batch_size: int = 0
  dtype: str = "float32"
  tiling: str = "auto"
  tile: Patch | None = None
  memory_budget: float | str | None = None
  blend: bool = False
  reference_stitching: bool = False
  spatial: int = 1
  symmetries: int = 0
  save_samples: bool = False

  def __post_init__(self):
    def put(name, value):
      object.__setattr__(self, name, value)
    if self.patch is not None:
      put("patch", tuple(int(p) for p in self.patch))
      if len(self.patch) != 3 or min(self.patch) < 8:
        raise UserError(f"patch must be three sizes of at least 8 (T,Y,X); got "
                        f"{self.patch}.")
    if self.overlap is not None:
      put("overlap", float(self.overlap))
      if not 0 <= self.overlap < 1:
        raise UserError(f"overlap must be in [0, 1); got {self.overlap}.")
    if self.batch_size < 0:
      raise UserError(f"--batch-size must be 0 (one tile per device) or more; got "
                      f"{self.batch_size}.")
    if self.dtype not in DTYPES:
      raise UserError(f"compute dtype must be one of {', '.join(DTYPES)}; got "
                      f"{self.dtype!r}.")
    if self.tiling not in TILINGS:
      raise UserError(f"--tiling must be one of {', '.join(TILINGS)}; got "
                      f"{self.tiling!r}.")
    if self.tiling == "exact" and (self.blend or self.reference_stitching):
      raise UserError("--blend and --reference-stitching belong to the overlap scheme; "
                      "exact tiles need neither (drop them or use --tiling overlap).")
    if self.tile is not None:
      put("tile", tuple(int(t) for t in self.tile))
      if len(self.tile) != 3 or any(t < 8 or t % 8 for t in self.tile):
        raise UserError(f"--tile must be three multiples of 8 as T,Y,X; got {self.tile}.")
    put("memory_budget", parse_bytes(self.memory_budget))
    if self.spatial < 1:
      raise UserError(f"--spatial must be at least 1; got {self.spatial}.")
    if self.symmetries < 0:
      raise UserError(f"--uncertainty takes a number of symmetries (0: off); got "
                      f"{self.symmetries}.")
    if self.save_samples and not self.symmetries:
      raise UserError("--save-samples keeps the samples of --uncertainty K; add it.")

  @property
  def overlap_scheme_asked(self) -> bool:
    """Whether the overlap scheme's own settings (patch, overlap) were given."""
    return self.patch is not None or self.overlap is not None

  def check_model(self, model: ModelConfig) -> None:
    """Refuse symmetries this model cannot use: at most the plane's 8, and at least 2
    unless an ensemble's members already disagree."""
    lowest = 1 if model.ensemble > 1 else 2
    if self.symmetries and not lowest <= self.symmetries <= PLANE_SYMMETRIES:
      members = f", times the {model.ensemble} members" if model.ensemble > 1 else ""
      raise UserError(f"--uncertainty takes {lowest} to {PLANE_SYMMETRIES} (symmetries "
                      f"of the (y, x) plane{members}); got {self.symmetries}.")


def _section(cls, values: Mapping[str, Any], where: str):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise UserError(f"unknown config key(s) {', '.join(where + '.' + k for k in unknown)}; "
                    f"valid keys: {', '.join(sorted(names))}.")
  values = dict(values)
  for key in ("patch", "widths"):
    if values.get(key) is not None:
      values[key] = tuple(int(v) for v in values[key])
  return cls(**values)


def from_dict(d: Mapping[str, Any]) -> Config:
  """Rebuild a config saved with `Config.to_dict`; unknown keys are an error."""
  unknown = sorted(set(d) - set(SECTIONS) - {"name"})
  if unknown:
    raise UserError(f"unknown config section(s): {', '.join(unknown)}.")
  sections = {k: _section(cls, d.get(k, {}), k) for k, cls in SECTIONS.items()}
  return Config(name=d.get("name", "custom"), **sections)


def override(cfg: Config, **changes: Any) -> Config:
  """Replace fields given as 'section.field'=value (None values are ignored)."""
  d = cfg.to_dict()
  for key, value in changes.items():
    if value is None:
      continue
    section, _, field = key.partition(".")
    if section not in SECTIONS or field not in d[section]:
      raise UserError(f"unknown config key {key!r}.")
    d[section][field] = value
  return from_dict(d)


def _number(text: str) -> int | float:
  return int(text) if text.strip().lstrip("-").isdigit() else float(text)


def _parse_value(text: str, current: Any, key: str, annotation: str = "") -> Any:
  """A command-line value for a field holding `current` (its type decides; a field
  that is None takes a number, a list 'a,b,c' or text; a field that may hold text
  keeps what does not parse as its type)."""
  text = text.strip()
  if "str" in str(annotation) and not isinstance(current, str):
    try:
      return _parse_value(text, current, key)
    except UserError:
      return text
  if text.lower() in ("none", "null") and not isinstance(current, bool):
    return None
  try:
    if isinstance(current, bool):
      if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError
      return text.lower() in ("true", "1", "yes")
    if isinstance(current, (int, float)):
      return type(current)(_number(text)) if isinstance(current, float) else int(text)
    if isinstance(current, (tuple, list)) or (current is None and "," in text):
      return tuple(_number(v) for v in text.replace("x", ",").split(","))
    if current is None:
      try:
        return _number(text)
      except ValueError:
        return text
  except ValueError:
    raise UserError(f"--set {key}={text}: {text!r} is not a valid "
                    f"{type(current).__name__} (the field holds {current!r}).") from None
  return text


def override_strings(cfg: Config, assignments: Sequence[str]) -> Config:
  """Apply 'section.field=value' strings (the CLI's --set), each parsed by the type of
  the field's current value; unknown keys and unparsable values are one sentence."""
  d = cfg.to_dict()
  for item in assignments:
    key, sep, text = item.partition("=")
    section, _, field = key.strip().partition(".")
    if not sep or section not in SECTIONS or field not in d[section]:
      fields = ", ".join(f"{s}.{f}" for s in SECTIONS for f in d[s])
      raise UserError(f"--set takes section.field=value with a known field; got "
                      f"{item!r} (fields: {fields}).")
    annotation = {f.name: f.type for f in dataclasses.fields(SECTIONS[section])}[field]
    d[section][field] = _parse_value(text, d[section][field], key.strip(), annotation)
  return from_dict(d)


def _configs_dir() -> str:
  return os.path.dirname(os.path.abspath(__file__))


def available() -> list[str]:
  """Names of the built-in configs."""
  return sorted(f[:-3] for f in os.listdir(_configs_dir())
                if f.endswith(".py") and not f.startswith("_"))


def load_config(spec: str) -> Config:
  """Resolve 'NAME', 'NAME:ARG', 'path/to/file.py' or 'path/to/file.py:ARG'."""
  name, _, arg = spec.partition(":")
  if name.endswith(".py"):
    if not os.path.isfile(name):
      raise UserError(f"config file {name} does not exist.")
    module_spec = importlib.util.spec_from_file_location("_user_config", name)
    module = importlib.util.module_from_spec(module_spec)
    try:
      module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's own code: any error is theirs
      raise UserError(f"config file {name} could not be run ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:160] if str(e) else ''}); fix it or use "
                      "a built-in config.") from None
  elif name in available():
    module = importlib.import_module(f"deepcad_jax.config.{name}")
  else:
    raise UserError(f"unknown config {name!r}; built-in configs: {', '.join(available())}, "
                    "or give a path to a .py file with get_config().")
  if not callable(getattr(module, "get_config", None)):
    raise UserError(f"config file {name} defines no get_config(); a config file defines "
                    "get_config(arg=None) returning a deepcad_jax.config.Config (see "
                    "deepcad_jax/config/tiny.py).")
  cfg = module.get_config(arg or None)
  if not isinstance(cfg, Config):
    raise UserError(f"get_config() in {name} must return a deepcad_jax.config.Config.")
  return cfg
