"""HDF5 movies (the Allen Institute's (T, Y, X) `data`, SIMA's (y, x, t) or (t, z, y, x, c)).

Reading opens the dataset lazily (h5py reads only the frames asked for); writing
creates a chunked dataset, optionally compressed, and fills it block by block. h5py is
an optional dependency: `pip install "deepcad-jax[hdf5]"`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from deepcad_jax.data.axes import Source, axes_from_attr, axes_from_names
from deepcad_jax.data.metadata import MovieMetadata
from deepcad_jax.errors import UserError

try:
  import h5py
except ImportError as e:  # optional: the error names the extra when it is needed
  h5py = None
  _IMPORT_ERROR = e

DEFAULT_DATASET = "data"
CHUNK_BYTES = 2**20          # about 1 MB per chunk: a few frames of a 512 x 512 movie


def require_h5py(what: str) -> Any:
  if h5py is None:
    raise UserError(f"{what} needs h5py, which is not installed; install it with "
                    "pip install \"deepcad-jax[hdf5]\".")
  return h5py


def list_datasets(group) -> list[tuple[str, tuple[int, ...]]]:
  """(path, shape) of every dataset under `group` (an h5py File or Group)."""
  found: list[tuple[str, tuple[int, ...]]] = []

  def visit(name, obj):
    if isinstance(obj, h5py.Dataset):
      found.append(("/" + name, tuple(int(n) for n in obj.shape)))
  group.visititems(visit)
  return found


def external_links(group) -> dict[str, tuple[str, str]]:
  """{path: (file, object)} of the external links under `group` (never followed)."""
  links: dict[str, tuple[str, str]] = {}

  def visit(name, link):
    if isinstance(link, h5py.ExternalLink):
      links["/" + name] = (link.filename, link.path)
  group.visititems_links(visit)
  return links


def refuse_external_link(name: str, where: str, target: tuple[str, str]) -> None:
  """One sentence for an external link a user named (or that is all a file holds)."""
  raise UserError(f"{name}:{where} is an external link to {target[0]}:{target[1]}, and "
                  "deepcad-jax reads only data stored inside the file it is given (a "
                  "link could reach any file); give that file and dataset itself.")


def check_in_file(data, name: str, path: str, depth: int = 0) -> None:
  """Refuse a dataset whose values are not all inside the file `path`: external raw
  storage (any file, e.g. /etc/passwd) and virtual datasets whose sources are outside
  the file's folder, missing, or not the datasets they name (else read as the fill
  value)."""
  external = data.external
  if external:
    raise UserError(f"{name} keeps its values in external raw files ({external[0][0]}"
                    f"{', ...' if len(external) > 1 else ''}), not in {path}; deepcad-jax "
                    "reads only data stored inside the file it is given (external storage "
                    "could reach any file): copy the data into the file (e.g. with h5py).")
  if not data.is_virtual:
    return
  if depth > 3:
    raise UserError(f"{name} is a virtual dataset of virtual datasets nested more than "
                    "3 deep (or in a loop); copy the data into one dataset.")
  folder = os.path.dirname(os.path.realpath(path))
  for source in data.virtual_sources():
    file = source.file_name
    if file == ".":
      target = os.path.realpath(path)
    else:
      target = os.path.realpath(os.path.join(folder, file))
    problem = None
    if os.path.commonpath([folder, target]) != folder:
      problem = "is outside the file's folder"
    elif not os.path.isfile(target):
      problem = "is missing (its frames would be read as the fill value)"
    else:
      try:
        with h5py.File(target, "r") as f:
          linked = f.get(source.dset_name, getlink=True)
          if not isinstance(linked, h5py.HardLink) or not isinstance(
              f.get(source.dset_name), h5py.Dataset):
            problem = f"has no dataset {source.dset_name}"
          else:
            check_in_file(f[source.dset_name], f"{target}:{source.dset_name}", target,
                          depth + 1)
      except OSError as e:
        problem = f"cannot be read ({e})"
    if problem is not None:
      raise UserError(f"{name} is a virtual dataset whose source {file} {problem}; "
                      "deepcad-jax reads a virtual dataset only from whole sources in its "
                      "own folder: put the source files beside it, or give them "
                      "themselves.")


def _describe(found: list[tuple[str, tuple[int, ...]]]) -> str:
  if not found:
    return "it holds no dataset"
  shown = ", ".join(f"{p} {s}" for p, s in found[:8])
  return f"it holds {shown}{', ...' if len(found) > 8 else ''}"


def choose_dataset(name: str, found: list[tuple[str, tuple[int, ...]]],
                   dataset: str | None, syntax: str) -> str:
  """The dataset to read: the one named, else the only 3-D (or the only N-D, N >= 3)
  dataset; one sentence listing what the file holds otherwise."""
  paths = {p.strip("/"): p for p, _ in found}
  if dataset is not None:
    key = dataset.strip("/")
    if key in paths:
      return paths[key]
    raise UserError(f"{name} has no dataset {dataset!r} ({_describe(found)}); give one "
                    f"of these, e.g. {syntax}:{found[0][0] if found else '/data'}.")
  for rank in ((3,), (4, 5)):
    movies = [p for p, s in found if len(s) in rank]
    if len(movies) == 1:
      return movies[0]
    if len(movies) > 1:
      raise UserError(f"{name} holds several movie-like datasets ({_describe(found)}); "
                      f"name one, e.g. {syntax}:{movies[0]}.")
  raise UserError(f"{name} holds no 3-D dataset ({_describe(found)}); name the movie's "
                  f"dataset, e.g. {syntax}:/data.")


def open_hdf5(path: str, dataset: str | None) -> Source:
  """The movie dataset of an HDF5 file, opened read-only (closed by `Source.close`)."""
  require_h5py(f"{path} (HDF5)")
  try:
    f = h5py.File(path, "r")
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is not a readable HDF5 file ({e}); check the file (or give "
                    "its format, e.g. tiff:PATH).") from None
  try:
    links = external_links(f)
    if dataset is not None and "/" + dataset.strip("/") in links:
      key = "/" + dataset.strip("/")
      refuse_external_link(path, key, links[key])
    found = list_datasets(f)
    if dataset is None and links and not any(len(s) >= 3 for _, s in found):
      key = next(iter(links))
      refuse_external_link(path, key, links[key])
    chosen = choose_dataset(path, found, dataset, path)
    data = f[chosen]
    check_in_file(data, f"{path}:{chosen}", path)
    return Source(data, f"{path}:{chosen}", _axes(data), _metadata(data), f.close)
  except BaseException:
    f.close()
    raise


def _axes(data) -> str | None:
  """Axes from the dataset's 'axes' attribute or its dimension labels."""
  text = axes_from_attr(data.attrs.get("axes"))
  if text:
    return text
  try:
    labels = [d.label for d in data.dims]
  except (RuntimeError, ValueError, TypeError):
    return None
  return axes_from_names(labels) if all(labels) else None


