"""Zarr v2/v3 and OME-Zarr movies (chunked stores: a folder, often named `.zarr`).

Reading opens the array lazily (only the chunks of the frames asked for are read): the
array named after the store (`rec.zarr:/group/array`), else the store's root array, the
full-resolution level of an OME-Zarr image, or the only 3-D array. Writing creates a
chunked array (compressed with zarr's default codec unless `compression=none`) and
fills it block by block. zarr is an optional dependency: `pip install "deepcad-jax[zarr]"`
(zarr-python 2.16+ or 3; stores of format 2 and 3 are read, and zarr 3 writes format 3).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deepcad_jax.data.axes import Source, axes_from_names
from deepcad_jax.data.hdf5 import chunk_frames, choose_dataset, metadata_attrs
from deepcad_jax.data.metadata import MovieMetadata
from deepcad_jax.errors import UserError

zarr: Any = None     # imported on first use (optional, and slow to import)
ZARR3 = False


def require_zarr(what: str) -> Any:
  """The zarr module, or one sentence naming the extra that installs it."""
  global zarr, ZARR3
  if zarr is None:
    try:
      import zarr as module  # deliberate lazy import of an optional library
    except ImportError:
      raise UserError(f"{what} needs zarr, which is not installed; install it with "
                      "pip install \"deepcad-jax[zarr]\".") from None
    zarr, ZARR3 = module, int(module.__version__.split(".")[0]) >= 3
  return zarr


def _arrays(group) -> list[tuple[str, Any]]:
  """(path, array) of every array in a Zarr group, at any depth."""
  if hasattr(group, "members"):  # zarr 3
    return [("/" + name, obj) for name, obj in group.members(max_depth=None)
            if isinstance(obj, zarr.Array)]
  found: list[tuple[str, Any]] = []
  group.visititems(lambda name, obj: found.append(("/" + name, obj))
                   if isinstance(obj, zarr.Array) else None)
  return found


def _ome(attrs) -> dict | None:
  """The first OME-Zarr multiscale image of a group's attributes (v0.4 or v0.5)."""
  attrs = dict(attrs)
  scales = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
  return scales[0] if scales else None


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
    return Source(node, path, _axes(node.attrs), _metadata(node.attrs))
  ome = _ome(node.attrs)
  arrays = _arrays(node)
  if dataset is None and ome is not None:
    level = ome["datasets"][0]["path"]
    array = node[level]
    axes = axes_from_names(ome.get("axes"))
    return Source(array, f"{path}:/{level}", axes, _metadata(node.attrs))
  found = [(p, tuple(int(n) for n in a.shape)) for p, a in arrays]
  chosen = choose_dataset(path, found, dataset, path)
  array = dict(arrays)[chosen]
  return Source(array, f"{path}:{chosen}", _axes(array.attrs), _metadata(array.attrs))


def _axes(attrs) -> str | None:
  attrs = dict(attrs)
  if isinstance(attrs.get("axes"), str):
    return attrs["axes"].upper()
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


def _codecs(compression: str | None) -> dict[str, Any]:
  """The keyword that sets compression in this zarr version ({} for zarr's default)."""
  if compression is None:
    return {}
  if compression == "none":
    return {"compressors": None} if ZARR3 else {"compressor": None}
  if ZARR3:
    codecs = {"zstd": zarr.codecs.ZstdCodec, "gzip": zarr.codecs.GzipCodec,
              "blosc": zarr.codecs.BloscCodec}
    if compression in codecs:
      return {"compressors": [codecs[compression]()]}
  else:
    import numcodecs  # comes with zarr 2
    codecs = {"zstd": numcodecs.Zstd, "gzip": numcodecs.GZip, "blosc": numcodecs.Blosc}
    if compression in codecs:
      return {"compressor": codecs[compression]()}
  raise UserError(f"Zarr compression {compression!r} is not available; give "
                  "compression=zstd, gzip, blosc or none.")


class ZarrSink:
  """A (T, Y, X) array written block by block into a new Zarr store (a folder)."""

  def __init__(self, dataset: str | None, compression: str | None):
    require_zarr("writing Zarr")
    self.dataset = (dataset or "").strip("/")
    self.codecs = _codecs(compression)
    self.array = None

  def open(self, temp: str, frame_shape, dtype, frames: int | None,
           metadata: MovieMetadata | None) -> None:
    n = chunk_frames(frame_shape, dtype)
    shape = (frames or 0,) + tuple(frame_shape)
    chunks = (min(n, frames) if frames else n,) + tuple(frame_shape)
    args = dict(shape=shape, chunks=chunks, dtype=dtype, **self.codecs)
    if self.dataset:
      group = zarr.open_group(temp, mode="w")
      create = group.create_array if ZARR3 else group.create_dataset
      self.array = create(self.dataset, **args)
    elif ZARR3:
      self.array = zarr.create_array(store=temp, overwrite=True, **args)
    else:
      self.array = zarr.open_array(temp, mode="w", **args)
    attrs = metadata_attrs(metadata)
    attrs["_ARRAY_DIMENSIONS"] = ["t", "y", "x"]
    self.array.attrs.update(attrs)

  def write(self, start: int, frames: np.ndarray) -> None:
    end = start + len(frames)
    if self.array.shape[0] < end:
      self.array.resize((end,) + tuple(self.array.shape[1:]))
    self.array[start:end] = frames

  def close(self, count: int) -> None:
    if self.array.shape[0] != count:
      self.array.resize((count,) + tuple(self.array.shape[1:]))
    self.array = None

  def abort(self) -> None:
    self.array = None
