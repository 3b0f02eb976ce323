"""NWB files: a `TwoPhotonSeries` or `OnePhotonSeries` in, a denoised series out.

Reading (pynwb) takes the series named after the file (`rec.nwb:TwoPhotonSeries`, or
its path, `rec.nwb:acquisition/TwoPhotonSeries`), else the only imaging series of the
file; its data is read lazily (frames (T, Y, X), or (T, Y, X, Z) for a volume).

Writing makes a new NWB file. From an NWB input it is a copy of the input's metadata
(session, subject, devices, imaging planes, other processing results; the raw imaging
series are left out) plus the denoised series, a copy of the input series' attributes
and links with the new frames; from any other input, a new file with one series. The
series goes to `processing/ophys/<name>_denoised`, or to `acquisition/` with
`--nwb-acquisition` (where suite2p's NWB reader looks for it). pynwb and h5py are
optional dependencies: `pip install "deepcad-jax[nwb]"`.
"""

from __future__ import annotations

import datetime
import uuid
import warnings
from typing import Any

import numpy as np

from deepcad_jax.data.axes import Source
from deepcad_jax.data.formats.hdf5 import (DatasetWriter, check_in_file, chunk_frames,
                                           require_h5py)
from deepcad_jax.data.metadata import MovieMetadata
from deepcad_jax.errors import UserError

SERIES_TYPES = ("TwoPhotonSeries", "OnePhotonSeries")
_MOVIE_TYPES = {"TwoPhotonSeries", "OnePhotonSeries", "ImageSeries"}
_EXTRA = "pip install \"deepcad-jax[nwb]\""


def require_pynwb(what: str) -> Any:
  """The pynwb module, or one sentence naming the extra that installs it."""
  require_h5py(what)
  try:
    import pynwb  # deliberate lazy import: optional, and a second to import
  except ImportError:
    raise UserError(f"{what} needs pynwb, which is not installed; install it with "
                    f"{_EXTRA}.") from None
  return pynwb


def _series_of(nwbfile, pynwb) -> list[tuple[str, Any]]:
  """(path in the file, series) of every two- or one-photon series."""
  kinds = tuple(getattr(pynwb.ophys, k) for k in SERIES_TYPES if hasattr(pynwb.ophys, k))
  found = []
  for obj in nwbfile.objects.values():
    if isinstance(obj, kinds):
      parts, node = [obj.name], obj.parent
      while node is not None and node is not nwbfile:
        parts.append(node.name)
        node = node.parent
      where = "/".join(reversed(parts))
      found.append((where if where.startswith(("acquisition", "processing")) else
                    f"acquisition/{where}" if obj.name in nwbfile.acquisition else where,
                    obj))
  return sorted(found, key=lambda f: f[0])


def open_nwb(path: str, name: str | None) -> Source:
  """The imaging series of an NWB file, its data read lazily."""
  pynwb = require_pynwb(f"{path} (NWB)")
  try:
    io = pynwb.NWBHDF5IO(path, "r")
    nwbfile = io.read()
  except Exception as e:  # pynwb and hdmf raise many kinds for a file they cannot read
    raise UserError(f"{path} is not a readable NWB file ({type(e).__name__}: {e}); check "
                    "the file (or give its format, e.g. hdf5:PATH:/dataset).") from None
  try:
    found = _series_of(nwbfile, pynwb)
    listed = ", ".join(f"{p} ({type(s).__name__} {tuple(s.data.shape)})"
                       for p, s in found) or "none"
    if name is not None:
      key = name.strip("/")
      match = [(p, s) for p, s in found if key in (p, s.name, p.split("/")[-1])]
      if len(match) != 1:
        raise UserError(f"{path} has {'no' if not match else 'several'} imaging series "
                        f"named {name!r} (found: {listed}); give one of these, e.g. "
                        f"{path}:{found[0][0] if found else 'TwoPhotonSeries'}.")
    else:
      match = found
      if len(found) != 1:
        what = "no TwoPhotonSeries or OnePhotonSeries" if not found else \
            f"{len(found)} imaging series ({listed})"
        raise UserError(f"{path} holds {what}; name the one to read, e.g. "
                        f"{path}:{found[0][0] if found else 'TwoPhotonSeries'}.")
    where, series = match[0]
    data = series.data
    if data is None or not hasattr(data, "shape") or len(data.shape) < 3:
      raise UserError(f"{path}:{where} holds no frames in the file (its frames may be in "
                      "external files: read those instead).")
    if hasattr(data, "is_virtual") and hasattr(data, "external"):  # an h5py dataset
      check_in_file(data, f"{path}:{where}", path)
    meta = MovieMetadata(kind="nwb")
    rate = getattr(series, "rate", None)
    if rate:
      meta.frame_interval = 1.0 / float(rate)
    meta.extra["nwb_source"] = path
    meta.extra["nwb_series"] = "/" + where
    axes = "TYX" if len(data.shape) == 3 else "TYXZ" if len(data.shape) == 4 else None
    return Source(data, f"{path}:{where}", axes, meta, io.close)
  except BaseException:
    io.close()
    raise