def _metadata(data) -> MovieMetadata:
  meta = MovieMetadata(kind="hdf5")
  interval = data.attrs.get("frame_interval")
  rate = data.attrs.get("frame_rate", data.attrs.get("fs"))
  if interval is not None:
    meta.frame_interval = float(interval)
  elif rate is not None and float(rate) > 0:
    meta.frame_interval = 1.0 / float(rate)
  size = data.attrs.get("pixel_size")
  if size is not None and np.size(size) == 2:
    y, x = (float(v) for v in np.ravel(size))
    meta.resolution = (1.0 / x, 1.0 / y)
    unit = data.attrs.get("unit", "µm")
    meta.unit = unit.decode() if isinstance(unit, bytes) else str(unit)
  return meta


def metadata_attrs(metadata: MovieMetadata | None, axes: str = "TYX") -> dict[str, Any]:
  """Attributes that carry a movie's axes, frame interval and pixel size (HDF5, Zarr)."""
  attrs: dict[str, Any] = {"axes": axes}
  if metadata is not None:
    if metadata.frame_interval:
      attrs["frame_interval"] = float(metadata.frame_interval)
      attrs["frame_rate"] = 1.0 / float(metadata.frame_interval)
    if metadata.pixel_size is not None:
      attrs["pixel_size"] = [float(v) for v in metadata.pixel_size]
      attrs["unit"] = metadata.unit or "pixel"
    attrs["source_metadata"] = json.dumps({"kind": metadata.kind,
                                           "describe": metadata.describe()})
  return attrs


