"""Regions of interest: read from a label image (TIFF, 0 = background), a JSON file of
polygons, masks or pixel lists, or suite2p's `stat.npy`. Each ROI is a weighted set of
pixels of a (Y, X) frame; `analysis.traces` turns them into traces."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from deepcad_jax.data import safe_pickle
from deepcad_jax.data.movie import read_frames
from deepcad_jax.errors import UserError
from deepcad_jax.runtime.paths import check_input


@dataclasses.dataclass(frozen=True)
class Roi:
  """A region: flat pixel indices into a (Y, X) frame and weights that sum to 1."""

  name: str
  index: np.ndarray
  weight: np.ndarray

  @property
  def pixels(self) -> int:
    return int(self.index.size)


def _roi(name: str, mask_or_index, shape, weight=None, where: str = "") -> Roi:
  index = np.asarray(mask_or_index)
  if index.dtype == bool:
    if index.shape != tuple(shape):
      raise UserError(f"{where}mask of ROI {name!r} is {index.shape}, but the frames are "
                      f"{tuple(shape)}.")
    index = np.flatnonzero(index)
  w = np.ones(index.size) if weight is None else np.asarray(weight, np.float64)
  if index.size == 0 or not np.isfinite(w).all() or w.sum() <= 0:
    raise UserError(f"{where}ROI {name!r} has no pixels (or no positive weight) inside "
                    f"the {shape[0]}x{shape[1]} frame.")
  return Roi(name, index.astype(np.int64), w / w.sum())


def rois_from_labels(labels: np.ndarray, where: str = "") -> list[Roi]:
  """One ROI per non-zero label of a (Y, X) integer image, named by its label."""
  labels = np.asarray(labels)
  if labels.ndim != 2 or labels.dtype.kind not in "iub":
    raise UserError(f"{where}a label image must be a 2-D integer image; got "
                    f"{labels.dtype} {labels.shape}.")
  flat = labels.ravel()
  return [_roi(str(int(v)), np.flatnonzero(flat == v), labels.shape, where=where)
          for v in np.unique(flat) if v != 0]


def polygon_mask(vertices: Sequence[Sequence[float]], shape: tuple[int, int]) -> np.ndarray:
  """Pixels whose centres (integer (y, x) coordinates) lie inside a polygon of (y, x)
  vertices (even-odd rule)."""
  v = np.asarray(vertices, np.float64)
  if v.ndim != 2 or v.shape[1] != 2 or len(v) < 3:
    raise UserError(f"a polygon needs at least 3 [y, x] vertices; got {v.tolist()}.")
  yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float64)
  inside = np.zeros(shape, bool)
  for (ay, ax), (by, bx) in zip(v, np.roll(v, -1, axis=0)):
    if ay == by:
      continue  # a horizontal edge crosses no row of centres
    crosses = (ay > yy) != (by > yy)
    x_at = ax + (yy - ay) * (bx - ax) / (by - ay)
    inside ^= crosses & (xx < x_at)
  return inside


def rois_from_json(spec, shape: tuple[int, int], where: str = "") -> list[Roi]:
  """ROIs from {"rois": [...]} or a list of entries, each with a "name" and one of
  "polygon" ([[y, x], ...]), "mask" (a (Y, X) list of 0/1) or "pixels" ([[y, x], ...],
  optional "weights")."""
  entries = spec.get("rois") if isinstance(spec, dict) else spec
  if not isinstance(entries, list) or not entries:
    raise UserError(f"{where}expected {{\"rois\": [...]}} or a list of ROIs, each with "
                    "'polygon', 'mask' or 'pixels'.")
  rois = []
  for i, entry in enumerate(entries):
    name = str(entry.get("name", i + 1)) if isinstance(entry, dict) else str(i + 1)
    if not isinstance(entry, dict):
      raise UserError(f"{where}ROI {i + 1} is not an object with 'polygon', 'mask' or "
                      "'pixels'.")
    if "polygon" in entry:
      rois.append(_roi(name, polygon_mask(entry["polygon"], shape), shape, where=where))
    elif "mask" in entry:
      rois.append(_roi(name, np.asarray(entry["mask"]).astype(bool), shape, where=where))
    elif "pixels" in entry:
      yx = np.asarray(entry["pixels"], np.int64).reshape(-1, 2)
      if (yx < 0).any() or (yx[:, 0] >= shape[0]).any() or (yx[:, 1] >= shape[1]).any():
        raise UserError(f"{where}ROI {name!r} has pixels outside the "
                        f"{shape[0]}x{shape[1]} frame.")
      rois.append(_roi(name, yx[:, 0] * shape[1] + yx[:, 1], shape, entry.get("weights"),
                       where))
    else:
      raise UserError(f"{where}ROI {name!r} has none of 'polygon', 'mask', 'pixels'.")
  return rois


_STAT = "suite2p's stat.npy (an array of dicts)"
_STAT_FIX = "give the stat.npy that suite2p wrote"


def _stat_field(path: str, i: int, entry: dict, key: str, kinds: str,
                size: int | None) -> int:
  """Checks that stat[i][key] is a 1-D array (or list) of the given dtype kinds and size;
  returns its size."""
  try:
    value = np.asarray(entry[key])
  except (TypeError, ValueError, OverflowError):
    value = None
  if value is None or value.ndim != 1 or value.dtype.kind not in kinds or (
      size is not None and value.size != size) or (
      value.dtype.kind == "f" and not np.isfinite(value).all()):
    raise UserError(f"{path}: ROI {i} has a malformed {key!r} (suite2p writes one "
                    f"number per pixel); {_STAT_FIX}.")
  return int(value.size)


def read_suite2p_stat(path: str) -> list[dict]:
  """suite2p's stat.npy (an object array of dicts), read without running pickle code
  (`safe_pickle`: numpy arrays and scalars only, rebuilt by copying); each ROI's pixel
  lists are checked."""
  stat = list(safe_pickle.load_npy(path, safe_pickle.NUMPY, what=_STAT,
                                   fix=_STAT_FIX).ravel())
  if not all(isinstance(s, dict) and "ypix" in s and "xpix" in s for s in stat):
    raise UserError(f"{path} is not suite2p's stat.npy: entries need 'ypix' and 'xpix'; "
                    f"{_STAT_FIX}.")
  for i, s in enumerate(stat):
    n = _stat_field(path, i, s, "ypix", "iuf", None)
    _stat_field(path, i, s, "xpix", "iuf", n)
    if "lam" in s:
      _stat_field(path, i, s, "lam", "iuf", n)
    if "overlap" in s:
      _stat_field(path, i, s, "overlap", "biu", n)
  return stat


def rois_from_suite2p(stat: list[dict], shape: tuple[int, int], where: str = "") -> list[Roi]:
  """suite2p's weighting: pixels weighted by 'lam', pixels shared with another ROI
  ('overlap') left out, as suite2p extracts F."""
  rois = []
  for i, s in enumerate(stat):
    y, x = np.asarray(s["ypix"], np.int64), np.asarray(s["xpix"], np.int64)
    lam = np.asarray(s.get("lam", np.ones(y.size)), np.float64)
    keep = ~np.asarray(s.get("overlap", np.zeros(y.size, bool)), bool)
    keep &= (y >= 0) & (y < shape[0]) & (x >= 0) & (x < shape[1])
    if not keep.any():
      keep = (y >= 0) & (y < shape[0]) & (x >= 0) & (x < shape[1])
    rois.append(_roi(str(i), y[keep] * shape[1] + x[keep], shape, lam[keep], where))
  return rois


def read_rois(path: str, frame_shape: tuple[int, int]) -> list[Roi]:
  """ROIs from a label TIFF, a JSON file or suite2p's stat.npy, for (Y, X) frames."""
  where = f"{path}: "
  if not os.path.lexists(path):
    raise UserError(f"{path} does not exist; give a label TIFF, a JSON of ROIs or "
                    "suite2p's stat.npy.")
  check_input(path, folder=False)  # no FIFO, device or looping link
  lower = path.lower()
  if lower.endswith((".tif", ".tiff")):
    labels = np.squeeze(read_frames(path))
    if labels.shape != tuple(frame_shape):
      raise UserError(f"{where}the label image is {labels.shape} but the frames are "
                      f"{tuple(frame_shape)}.")
    rois = rois_from_labels(labels, where)
  elif lower.endswith(".json"):
    with open(path) as f:
      try:
        spec = json.load(f)
      except json.JSONDecodeError as e:
        raise UserError(f"{where}not valid JSON ({e}).") from None
      except RecursionError:
        raise UserError(f"{where}the JSON is nested too deeply to be a list of ROIs; "
                        "give {\"rois\": [{\"name\": ..., \"polygon\": [[y, x], ...]}]}."
                        ) from None
      except UnicodeDecodeError as e:
        raise UserError(f"{where}not UTF-8 text ({e}); give a JSON file of ROIs.") from None
    rois = rois_from_json(spec, frame_shape, where)
  elif lower.endswith(".npy"):
    rois = rois_from_suite2p(read_suite2p_stat(path), frame_shape, where)
  else:
    raise UserError(f"{path}: ROIs must be a label .tif, a .json or suite2p's stat.npy.")
  if not rois:
    raise UserError(f"{path} holds no ROI.")
  return rois
