"""Zarr and OME-Zarr movies (chunked stores: a folder, often named `.zarr`).

Reading opens the array lazily (only the chunks of the frames asked for are read): the
array named after the store (`rec.zarr:/group/array`), else the store's root array, the
full-resolution level of an OME-Zarr image, or the only 3-D array. Writing creates a
chunked array (compressed with zarr's default codec unless `compression=none`) and
fills it block by block (format 3, or format 2 with `[zarr_format=2]`; a `.ome.zarr`
output is an OME-Zarr image: 0.5 in format 3, 0.4 in format 2). zarr-python 3 is an
optional dependency: `pip install "deepcad-jax[zarr]"`; stores of format 2 and 3 are
read.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np

from deepcad_jax.data.axes import Source, axes_from_attr, axes_from_names
from deepcad_jax.data.formats.hdf5 import chunk_shape, choose_dataset, metadata_attrs
from deepcad_jax.data.metadata import MovieMetadata
from deepcad_jax.errors import UserError

zarr: Any = None     # imported on first use (optional, and slow to import)


def require_zarr(what: str) -> Any:
  """The zarr module, or one sentence naming the extra that installs it."""
  global zarr
  if zarr is None:
    try:
      import zarr as module  # deliberate lazy import of an optional library
    except ImportError:
      module = None
    if module is None or int(module.__version__.split(".")[0]) < 3:
      found = "not installed" if module is None else f"version {module.__version__}"
      raise UserError(f"{what} needs zarr-python 3 ({found}); install it with "
                      "pip install \"deepcad-jax[zarr]\" (Python 3.11+).")
    zarr = module
  return zarr


def _arrays(group) -> list[tuple[str, Any]]:
  """(path, array) of every array in a Zarr group, at any depth."""
  return [("/" + name, obj) for name, obj in group.members(max_depth=None)
          if isinstance(obj, zarr.Array)]


def _ome(attrs) -> dict | None:
  """The first OME-Zarr multiscale image of a group's attributes (v0.4 or v0.5)."""
  attrs = dict(attrs)
  scales = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
  return scales[0] if scales else None


def check_chunks(array, name: str) -> None:
  """Refuse an array with chunks missing from its store: zarr reads a missing chunk as
  the fill value (zeros), so a copy that did not finish would be read as black frames.
  (This project's writer stores every chunk, `write_empty_chunks`.)"""
  total, stored = int(array.nchunks), int(array.nchunks_initialized)
  if stored < total:
    raise UserError(f"{name} has {total - stored} of its {total} chunks missing, which "
                    "zarr would read as zeros (a copy that did not finish, or a writer "
                    "that skips empty chunks); copy the store again, or rewrite it with "
                    "every chunk (zarr: config={'write_empty_chunks': True}).")


def open_zarr(path: str, dataset: str | None) -> Source:
  """The movie array of a Zarr store, opened read-only."""
  require_zarr(f"{path} (Zarr)")
  try:
    node = zarr.open(path, mode="r")
  except Exception as e:  # zarr raises many kinds for a folder that is not a store
    raise UserError(f"{path} is not a readable Zarr store ({type(e).__name__}: {e}); "
                    "give the folder that holds .zarray/.zgroup or zarr.json.") from None
  if isinstance(node, zarr.Array):
    if dataset not in (None, "", "/"):
      raise UserError(f"{path} is a single array (shape {tuple(node.shape)}), not a "
                      f"group: it has no {dataset!r}; give {path} alone.")
    check_chunks(node, path)
    return Source(node, path, _axes(node.attrs), _metadata(node.attrs))
  ome = _ome(node.attrs)
  arrays = _arrays(node)
  if dataset is None and ome is not None:
    level = ome["datasets"][0]["path"]
    array = node[level]
    axes = axes_from_names(ome.get("axes"))
    check_chunks(array, f"{path}:/{level}")
    return Source(array, f"{path}:/{level}", axes, _metadata(node.attrs))
  found = [(p, tuple(int(n) for n in a.shape)) for p, a in arrays]
  chosen = choose_dataset(path, found, dataset, path)
  array = dict(arrays)[chosen]
  check_chunks(array, f"{path}:{chosen}")
  return Source(array, f"{path}:{chosen}", _axes(array.attrs), _metadata(array.attrs))


