"""Acquisition metadata of a TIFF movie, read from the input and written to every output.

`read_metadata` collects what a microscope or ImageJ/Fiji stored besides the pixels:
the pixel size (resolution tags) and its unit, the frame interval, the plane spacing,
ImageJ's hyperstack fields (display range, calibration function, Info, Properties,
LUTs...) and OME-XML's image, pixel and channel attributes. `Format` turns them back into
a TIFF description for an output movie of another dtype or length: an ImageJ input gives
an ImageJ hyperstack, an OME input (or an output named `.ome.tif`) an OME-TIFF, anything
else tifffile's JSON description with the same fields; the resolution tags are copied.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np
import tifffile

log = logging.getLogger("deepcad_jax")

OME_SUFFIXES = (".ome.tif", ".ome.tiff")
IMAGEJ_DTYPES = "BHhf"   # uint8, uint16, int16, float32: what ImageJ hyperstacks hold
# ImageJ description fields that describe the shape: recomputed for each output.
_IMAGEJ_SHAPE_KEYS = {"ImageJ", "images", "channels", "slices", "frames", "hyperstack",
                      "axes", "shape"}
# ImageJ fields stored in the IJMetadata tag rather than the description.
_IMAGEJ_TAG_KEYS = ("Info", "Properties", "Ranges", "LUTs")
_OME_PIXEL_KEYS = ("PhysicalSizeX", "PhysicalSizeXUnit", "PhysicalSizeY",
                   "PhysicalSizeYUnit", "PhysicalSizeZ", "PhysicalSizeZUnit",
                   "TimeIncrement", "TimeIncrementUnit")
_OME_CHANNEL_KEYS = ("Name", "AcquisitionMode", "Color", "ContrastMethod",
                     "EmissionWavelength", "EmissionWavelengthUnit",
                     "ExcitationWavelength", "ExcitationWavelengthUnit", "Fluor",
                     "IlluminationType", "NDFilter", "PinholeSize", "PinholeSizeUnit",
                     "PockelCellSetting")
_OME_PLANE_KEYS = ("DeltaT", "DeltaTUnit", "ExposureTime", "ExposureTimeUnit")
_SECONDS = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9, "min": 60.0,
            "h": 3600.0}
_OME_UNITS = {"micron": "µm", "microns": "µm", "um": "µm", "µm": "µm", "\\u00B5m": "µm",
              "nm": "nm", "mm": "mm", "cm": "cm", "m": "m", "pm": "pm", "Å": "Å"}


@dataclasses.dataclass
class MovieMetadata:
  """What a TIFF says about its movie besides the pixels.

  `kind` is the format it came in ('imagej', 'ome', 'tiff', or 'none' for an array).
  `resolution` is (x, y) pixels per `unit` as the TIFF tags hold it, with the TIFF
  `resolution_unit` code; `frame_interval` is in seconds, `spacing` (between planes) in
  `unit`. `imagej`, `ome` and `extra` keep the other fields of each format as read.
  """

  kind: str = "none"
  axis: str = "T"
  resolution: tuple[float, float] | None = None
  resolution_unit: int | None = None
  unit: str | None = None
  frame_interval: float | None = None
  spacing: float | None = None
  imagej: dict = dataclasses.field(default_factory=dict)
  ome: dict = dataclasses.field(default_factory=dict)
  extra: dict = dataclasses.field(default_factory=dict)

  @property
  def pixel_size(self) -> tuple[float, float] | None:
    """(y, x) size of a pixel in `unit`, or None where the file does not say."""
    if self.resolution is None:
      return None
    x, y = self.resolution
    return (1.0 / y, 1.0 / x)

  def describe(self) -> str:
    """The fields in words (for logs and reports)."""
    parts = []
    if self.pixel_size is not None:
      py, px = self.pixel_size
      parts.append(f"pixel {px:.4g} x {py:.4g} {self.unit or '(no unit)'}")
    if self.frame_interval is not None:
      parts.append(f"frame interval {self.frame_interval:.4g} s")
    if self.spacing is not None:
      parts.append(f"spacing {self.spacing:.4g} {self.unit or ''}".rstrip())
    return ", ".join(parts) or "no calibration"


# ------------------------------------------------------------------ reading


def read_metadata(tif: tifffile.TiffFile, axis: str = "T") -> MovieMetadata:
  """The metadata of an open TIFF whose first series is the movie (frames on `axis`).

  A field that cannot be parsed is left out with a note in the log: metadata never stops
  a movie from being denoised.
  """
  axis = axis if axis in "TZ" else "T"
  try:
    if tif.is_ome and tif.ome_metadata:
      md = _from_ome(tif.ome_metadata, axis)
    elif tif.is_imagej and tif.imagej_metadata is not None:
      md = _from_imagej(tif.imagej_metadata, axis)
    else:
      md = MovieMetadata(kind="tiff", axis=axis)
      shaped = tif.shaped_metadata
      if shaped:
        md.extra = {k: v for k, v in shaped[0].items() if k not in ("shape", "axes")
                    and _jsonable(v)}
        md.unit = _text(md.extra.pop("unit", None))
        md.frame_interval = _number(md.extra.pop("finterval", None))
        md.spacing = _number(md.extra.pop("spacing", None))
    page = tif.pages.first
    res, unit = _resolution(page)
    if res is not None and md.resolution is None:
      md.resolution, md.resolution_unit = res, unit
      if md.unit is None and unit in (2, 3):
        md.unit = {2: "inch", 3: "cm"}[unit]
    return md
  except Exception as e:  # noqa: BLE001 - unusual metadata must not stop a run
    log.warning("%s: metadata not understood (%s); the output will not carry it.",
                getattr(tif, "filename", "TIFF"), e)
    return MovieMetadata(kind="tiff", axis=axis)


def _resolution(page) -> tuple[tuple[float, float] | None, int | None]:
  tags = page.tags
  if "XResolution" not in tags or "YResolution" not in tags:
    return None, None
  x, y = (_rational(tags[n].value) for n in ("XResolution", "YResolution"))
  unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
  if not (x and y and math.isfinite(x) and math.isfinite(y)) or (x == y == 1 and unit == 1):
    return None, None  # 1 pixel per nothing: what writers put when they know nothing
  return (x, y), unit


def _rational(value) -> float:
  if isinstance(value, tuple):
    return value[0] / value[1] if value[1] else float("nan")
  return float(value)


def _from_imagej(ij: dict, axis: str) -> MovieMetadata:
  md = MovieMetadata(kind="imagej", axis=axis)
  md.unit = _text(ij.get("unit"))
  md.frame_interval = _number(ij.get("finterval"))
  md.spacing = _number(ij.get("spacing"))
  for key, value in ij.items():
    if key in _IMAGEJ_SHAPE_KEYS or key in ("unit", "finterval", "spacing"):
      continue
    if key in _IMAGEJ_TAG_KEYS:
      md.imagej[key] = value
    elif isinstance(value, (str, int, float, bool)):
      md.imagej[key] = value
  return md


def _from_ome(xml: str, axis: str) -> MovieMetadata:
  md = MovieMetadata(kind="ome", axis=axis)
  root = ET.fromstring(xml)
  image = next((e for e in root if _local(e.tag) == "Image"), None)
  if image is None:
    return md
  pixels = next((e for e in image if _local(e.tag) == "Pixels"), None)
  ome: dict[str, Any] = {}
  if "Name" in image.attrib:
    ome["Name"] = image.attrib["Name"]
  for child in image:
    if _local(child.tag) in ("AcquisitionDate", "Description") and child.text:
      ome[_local(child.tag)] = child.text
  if pixels is not None:
    for key in _OME_PIXEL_KEYS:
      if key in pixels.attrib:
        value = pixels.attrib[key]
        ome[key] = value if key.endswith("Unit") else float(value)
    channel = next((e for e in pixels if _local(e.tag) == "Channel"), None)
    if channel is not None:
      attrs = {k: channel.attrib[k] for k in _OME_CHANNEL_KEYS if k in channel.attrib}
      if attrs:
        ome["Channel"] = attrs
    planes = [e.attrib for e in pixels if _local(e.tag) == "Plane"]
    plane = {k: [p.get(k) for p in planes] for k in _OME_PLANE_KEYS
             if planes and all(k in p for p in planes)}
    if plane:
      ome["Plane"] = plane
  md.ome = ome
  if "PhysicalSizeX" in ome and "PhysicalSizeY" in ome:
    md.resolution = (1.0 / ome["PhysicalSizeX"], 1.0 / ome["PhysicalSizeY"])
    md.resolution_unit = 1
    md.unit = ome.get("PhysicalSizeXUnit", "µm")
  if "TimeIncrement" in ome:
    md.frame_interval = ome["TimeIncrement"] * _SECONDS.get(
        ome.get("TimeIncrementUnit", "s"), float("nan"))
    if not math.isfinite(md.frame_interval):
      md.frame_interval = None
  if "PhysicalSizeZ" in ome:
    md.spacing = ome["PhysicalSizeZ"]
  return md


def _local(tag: str) -> str:
  return tag.rsplit("}", 1)[-1]


def _number(value) -> float | None:
  try:
    v = float(value)
  except (TypeError, ValueError):
    return None
  return v if math.isfinite(v) else None


def _text(value) -> str | None:
  return None if value is None else str(value)


def _jsonable(value) -> bool:
  try:
    json.dumps(value)
  except (TypeError, ValueError):
    return False
  return True


# ------------------------------------------------------------------ writing


@dataclasses.dataclass
class Format:
  """How one output movie is described: its ImageDescription (written once all frames
  are known), extra tags and the keyword arguments of every page."""

  kind: str                 # 'imagej', 'ome' or 'tiff'
  metadata: MovieMetadata

  @staticmethod
  def choose(path: str, dtype, metadata: MovieMetadata | None) -> Format:
    """OME for a `.ome.tif` name or an OME input, ImageJ for an ImageJ input (in a dtype
    ImageJ holds), tifffile's JSON description otherwise."""
    md = metadata or MovieMetadata()
    if path.lower().endswith(OME_SUFFIXES) or md.kind == "ome":
      return Format("ome", md)
    if md.kind == "imagej" and np.dtype(dtype).char in IMAGEJ_DTYPES:
      return Format("imagej", md)
    return Format("tiff", md)

  def page_kwargs(self) -> dict:
    md = self.metadata
    if md.resolution is None:
      return {}
    return {"resolution": tuple(float(r) for r in md.resolution),
            "resolutionunit": md.resolution_unit or 1}

  def extratags(self) -> list:
    ij = {k: v for k, v in self.metadata.imagej.items() if k in _IMAGEJ_TAG_KEYS}
    if self.kind != "imagej" or not ij:
      return []
    return list(tifffile.imagej_metadata_tag(ij, "<"))

  def description(self, shape: tuple[int, int, int], dtype) -> str:
    """The ImageDescription of a finished movie of `shape` (T, Y, X) and `dtype`."""
    md = self.metadata
    axes = md.axis + "YX"
    if self.kind == "imagej":
      fields = {k: v for k, v in md.imagej.items() if k not in _IMAGEJ_TAG_KEYS}
      for key, value in (("unit", md.unit), ("spacing", md.spacing),
                         ("finterval", md.frame_interval)):
        if value is not None:
          fields[key] = value
      return tifffile.imagej_description(shape, axes, **fields)
    if self.kind == "ome":
      ome = self._ome_fields(shape)
      xml = tifffile.OmeXml()
      xml.addimage(np.dtype(dtype), shape, (shape[0], 1, 1, shape[1], shape[2], 1),
                   axes=axes, **ome)
      return xml.tostring(declaration=True)
    fields = {"shape": list(shape), "axes": axes, **md.extra}
    for key, value in (("unit", md.unit), ("spacing", md.spacing),
                       ("finterval", md.frame_interval)):
      if value is not None:
        fields[key] = value
    return json.dumps(fields)

  def _ome_fields(self, shape) -> dict:
    md = self.metadata
    if md.kind == "ome":
      ome = dict(md.ome)
      plane = ome.pop("Plane", None)
      if plane and all(len(v) == shape[0] for v in plane.values()):
        ome["Plane"] = plane
      return ome
    ome = {}
    unit = _OME_UNITS.get(md.unit or "")
    if md.pixel_size is not None and unit:
      py, px = md.pixel_size
      ome.update(PhysicalSizeX=px, PhysicalSizeXUnit=unit, PhysicalSizeY=py,
                 PhysicalSizeYUnit=unit)
      if md.spacing is not None:
        ome.update(PhysicalSizeZ=md.spacing, PhysicalSizeZUnit=unit)
    if md.frame_interval is not None:
      ome.update(TimeIncrement=md.frame_interval, TimeIncrementUnit="s")
    return ome
