"""Movie specs: which file, which format, which dataset, and how its axes are laid out.

Every command takes a movie as text:

    [FORMAT:]PATH[:/DATASET][[key=value,...]]

- FORMAT (optional) is one of `tiff`, `hdf5`, `zarr`, `nwb`, `suite2p`, `raw`,
  `caiman`; without it the format follows the suffix (`.tif`, `.h5`/`.hdf5`, `.zarr`,
  `.nwb`, a suite2p plane folder holding `data.bin` and `ops.npy` (or `db.npy`),
  `.bin`/`.raw`/`.dat` with a shape, `.mmap` for CaImAn's memory-mapped movies).
- DATASET names the array inside an HDF5 file or Zarr store (`rec.h5:/imaging/data`) or
  the series of an NWB file (`rec.nwb:TwoPhotonSeries`); without it the only 3-D (or the
  only movie-like) array is read.
- The options in brackets say what the file does not: `axes=YXT` (the file's axis
  order), `planes=2,channels=2` (ScanImage-style interleaving of frames), `shape=...`,
  `dtype=...`, `offset=...` (raw binaries), `plane=0,channel=1` (one movie of a
  volumetric or multi-channel recording: `list_movies` names them so; an output named
  so is that movie's slice of a file holding every plane and channel), and for outputs
  `compression=gzip|none`, `scale=0.5` (suite2p int16 scaling) and `zarr_format=2`.

`MovieSpec` parses and prints this text, so a spec travels through every function that
takes a path and comes back as the same text.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from deepcad_jax.errors import UserError

FORMATS = ("tiff", "hdf5", "zarr", "nwb", "suite2p", "raw", "caiman")
_ALIASES = {"tif": "tiff", "h5": "hdf5", "hdf": "hdf5", "bin": "raw"}
SUFFIXES = {".tif": "tiff", ".tiff": "tiff", ".h5": "hdf5", ".hdf5": "hdf5",
            ".he5": "hdf5", ".zarr": "zarr", ".nwb": "nwb", ".bin": "raw", ".raw": "raw",
            ".dat": "raw", ".mmap": "caiman"}
# Formats whose file can hold a dataset path after the suffix (`rec.h5:/data`).
_INNER = re.compile(r"^(.*?\.(?:h5|hdf5|he5|nwb|zarr))(?::(.+))?$", re.IGNORECASE)
_PREFIX = re.compile(r"^([A-Za-z0-9]{2,8}):(?!//)(.*)$", re.DOTALL)
_OPTIONS = re.compile(r"^(.*)\[([A-Za-z_]+=[^\[\]]*)\]$", re.DOTALL)
_INT_KEYS = ("planes", "channels", "plane", "channel", "offset", "zarr_format")
_KEYS = ("axes", "planes", "channels", "plane", "channel", "shape", "dtype", "offset",
         "compression", "scale", "nwb_group", "zarr_format")
PLANE_FOLDER = re.compile(r"^plane\d+$")


@dataclasses.dataclass(frozen=True)
class MovieSpec:
  """One movie (or one recording to split into movies) as the user named it."""

  path: str
  format: str | None = None       # as given with FORMAT:, else None (from the suffix)
  dataset: str | None = None      # the array (HDF5, Zarr) or series (NWB) inside
  axes: str | None = None         # the file's axis order, e.g. 'YXT', 'TZCYX'
  planes: int | None = None       # interleaved planes (ScanImage)
  channels: int | None = None     # interleaved channels (ScanImage)
  plane: int | None = None        # the plane this movie is
  channel: int | None = None      # the channel this movie is
  shape: tuple[int, ...] | None = None   # raw binaries: the file's shape
  dtype: str | None = None               # raw binaries: the file's dtype
  offset: int | None = None              # raw binaries: bytes before the data
  compression: str | None = None         # outputs: 'gzip', 'lzf', 'zstd', 'none'
  scale: float | None = None             # suite2p outputs: int16 = round(value * scale)
  nwb_group: str | None = None           # NWB outputs: 'processing' (default), 'acquisition'
  zarr_format: int | None = None         # Zarr outputs: 3 (default) or 2

  @classmethod
  def parse(cls, text: "str | os.PathLike | MovieSpec", **changes: Any) -> "MovieSpec":
    """A spec from its text (or a spec), with `changes` (None values are ignored)."""
    if isinstance(text, MovieSpec):
      spec = text
    else:
      spec = _parse(os.fspath(text))
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes:
      spec = dataclasses.replace(spec, **_checked(changes, str(text)))
    return spec

  @property
  def kind(self) -> str:
    """The format: the one given, else the one the path's suffix or content says."""
    return self.format or detect_format(self.path, self.shape is not None)

  @property
  def options(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in _KEYS if getattr(self, k) is not None}

  def with_(self, **changes: Any) -> "MovieSpec":
    return dataclasses.replace(self, **changes)

  @property
  def is_plain(self) -> bool:
    """Just a path: no format, dataset or option given."""
    return self.format is None and self.dataset is None and not self.options

  def __str__(self) -> str:
    text = self.path
    if self.format:
      text = f"{self.format}:{text}"
    if self.dataset:
      text = f"{text}:{self.dataset}"
    opts = self.options
    if opts:
      text += "[" + ",".join(f"{k}={_show(v)}" for k, v in opts.items()) + "]"
    return text

  def __fspath__(self) -> str:
    return str(self)


def _show(value: Any) -> str:
  if isinstance(value, tuple):
    return "x".join(str(n) for n in value)
  return str(value)