def _axes(attrs) -> str | None:
  attrs = dict(attrs)
  given = axes_from_attr(attrs.get("axes"))
  if given:
    return given
  return axes_from_names(attrs.get("_ARRAY_DIMENSIONS"))


def _metadata(attrs) -> MovieMetadata:
  attrs = dict(attrs)
  meta = MovieMetadata(kind="zarr")
  if attrs.get("frame_interval"):
    meta.frame_interval = float(attrs["frame_interval"])
  size = attrs.get("pixel_size")
  if size is not None and len(size) == 2:
    meta.resolution = (1.0 / float(size[1]), 1.0 / float(size[0]))
    meta.unit = str(attrs.get("unit", "µm"))
  return meta


def _codecs(compression: str | None, zarr_format: int) -> dict[str, Any]:
  """The `compressors` keyword for `compression` in a store of `zarr_format` ({} for
  zarr's default: zstd in format 3, blosc in format 2)."""
  if compression is None:
    return {}
  if compression == "none":
    return {"compressors": None}
  if compression in ("zstd", "gzip", "blosc"):
    if zarr_format == 2:  # numcodecs' configuration, as format 2 stores it
      return {"compressors": [{"id": compression}]}
    codecs = {"zstd": zarr.codecs.ZstdCodec, "gzip": zarr.codecs.GzipCodec,
              "blosc": zarr.codecs.BloscCodec}
    return {"compressors": [codecs[compression]()]}
  raise UserError(f"Zarr compression {compression!r} is not available; give "
                  "compression=zstd, gzip, blosc or none.")


def ome_axes(axes: str) -> str:
  """`axes` in the order OME-Zarr requires: time, channel, then space (z, y, x)."""
  return "".join(a for a in "TCZYX" if a in axes)


def ome_attrs(axes: str, metadata: MovieMetadata | None, zarr_format: int
              ) -> dict[str, Any]:
  """The group attributes of a one-level OME-Zarr image (version 0.5 in a format 3
  store, 0.4 in a format 2 store) with the pixel size and frame interval as its scale."""
  metadata = metadata or MovieMetadata()
  size = metadata.pixel_size
  unit = {"µm": "micrometer", "um": "micrometer", "micron": "micrometer",
          "nm": "nanometer", "mm": "millimeter", "cm": "centimeter"}.get(
              metadata.unit or "")
  scale = {"T": float(metadata.frame_interval or 1.0), "C": 1.0, "Z": 1.0,
           "Y": float(size[0]) if size else 1.0, "X": float(size[1]) if size else 1.0}
  kinds = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}
  described = []
  for a in axes:
    axis = {"name": a.lower(), "type": kinds[a]}
    if a == "T" and metadata.frame_interval:
      axis["unit"] = "second"
    elif a in "YX" and size and unit:
      axis["unit"] = unit
    described.append(axis)
  image = {"name": "denoised", "axes": described, "datasets": [
      {"path": "0", "coordinateTransformations": [
          {"type": "scale", "scale": [scale[a] for a in axes]}]}]}
  if zarr_format == 2:
    return {"multiscales": [{"version": "0.4", **image}]}
  return {"ome": {"version": "0.5", "multiscales": [image]}}