def chunk_frames(frame_shape, dtype) -> int:
  return max(1, CHUNK_BYTES // max(1, int(np.prod(frame_shape)) * np.dtype(dtype).itemsize))


def chunk_shape(axes: str, shape, dtype, growable: bool) -> tuple[int, ...]:
  """Chunks of an array of `axes` and `shape`: about CHUNK_BYTES of whole frames of one
  plane and channel (a growable array's frame count may still be 0)."""
  sizes = dict(zip(axes, (int(n) for n in shape)))
  n = chunk_frames((sizes["Y"], sizes["X"]), dtype)
  frames = n if growable or not sizes["T"] else min(n, sizes["T"])
  return tuple(frames if a == "T" else sizes[a] if a in "YX" else 1 for a in axes)


class DatasetWriter:
  """Frames appended to a resizable (T, Y, X) HDF5 dataset `self.data` of the open file
  `self.file` (HDF5 and NWB outputs); `self.axis` is its time axis."""

  data: Any = None
  file: Any = None
  axis: int = 0

  def write(self, start: int, frames: np.ndarray) -> None:
    end = start + len(frames)
    if self.data.shape[0] < end:
      self.data.resize(end, axis=0)
    self.data[start:end] = frames

  def close(self, count: int) -> None:
    if self.data.shape[self.axis] != count:
      self.data.resize(count, axis=self.axis)
    self.file.close()
    self.file = None

  def abort(self) -> None:
    if self.file is not None:
      try:
        self.file.close()
      finally:
        self.file = None


class HDF5Sink(DatasetWriter):
  """A movie written block by block into a new HDF5 file: a (T, Y, X) dataset, or
  (`open_volume`) every plane and channel of a recording in one dataset."""

  def __init__(self, dataset: str | None, compression: str | None,
               final: str | None = None):
    require_h5py("writing HDF5")
    self.final = final  # an HDF5 file there keeps its other datasets
    self.dataset = (dataset or DEFAULT_DATASET).strip("/") or DEFAULT_DATASET
    self.compression = None if compression in (None, "none") else compression
    if self.compression not in (None, "gzip", "lzf"):
      raise UserError(f"HDF5 compression {compression!r} is not available; give "
                      "compression=gzip, lzf or none.")
    self.file = None
    self.data = None

  def axes_for(self, axes: str) -> str:
    """The axis order this file is written in, for a recording of `axes`: the same."""
    return axes

  def open(self, temp: str, frame_shape, dtype, frames: int | None,
           metadata: MovieMetadata | None) -> None:
    self._create(temp, "TYX", (frames or 0,) + tuple(frame_shape), dtype, metadata,
                 growable=not frames)

  def open_volume(self, temp: str, axes: str, shape, dtype,
                  metadata: MovieMetadata | None) -> Any:
    """A fixed-shape dataset of `axes` for every plane and channel of a recording,
    chunked by plane, channel and frame block; returns the dataset."""
    self._create(temp, axes, shape, dtype, metadata, growable=False)
    return self.data

  def _create(self, temp: str, axes: str, shape, dtype, metadata: MovieMetadata | None,
              growable: bool) -> None:
    shape = tuple(int(n) for n in shape)
    self.file = self._copy_of_final(temp) or h5py.File(temp, "w")
    self.data = self.file.create_dataset(
        self.dataset, shape=shape, dtype=dtype,
        maxshape=tuple(None if growable and a == "T" else n for a, n in zip(axes, shape)),
        chunks=chunk_shape(axes, shape, dtype, growable), compression=self.compression)
    for key, value in metadata_attrs(metadata, axes).items():
      self.data.attrs[key] = value
    for i, axis in enumerate(axes):
      self.data.dims[i].label = axis.lower()
    self.axis = axes.index("T")

  def _copy_of_final(self, temp: str) -> Any:
    """The existing output file copied to `temp` without the dataset to be written
    (its other datasets kept, so that --overwrite replaces only the named dataset),
    open for writing; None where there is no HDF5 file to keep."""
    if not self.final or not os.path.isfile(self.final) or not h5py.is_hdf5(self.final):
      return None
    shutil.copyfile(self.final, temp)
    f = h5py.File(temp, "r+")
    old = f.get(self.dataset, getlink=True)
    if old is not None:
      if isinstance(old, h5py.HardLink) and isinstance(f.get(self.dataset), h5py.Group):
        f.close()
        raise UserError(f"{self.final}:/{self.dataset} is a group holding other "
                        "datasets; name a dataset to write (e.g. "
                        f"{self.final}:/{self.dataset}/denoised).")
      del f[self.dataset]
    return f