def _parse(text: str) -> MovieSpec:
  if os.path.exists(text):  # an existing file is itself, whatever its name holds
    return MovieSpec(text)
  options: dict[str, Any] = {}
  match = _OPTIONS.match(text)
  if match:
    text = match.group(1)
    for item in match.group(2).split(","):
      key, _, value = item.partition("=")
      options[key.strip().lower()] = value.strip()
  fmt = None
  match = _PREFIX.match(text)
  if match and (match.group(1).lower() in FORMATS or match.group(1).lower() in _ALIASES):
    fmt = match.group(1).lower()
    fmt = _ALIASES.get(fmt, fmt)
    text = match.group(2)
  dataset = None
  if not os.path.exists(text):
    inner = _INNER.match(text)
    if inner and inner.group(2):
      text, dataset = inner.group(1), inner.group(2)
    elif fmt in ("hdf5", "zarr", "nwb") and ":" in text:
      head, _, tail = text.rpartition(":")
      if os.path.exists(head):
        text, dataset = head, tail
  return MovieSpec(text, fmt, dataset, **_checked(options, text))


def _checked(options: dict[str, Any], where: str) -> dict[str, Any]:
  """Options with their types, or one sentence naming the one that is wrong."""
  out: dict[str, Any] = {}
  for key, value in options.items():
    if key not in _KEYS:
      raise UserError(f"{where}: unknown option {key!r}; the options are "
                      f"{', '.join(_KEYS)}.")
    try:
      if key in _INT_KEYS:
        out[key] = int(value)
        if out[key] < 0 or (key in ("planes", "channels") and out[key] < 1) or (
            key == "zarr_format" and out[key] not in (2, 3)):
          raise ValueError
      elif key == "shape":
        out[key] = tuple(int(n) for n in (value.lower().replace(",", "x").split("x")
                                          if isinstance(value, str) else value))
        if not out[key] or min(out[key]) < 1:
          raise ValueError
      elif key == "scale":
        out[key] = float(value)
        if not out[key] > 0:
          raise ValueError
      elif key == "nwb_group":
        out[key] = str(value).lower()
        if out[key] not in ("processing", "acquisition"):
          raise ValueError
      elif key == "axes":
        out[key] = str(value).upper()
      else:
        out[key] = str(value)
    except (TypeError, ValueError):
      raise UserError(f"{where}: {key}={value!r} is not valid; give e.g. "
                      f"{_EXAMPLES[key]}.") from None
  return out


_EXAMPLES = {"planes": "planes=2", "channels": "channels=2", "plane": "plane=0",
             "channel": "channel=0", "offset": "offset=0", "shape": "shape=1000x512x512",
             "scale": "scale=0.5", "axes": "axes=TYX", "dtype": "dtype=int16",
             "compression": "compression=gzip", "nwb_group": "nwb_group=acquisition",
             "zarr_format": "zarr_format=2"}


def detect_format(path: str, has_shape: bool = False) -> str:
  """The format of `path` from its suffix or, for a folder, what it holds."""
  lower = path.lower().rstrip("/\\")
  for suffix, fmt in sorted(SUFFIXES.items(), key=lambda s: -len(s[0])):
    if lower.endswith(suffix):
      if fmt == "raw" and os.path.basename(lower) == "data.bin" and not has_shape:
        return "suite2p"
      return fmt
  if os.path.isdir(path):
    names = set(os.listdir(path))
    if {".zarray", ".zgroup", "zarr.json"} & names:
      return "zarr"
    if "data.bin" in names and names & {"ops.npy", "db.npy"}:
      return "suite2p"
    if PLANE_FOLDER.match(os.path.basename(lower)):
      return "suite2p"
    return "folder"
  if PLANE_FOLDER.match(os.path.basename(lower)):
    return "suite2p"
  if has_shape:
    return "raw"
  return "unknown"


def is_store(path: str) -> bool:
  """Whether folder `path` is one movie (a Zarr store, a suite2p plane folder)."""
  return os.path.isdir(path) and detect_format(path) in ("zarr", "suite2p")


def part_suffix(spec: MovieSpec, planes: int, channels: int) -> str:
  """The name part of one movie of a split recording: '_plane0', '_ch1', '_plane0_ch1'."""
  parts = []
  if planes > 1 and spec.plane is not None:
    parts.append(f"plane{spec.plane}")
  if channels > 1 and spec.channel is not None:
    parts.append(f"ch{spec.channel}")
  return "".join("_" + p for p in parts)


def split_name(path: str) -> tuple[str, str]:
  """(stem, extension), keeping '.ome.tif' and '.ome.zarr' whole."""
  lower = path.lower().rstrip("/")
  for ext in (".ome.tif", ".ome.tiff", ".ome.zarr"):
    if lower.endswith(ext):
      path = path.rstrip("/")
      return path[:-len(ext)], path[-len(ext):]
  return os.path.splitext(path.rstrip("/") if path.endswith("/") else path)


def renamed(spec: MovieSpec, path: str) -> MovieSpec:
  """`spec` for another file (same format prefix, dataset and output options), with
  the selection of a split movie dropped."""
  return dataclasses.replace(spec, path=path, plane=None, channel=None, axes=None,
                             planes=None, channels=None, shape=None, dtype=None,
                             offset=None)


def with_name_suffix(text: "str | MovieSpec", suffix: str) -> str:
  """An output's text with `suffix` added to its file name before the extension
  ('den.h5:/data' -> 'den_std.h5:/data', 'den.ome.tif' -> 'den_std.ome.tif')."""
  spec = MovieSpec.parse(text)
  stem, ext = split_name(spec.path)
  if spec.is_plain:
    return stem + suffix + ext
  return str(dataclasses.replace(spec, path=stem + suffix + ext))