class ZarrSink:
  """A movie written block by block into a new Zarr store (a folder): a (T, Y, X)
  array, or (`open_volume`) every plane and channel of a recording in one array.

  Args:
    dataset: the array's path inside the store (None: the store is the array).
    compression: zstd, gzip, blosc or none (None: zarr's default).
    ome: write an OME-Zarr image (a group with the array as level `0` and the
      multiscales metadata), as for a `.ome.zarr` output.
    zarr_format: 3 (the default) or 2, for readers that know only format 2.
  """

  def __init__(self, dataset: str | None, compression: str | None, ome: bool = False,
               zarr_format: int | None = None, final: str | None = None):
    require_zarr("writing Zarr")
    self.dataset = (dataset or "").strip("/")
    self.keep = self._existing_group(final, zarr_format) if self.dataset and not ome \
        else None
    if self.keep is not None and zarr_format is None:
      zarr_format = self.keep.metadata.zarr_format
    self.zarr_format = int(zarr_format or 3)
    self.codecs = _codecs(compression, self.zarr_format)
    self.ome = ome
    self.array = None
    self.axis = 0   # the time axis

  def axes_for(self, axes: str) -> str:
    """The axis order this store is written in, for a recording of `axes`."""
    return ome_axes(axes) if self.ome else axes

  def _existing_group(self, final: str | None, zarr_format: int | None) -> Any:
    """The group store already under the output's name (its other arrays are kept:
    only the named array is replaced), or None."""
    if final is None or not os.path.isdir(final):
      return None
    try:
      node = zarr.open(final, mode="r")
    except Exception:  # not a store: replaced as a whole
      return None
    if not isinstance(node, zarr.Group):
      return None
    if zarr_format is not None and int(zarr_format) != node.metadata.zarr_format:
      raise UserError(f"{final} is a Zarr store of format {node.metadata.zarr_format}; "
                      f"an array of format {zarr_format} cannot be added to it: leave "
                      "out zarr_format (or choose another output).")
    self.final = final
    return node

  def open(self, temp: str, frame_shape, dtype, frames: int | None,
           metadata: MovieMetadata | None) -> None:
    self._create(temp, "TYX", (frames or 0,) + tuple(frame_shape), dtype, metadata,
                 growable=not frames)

  def open_volume(self, temp: str, axes: str, shape, dtype,
                  metadata: MovieMetadata | None) -> Any:
    """A fixed-shape array of `axes` (from `axes_for`) for every plane and channel of
    a recording, chunked by plane, channel and frame block; returns the array."""
    self._create(temp, axes, shape, dtype, metadata, growable=False)
    return self.array

  def _create(self, temp: str, axes: str, shape, dtype, metadata: MovieMetadata | None,
              growable: bool) -> None:
    shape = tuple(int(n) for n in shape)
    args = dict(shape=shape, chunks=chunk_shape(axes, shape, dtype, growable),
                dtype=dtype, config={"write_empty_chunks": True}, **self.codecs)
    if self.keep is not None:  # a copy of the store, with the named array replaced
      shutil.copytree(self.final, temp, dirs_exist_ok=True)
      group = zarr.open_group(temp, mode="r+")
      self.array = group.create_array(self.dataset, overwrite=True, **args)
    elif self.ome or self.dataset:  # the array's format is the group's
      group = zarr.open_group(temp, mode="w", zarr_format=self.zarr_format)
      self.array = group.create_array("0" if self.ome else self.dataset, **args)
      if self.ome:
        group.attrs.update(ome_attrs(axes, metadata, self.zarr_format))
    else:
      self.array = zarr.create_array(store=temp, overwrite=True,
                                     zarr_format=self.zarr_format, **args)
    attrs = metadata_attrs(metadata, axes)
    attrs["_ARRAY_DIMENSIONS"] = [a.lower() for a in axes]
    self.array.attrs.update(attrs)
    self.axis = axes.index("T")

  def write(self, start: int, frames: np.ndarray) -> None:
    end = start + len(frames)
    if self.array.shape[0] < end:
      self.array.resize((end,) + tuple(self.array.shape[1:]))
    self.array[start:end] = frames

  def close(self, count: int) -> None:
    shape = list(self.array.shape)
    if shape[self.axis] != count:
      shape[self.axis] = count
      self.array.resize(tuple(shape))
    self.array = None

  def abort(self) -> None:
    self.array = None