def _new_id(group) -> None:
  if "object_id" in group.attrs:
    group.attrs["object_id"] = str(uuid.uuid4())


def _copy_without_movies(h5py, src, dst, refs: list) -> None:
  """`src` (a group) into `dst`: attributes, links, datasets and groups, leaving out
  imaging series (the raw movies). Object references are collected in `refs` as
  (object, attribute or None, names) to be pointed at the copies (`_relink`)."""
  _copy_attrs(h5py, src, dst, refs)
  for name in src:
    link = src.get(name, getlink=True)
    if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
      dst[name] = link
      continue
    obj = src[name]
    if isinstance(obj, h5py.Group):
      kind = obj.attrs.get("neurodata_type")
      kind = kind.decode() if isinstance(kind, bytes) else kind
      if kind in _MOVIE_TYPES:
        continue
      _copy_without_movies(h5py, obj, dst.require_group(name), refs)
    else:
      src.copy(obj, dst, name, without_attrs=True)
      _copy_attrs(h5py, obj, dst[name], refs)
      if h5py.check_dtype(ref=obj.dtype) is not None and obj.dtype.names is None:
        names = [src.file[r].name if r else None for r in np.ravel(obj[()])]
        refs.append((dst[name], None, names, obj.shape))


def _copy_attrs(h5py, src, dst, refs: list) -> None:
  for key, value in src.attrs.items():
    if isinstance(value, h5py.Reference):
      refs.append((dst, key, [src.file[value].name if value else None], ()))
      continue
    dst.attrs[key] = value


def _relink(h5py, f, refs: list) -> None:
  """Point the copied object references at the copies (references to objects left out,
  e.g. a raw movie, become null references)."""
  for obj, key, names, shape in refs:
    new = [f[n].ref if n is not None and n in f else h5py.Reference() for n in names]
    if key is not None:
      obj.attrs.create(key, new[0], dtype=h5py.ref_dtype)
    else:
      obj[...] = np.array(new, dtype=h5py.ref_dtype).reshape(shape)


def _module(h5py, f, acquisition: bool):
  """The group that receives the series: /acquisition, or /processing/ophys."""
  if acquisition:
    return f.require_group("acquisition")
  processing = f.require_group("processing")
  if "ophys" not in processing:
    ophys = processing.create_group("ophys")
    ophys.attrs.update({"namespace": "core", "neurodata_type": "ProcessingModule",
                        "object_id": str(uuid.uuid4()),
                        "description": "optical physiology processed data"})
  return processing["ophys"]


