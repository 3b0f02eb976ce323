"""How much does a model invent? A hallucination audit built from the recording itself.

Two control scenes are made from the recording's own statistics, where the truth is
known, and denoised by the same model with the recording's normalisation:

- the static scene: the recording's mean image plus noise drawn from its fitted noise
  model (`analysis.noise`: Poisson-Gaussian variance, neighbour correlation). Nothing
  changes in time, so any temporal wobble of the output, and any event, is invented.
  The wobble is reported against the noise std of each pixel; events are found by the
  `events` check run on the output against the known static truth (boxes where the
  output exceeds the truth beyond the raw noise, z > AUDIT_EVENT_THRESHOLD).
- the flat scene: a constant image at the recording's mean intensity plus noise. Any
  spatial contrast of the output is invented. It is reported as the spatial std of the
  output's temporal mean and of single frames, against the raw noise std, and as blobs
  that a simple cell finder would call cells: 4-connected regions of AUDIT_BLOB_AREA
  pixels or more whose local contrast (a pixel minus the mean of the AUDIT_BLOB_WINDOW
  square around it) exceeds AUDIT_BLOB_SIGMA times the noise std that image would have
  if it were raw: the raw noise std for a single frame, that over sqrt(frames) for a
  mean image. The same finder run on the recording's own mean image is reported beside
  it, as a yardstick.

The maps (TIFF), `audit.json` and one figure `audit.png` (grayscale panels, left to
right: the recording's mean image, the static scene's wobble / noise, its event z map,
the flat scene's mean contrast, one flat frame's contrast, and the blobs found on the
flat scene) are written into the output folder together.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from deepcad_jax import config as config_lib
from deepcad_jax.analysis.uncertainty.bootstrap import denoise_normalised, plain_recording
from deepcad_jax.analysis.events import find_suppressed_events
from deepcad_jax.data.movie import open_movie, refuse_to_overwrite
from deepcad_jax.data.png import png_bytes
from deepcad_jax.data.writers import MovieWriter
from deepcad_jax.runtime.files import AtomicFile, os_error, outputs_together

MAPS = ("wobble_ratio", "event_z", "flat_contrast", "flat_blobs")
MIN_FRAMES = 8


@dataclasses.dataclass
class Audit:
  """The audit's numbers (`summary`) and maps ((Y, X) float32 each, `MAPS`)."""

  summary: dict
  maps: dict[str, np.ndarray]
  figure: np.ndarray  # (H, W) uint8
  output: str | None = None

  def describe(self) -> str:
    """The report's lines for the command line."""
    s = self.summary
    st, fl = s["static"], s["flat"]
    lines = [f"static scene ({s['frames']} frames, no activity): invented wobble "
             f"{st['wobble_rms']:.3g} (median {st['wobble_over_noise_median']:.3g} x the "
             f"noise std, 99th percentile {st['wobble_over_noise_p99']:.3g} x); "
             f"{st['events']} invented event(s) (largest z {st['largest_event_z']:.2f}, "
             f"threshold {st['event_threshold']:g})",
             f"flat scene: invented contrast {fl['contrast_mean_image_over_noise']:.3g} x "
             f"the noise std in the mean image (a raw average would show "
             f"{fl['chance_contrast_mean_image_over_noise']:.3g} x by chance), "
             f"{fl['contrast_frames_over_noise']:.3g} x "
             f"in single frames; {fl['blobs_mean_image']} blob(s) a cell finder would "
             f"call cells in the mean image, {fl['blobs_per_frame']:.2f} per frame "
             f"(the recording's own mean image: {s['recording_blobs']})"]
    if self.output:
      lines.append(f"maps, audit.json and audit.png: {self.output}")
    return "\n".join(lines)


