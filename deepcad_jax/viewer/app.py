"""The window of `deepcad-jax view`: raw, denoised and std layers linked side by side,
ROIs as a labels layer, and the Inspect widget docked; or its screenshot, headless."""

from __future__ import annotations

import os
import time

import napari
import numpy as np
from qtpy.QtCore import QBuffer, QByteArray, QIODevice
from qtpy.QtGui import QImage
from qtpy.QtWidgets import QApplication

from deepcad_jax.analysis.rois import read_rois
from deepcad_jax.analysis.traces import sample_files
from deepcad_jax.data.movie import open_movie
from deepcad_jax.runtime.files import write_bytes
from deepcad_jax.errors import UserError
from deepcad_jax.viewer.inspect import InspectWidget, time_axis
from deepcad_jax.viewer.layers import LazyStack, contrast_limits, movie_layer
from deepcad_jax.viewer.widgets import DenoiseWidget, StreamWidget, TrainWidget

WINDOW = (1400, 820)  # the window's size (pixels) for screenshots
GAP = 2               # pixels between the movies shown side by side

__all__ = ["DenoiseWidget", "InspectWidget", "StreamWidget", "TrainWidget", "open_view"]


def _same_shape(raw, other, flag: str, path: str) -> None:
  if tuple(other.shape) != tuple(raw.shape):
    raise UserError(f"{flag} {path} is {tuple(other.shape)} but --raw is "
                    f"{tuple(raw.shape)}; give the movies of one recording.")


def label_image(rois, frame: tuple[int, int]) -> np.ndarray:
  """The ROIs as a (Y, X) label image (ROI i is label i + 1; overlaps: the later one)."""
  labels = np.zeros(frame, np.int32)
  flat = labels.reshape(-1)
  for i, roi in enumerate(rois):
    flat[roi.index] = i + 1
  return labels


def open_view(raw: str, denoised: str | None = None, std: str | None = None,
              rois: str | None = None, model: str | None = None, *, show: bool = True,
              frame: int | None = None, pixel: tuple[int, int] | None = None,
              grid: bool = True, samples: str | None = None
              ) -> tuple[napari.Viewer, InspectWidget]:
  """A viewer with the movies as linked layers and the Inspect widget docked.

  Args:
    raw, denoised, std: movie paths (any format the project reads); the last two
      optional, of the raw movie's shape.
    rois: ROIs (a label TIFF, JSON polygons or suite2p stat.npy) shown as a labels
      layer; their traces are plotted.
    model: the model that denoised it: its held-out quality and noise model are shown.
    show: show the window (False: headless, for a screenshot).
    frame: the frame shown (default the middle one).
    pixel: (y, x) of a pixel whose trace is plotted when no ROIs are given.
    grid: raw, denoised and std side by side (else stacked); a click on any of them
      plots that pixel.
    samples: the sample movies (`denoise --uncertainty calibrated --save-samples`):
      comma-separated files or a glob such as 'den_sample*.tif'. A hidden layer; the
      traces' band comes from them (as `deepcad-jax traces` draws it). Needs `denoised`.
  """
  movies = {"raw": open_movie(raw)}
  for flag, path in (("--denoised", denoised), ("--std", std)):
    if path is not None:
      movies[flag[2:]] = open_movie(path)
      _same_shape(movies["raw"], movies[flag[2:]], flag, path)
  sample_list = []
  if samples is not None:
    if denoised is None:
      raise UserError("--samples give the band around the denoised trace; add "
                      "--denoised.")
    paths = sample_files(samples)
    if len(paths) < 2:
      raise UserError(f"--samples {samples} names {len(paths)} file; a band needs at "
                      "least 2 samples.")
    sample_list = [open_movie(p) for p in paths]
    for path, movie in zip(paths, sample_list):
      _same_shape(movies["raw"], movie, "--samples", path)
  frame_shape = tuple(movies["raw"].shape[1:])
  roi_list = read_rois(rois, frame_shape) if rois is not None else None
  viewer = napari.Viewer(title="deepcad-jax view", show=show)
  names = {}
  for key, movie in movies.items():
    data, meta, _ = movie_layer(movie, f"{key}: {os.path.basename(movie.name)}",
                                **({"colormap": "magma"} if key == "std" else {}))
    names[key] = viewer.add_image(data, **meta).name
  if model is not None:
    viewer.layers[names.get("denoised", names["raw"])].metadata["deepcad_model"] = model
  inspect = InspectWidget(viewer)
  viewer.window.add_dock_widget(inspect, name="Inspect (deepcad-jax)", area="right")
  if sample_list:
    names["samples"] = viewer.add_image(
        LazyStack(sample_list), name=f"samples: {len(sample_list)}", visible=False,
        contrast_limits=contrast_limits(sample_list[0])).name
  inspect.setup(names["raw"], names.get("denoised"), names.get("std"),
                names.get("samples"))
  t = movies["raw"].shape[0] // 2 if frame is None else frame
  viewer.dims.set_current_step(time_axis(viewer), t)
  if grid:  # side by side: the ROIs and the clicked pixel are drawn over the raw movie
    for i, name in enumerate(names[key] for key in movies):
      viewer.layers[name].translate = (0, 0, i * (frame_shape[1] + GAP))
    viewer.reset_view()
  if roi_list is not None:
    labels = viewer.add_labels(label_image(roi_list, frame_shape), name="ROIs",
                               opacity=0.5)
    labels.contour = 1
    inspect.show_rois(roi_list)
  elif pixel is not None:
    inspect.show_pixel(*pixel)
  return viewer, inspect


def png_bytes(image: np.ndarray) -> bytes:
  """An RGB(A) uint8 image (H, W, 3 or 4) encoded as PNG by Qt."""
  rgb = np.ascontiguousarray(np.asarray(image)[..., :3], np.uint8)
  h, w, _ = rgb.shape
  qimage = QImage(rgb.data, w, h, 3 * w, QImage.Format_RGB888)
  data = QByteArray()
  buffer = QBuffer(data)
  buffer.open(QIODevice.WriteOnly)
  if not qimage.save(buffer, "PNG"):
    raise UserError("Qt could not encode the screenshot as PNG.")
  buffer.close()
  return bytes(data)


def wait_for(inspect: InspectWidget, timeout_s: float = 120.0) -> None:
  """Let the viewer's event loop run until the Inspect widget's traces are plotted."""
  deadline = time.monotonic() + timeout_s
  while inspect.worker is not None and time.monotonic() < deadline:
    QApplication.processEvents()
    time.sleep(0.02)
  for _ in range(5):
    QApplication.processEvents()


def screenshot(viewer: napari.Viewer, inspect: InspectWidget, path: str) -> str:
  """Wait for the traces, render the whole window headless and write it as a PNG (under
  its name only once complete)."""
  viewer.window.resize(*WINDOW)
  wait_for(inspect)
  inspect.canvas.draw()
  image = np.asarray(viewer.screenshot(canvas_only=False, flash=False))
  write_bytes(path, png_bytes(image))
  return path