class NWBSink(DatasetWriter):
  """A denoised imaging series written block by block into a new NWB file."""

  def __init__(self, name: str | None, acquisition: bool):
    require_pynwb("writing NWB")
    self.name = name.strip("/").split("/")[-1] if name else None
    self.acquisition = acquisition
    self.file = None
    self.data = None

  def open(self, temp: str, frame_shape, dtype, frames: int | None,
           metadata: MovieMetadata | None) -> None:
    h5py = require_h5py("writing NWB")
    metadata = metadata or MovieMetadata()
    source = metadata.extra.get("nwb_source")
    chunks = (chunk_frames(frame_shape, dtype),) + tuple(frame_shape)
    if source:
      where = self._copy(h5py, temp, source, metadata.extra["nwb_series"], frame_shape,
                         dtype, chunks)
    else:
      where = self._new(temp, frame_shape, dtype, chunks, metadata)
    self.file = h5py.File(temp, "r+")
    self.data = self.file[where]
    self.data.resize(frames or 0, axis=0)

  def _copy(self, h5py, temp, source, series_path, frame_shape, dtype, chunks) -> str:
    refs: list = []
    with h5py.File(source, "r") as src, h5py.File(temp, "w") as dst:
      _copy_without_movies(h5py, src, dst, refs)
      _new_id(dst)
      if "identifier" in dst:
        del dst["identifier"]
      dst.create_dataset("identifier", data=str(uuid.uuid4()))
      series = src[series_path]
      name = self.name or f"{series.name.split('/')[-1]}_denoised"
      parent = _module(h5py, dst, self.acquisition)
      group = parent.create_group(name)
      _copy_attrs(h5py, series, group, refs)
      _new_id(group)
      for child in series:
        link = series.get(child, getlink=True)
        if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
          group[child] = link
        elif child not in ("data", "external_file"):
          series.copy(series[child], group, child, without_attrs=True)
          _copy_attrs(h5py, series[child], group[child], refs)
      data = group.create_dataset("data", shape=(0,) + tuple(frame_shape), dtype=dtype,
                                  maxshape=(None,) + tuple(frame_shape), chunks=chunks)
      if "data" in series:
        _copy_attrs(h5py, series["data"], data, refs)
      _relink(h5py, dst, refs)
      return data.name

  def _new(self, temp, frame_shape, dtype, chunks, metadata: MovieMetadata) -> str:
    pynwb = require_pynwb("writing NWB")
    from hdmf.backends.hdf5.h5_utils import H5DataIO  # comes with pynwb
    rate = 1.0 / metadata.frame_interval if metadata.frame_interval else 1.0
    nwbfile = pynwb.NWBFile(
        session_description="denoised by deepcad-jax" + (
            "" if metadata.frame_interval else " (frame rate unknown: rate 1 Hz stored)"),
        identifier=str(uuid.uuid4()),
        session_start_time=datetime.datetime.now(datetime.timezone.utc))
    device = nwbfile.create_device(name="Microscope")
    channel = pynwb.ophys.OpticalChannel(name="OpticalChannel", description="unknown",
                                         emission_lambda=float("nan"))
    plane = nwbfile.create_imaging_plane(
        name="ImagingPlane", optical_channel=channel, imaging_rate=float(rate),
        description="unknown", device=device, excitation_lambda=float("nan"),
        indicator="unknown", location="unknown")
    name = self.name or "denoised"
    series = pynwb.ophys.TwoPhotonSeries(
        name=name, imaging_plane=plane, rate=float(rate), unit="n.a.",
        data=H5DataIO(np.zeros((1,) + tuple(frame_shape), dtype),
                      maxshape=(None,) + tuple(frame_shape), chunks=chunks))
    if self.acquisition:
      nwbfile.add_acquisition(series)
      where = f"/acquisition/{name}/data"
    else:
      nwbfile.create_processing_module("ophys", "optical physiology processed data"
                                       ).add(series)
      where = f"/processing/ophys/{name}/data"
    with warnings.catch_warnings():  # the temporary name does not end in .nwb
      warnings.filterwarnings("ignore", message=".*does not end in '.nwb'")
      with pynwb.NWBHDF5IO(temp, "w") as io:
        io.write(nwbfile)
    return where