def _box_mean(image: np.ndarray, size: int) -> np.ndarray:
  """The mean over a size x size square around every pixel (shrinking at the edges)."""
  out = image.astype(np.float64)
  for axis in (0, 1):
    n = out.shape[axis]
    c = np.concatenate([np.zeros_like(np.take(out, [0], axis=axis)),
                        np.cumsum(out, axis=axis)], axis=axis)
    lo = np.clip(np.arange(n) - size // 2, 0, n)
    hi = np.clip(np.arange(n) + size - size // 2, 0, n)
    out = (np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis)) / (hi - lo).reshape(
        (-1, 1) if axis == 0 else (1, -1))
  return out


def local_contrast(image: np.ndarray, window: int = config_lib.AUDIT_BLOB_WINDOW
                   ) -> np.ndarray:
  """Each pixel minus the mean of the square around it."""
  return (image - _box_mean(image, window)).astype(np.float32)


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
  """4-connected regions of a 2-D bool mask: labels (0: none) and each region's area."""
  labels = np.zeros(mask.shape, np.int32)
  areas: list[int] = []
  h, w = mask.shape
  for y0, x0 in zip(*np.nonzero(mask)):
    if labels[y0, x0]:
      continue
    areas.append(0)
    n = len(areas)
    labels[y0, x0] = n
    stack = [(y0, x0)]
    while stack:
      y, x = stack.pop()
      areas[-1] += 1
      for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
        if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
          labels[yy, xx] = n
          stack.append((yy, xx))
  return labels, areas


def find_blobs(image: np.ndarray, noise_std: float,
               sigma: float = config_lib.AUDIT_BLOB_SIGMA,
               area: int = config_lib.AUDIT_BLOB_AREA) -> np.ndarray:
  """The simple cell finder: labels (1..n, 0: background) of the regions of `area`
  pixels or more whose local contrast exceeds `sigma` x `noise_std`."""
  labels, areas = label_regions(local_contrast(image) > sigma * noise_std)
  keep = np.zeros(len(areas) + 1, np.int32)
  big = [i + 1 for i, a in enumerate(areas) if a >= area]
  keep[big] = np.arange(1, len(big) + 1)
  return keep[labels]


def _panel(image: np.ndarray, lo: float | None = None, hi: float | None = None
           ) -> np.ndarray:
  """`image` as uint8 between `lo` and `hi` (default: its 1st and 99th percentiles)."""
  image = np.nan_to_num(image.astype(np.float64))
  lo = float(np.percentile(image, 1)) if lo is None else lo
  hi = float(np.percentile(image, 99)) if hi is None else hi
  scaled = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
  return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def figure(panels: list[np.ndarray], height: int = 192) -> np.ndarray:
  """uint8 panels side by side, each enlarged (nearest) to about `height` rows, with a
  white gap between them."""
  zoom = max(1, -(-height // max(p.shape[0] for p in panels)))
  parts = []
  for p in panels:
    big = np.repeat(np.repeat(p, zoom, 0), zoom, 1)
    parts += [big, np.full((big.shape[0], 4), 255, np.uint8)]
  return np.concatenate(parts[:-1], axis=1)


def audit(movie: Any, model: Any, *, frames: int = config_lib.AUDIT_FRAMES,
          seed: int = 0, threshold: float = config_lib.AUDIT_EVENT_THRESHOLD) -> Audit:
  """Denoise a static and a flat control scene made from `movie` with `model`, and
  measure what the model invents (see the module doc).

  Args:
    movie: the raw recording (array, path or `Movie`).
    model: a `Model`, model directory, .pth or `Denoiser` (without symmetries).
    frames: the control scenes' length (at most the recording's).
    seed: the noise draws' seed.
    threshold: the events check's z threshold.
  """
  den, mv, raw, nm, mean, scale = plain_recording(
      model, movie, "the audit", MIN_FRAMES, "to fit the noise model")
  t = max(MIN_FRAMES, min(int(frames), mv.shape[0]))
  rng = np.random.default_rng(seed)
  mean_image = raw.mean(0)
  level = float(raw.mean())
  noise_std = float(np.sqrt(nm.variance(level)))

  static_truth = np.broadcast_to(mean_image, (t,) + mean_image.shape)
  static = denoise_normalised(den, static_truth + nm.sample(static_truth, rng), mean,
                              scale)
  pixel_noise = np.sqrt(nm.variance(np.clip(mean_image, 0, None)))
  wobble = static.std(0)
  ratio = (wobble / pixel_noise).astype(np.float32)
  events = find_suppressed_events(static, static_truth, threshold=threshold, noise=nm)
  bias = static.mean(0) - mean_image

  flat_truth = np.full((t,) + mean_image.shape, level, np.float32)
  flat = denoise_normalised(den, flat_truth + nm.sample(flat_truth, rng), mean, scale)
  flat_mean = flat.mean(0)
  contrast = (flat_mean - level).astype(np.float32)
  picks = np.linspace(0, t - 1, min(t, config_lib.AUDIT_BLOB_FRAMES)).astype(int)
  frame_std = float(np.mean([local_contrast(flat[i]).std() for i in picks]))
  blobs = find_blobs(flat_mean, noise_std / np.sqrt(t))
  per_frame = [int(find_blobs(flat[i], noise_std).max()) for i in picks]
  recording_blobs = int(find_blobs(mean_image, noise_std / np.sqrt(len(raw))).max())

  summary = {
      "recording": mv.name, "frames": t, "shape": [t, *mean_image.shape],
      "noise_model": nm.to_json(), "noise_std_at_mean": noise_std,
      "recording_mean": level, "recording_blobs": recording_blobs,
      "static": {"wobble_rms": float(np.sqrt(np.mean(wobble ** 2))),
                 "wobble_over_noise_median": float(np.median(ratio)),
                 "wobble_over_noise_p99": float(np.percentile(ratio, 99)),
                 "mean_bias_rms": float(np.sqrt(np.mean(bias ** 2))),
                 "events": len(events.events), "event_threshold": threshold,
                 "largest_event_z": float(events.z_map.max()),
                 "event_list": events.events[:50]},
      "flat": {"contrast_mean_image_rms": float(local_contrast(flat_mean).std()),
               "contrast_mean_image_over_noise": float(local_contrast(flat_mean).std()
                                                       / noise_std),
               "contrast_frames_over_noise": frame_std / noise_std,
               "chance_contrast_mean_image_over_noise": float(1 / np.sqrt(t)),
               "blobs_mean_image": int(blobs.max()),
               "blobs_per_frame": float(np.mean(per_frame)),
               "frames_looked_at": len(picks)},
      "finder": {"sigma": config_lib.AUDIT_BLOB_SIGMA,
                 "window": config_lib.AUDIT_BLOB_WINDOW,
                 "min_area": config_lib.AUDIT_BLOB_AREA},
      "network_passes_per_voxel": 2}
  maps = {"wobble_ratio": ratio, "event_z": events.z_map.astype(np.float32),
          "flat_contrast": contrast, "flat_blobs": blobs.astype(np.float32)}
  one = local_contrast(flat[picks[len(picks) // 2]])
  fig = figure([_panel(mean_image), _panel(ratio, 0.0, max(1.0, float(ratio.max()))),
                _panel(events.z_map, 0.0, max(threshold, float(events.z_map.max()))),
                _panel(contrast, -noise_std, noise_std),
                _panel(one, -noise_std, noise_std),
                _panel((blobs > 0).astype(np.float32), 0.0, 1.0)])
  return Audit(summary, maps, fig)


def audit_files(model: str, movie: str, output: str, *,
                frames: int = config_lib.AUDIT_FRAMES, seed: int = 0,
                threshold: float = config_lib.AUDIT_EVENT_THRESHOLD,
                overwrite: bool = False) -> Audit:
  """Run the audit of `model` on the recording `movie` and write the maps (TIFF),
  audit.json and audit.png into the folder `output`, together once complete."""
  paths = {k: os.path.join(output, f"{k}.tif") for k in MAPS}
  paths.update(json=os.path.join(output, "audit.json"),
               png=os.path.join(output, "audit.png"))
  refuse_to_overwrite(paths.values(), overwrite)
  result = audit(open_movie(movie), model, frames=frames, seed=seed, threshold=threshold)
  try:
    os.makedirs(output, exist_ok=True)
  except OSError as e:
    raise os_error(e, paths["json"]) from None
  with outputs_together() as files:
    for k in MAPS:
      files.append(MovieWriter(paths[k], result.maps[k].shape, np.float32, frames=1,
                               overwrite=overwrite))
      files[-1].write(result.maps[k][None])
    files.append(AtomicFile(paths["png"], overwrite=overwrite))
    files[-1].open().write(png_bytes(result.figure))
    files.append(AtomicFile(paths["json"], overwrite=overwrite))
    json.dump(dict(result.summary, model=str(getattr(model, 'source', model)), maps=[paths[k] for k in MAPS],
                   figure=paths["png"]), files[-1].text(), indent=1)
  return dataclasses.replace(result, output=output)
