"""The Inspect widget: raw, denoised and std layers linked; a click on a pixel or an ROI
drawn on a shapes or labels layer plots its raw and denoised traces with the band of
the std; the held-out quality and the noise model of the movie beside them.

With a samples layer (the calibrated uncertainty's samples: whole plausible movies),
the band is that of `deepcad-jax traces`: the 90% band of the samples' ROI traces
(Student-t around the denoised trace below 30 samples), which keeps the correlation of
the ROI's pixels. Without, it is the denoised trace +- `BAND_SIGMAS` times the ROI's
mean of the per-pixel std (exact for one pixel; for a region an upper bound, as if the
pixels' errors were fully correlated).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.experimental import link_layers
from napari.layers import Image, Labels, Shapes
from qtpy.QtWidgets import (QFormLayout, QHBoxLayout, QLabel, QPushButton, QVBoxLayout,
                            QWidget)

from deepcad_jax.analysis.noise import NoiseModel, fit_movie
from deepcad_jax.analysis.rois import Roi, polygon_mask, rois_from_labels
from deepcad_jax.analysis.traces import Traces, movie_traces
from deepcad_jax.errors import UserError
from deepcad_jax.model_io.loading import load_model
from deepcad_jax.viewer import work
from deepcad_jax.viewer.layers import layer_movie, sample_movies
from deepcad_jax.viewer.widgets import LayerChoice

BAND_SIGMAS = 2.0
MAX_PLOTTED = 4  # ROIs plotted at once (the first ones)
PIXEL_LAYER = "clicked pixel"


def time_axis(viewer) -> int:
  """The viewer's axis of the movies' frames: layers align on their last axes, so a
  (sample, T, Y, X) samples layer puts one more axis in front of the (T, Y, X) movies."""
  return max(0, viewer.dims.ndim - 3)


def shape_masks(layer: Shapes, frame: tuple[int, int]) -> list[tuple[str, np.ndarray]]:
  """(name, (Y, X) mask) of each closed shape of a shapes layer (its last two axes)."""
  masks = []
  for i, (kind, verts) in enumerate(zip(layer.shape_type, layer.data)):
    yx = np.asarray(verts, np.float64)[:, -2:]
    if kind == "ellipse":
      (y0, x0), (y1, x1) = yx.min(0), yx.max(0)
      yy, xx = np.mgrid[:frame[0], :frame[1]]
      cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, max((y1 - y0) / 2, .5), max(
          (x1 - x0) / 2, .5)
      mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    elif kind in ("rectangle", "polygon"):
      mask = polygon_mask(yx, frame)
    else:
      continue  # lines and paths enclose no pixels
    if mask.any():
      masks.append((f"shape {i + 1}", mask))
  return masks


def label_rois(layer: Labels, t: int, frame: tuple[int, int]) -> list[Roi]:
  """The ROIs of a labels layer: a (Y, X) label image, or frame `t` of a (T, Y, X) one."""
  labels = np.asarray(layer.data if layer.data.ndim == 2 else layer.data[t])
  if labels.shape != tuple(frame):
    raise UserError(f"the labels layer {layer.name!r} is {labels.shape}; the movie's "
                    f"frames are {tuple(frame)}.")
  return rois_from_labels(labels, f"labels layer {layer.name!r}: ")


def masks_to_rois(masks: list[tuple[str, np.ndarray]]) -> list[Roi]:
  return [Roi(name, np.flatnonzero(m), np.full(int(m.sum()), 1.0 / m.sum()))
          for name, m in masks]


def describe_quality(meta: Any) -> list[str]:
  """Lines for a model's held-out quality and its training data's noise models."""
  lines = []
  q = meta.get("holdout_quality")
  if q:
    gain = q.get("gain_db")
    lines.append(f"held-out quality (step {meta.get('step')}): estimated MSE "
                 f"{q['estimated_mse']:.4g}" + ("" if gain is None else f", gain {gain:+.2f} dB")
                 + f": {q.get('verdict', '')}")
  for noise in meta.get("noise") or ():
    lines.append(NoiseModel.from_json(noise).describe())
  return lines


class InspectWidget(QWidget):
  """Raw, denoised and std layers; traces of clicked pixels and drawn ROIs."""

  def __init__(self, napari_viewer):
    super().__init__()
    viewer = napari_viewer
    self.viewer = viewer
    self.raw = LayerChoice(viewer)
    self.denoised = LayerChoice(viewer, optional=True)
    self.std = LayerChoice(viewer, optional=True)
    self.samples = LayerChoice(viewer, optional=True)
    self.samples.setToolTip("the samples (sample, T, Y, X) of the calibrated uncertainty: "
                            "ROI bands that keep the pixels' correlation")
    form = QFormLayout()
    for label, widget in (("raw", self.raw), ("denoised", self.denoised),
                          ("std", self.std), ("samples", self.samples)):
      form.addRow(label, widget)
      widget.currentIndexChanged.connect(self.link)
    self.shapes_button = QPushButton("Draw ROIs (shapes)")
    self.labels_button = QPushButton("Paint ROIs (labels)")
    self.noise_button = QPushButton("Noise model")
    buttons = QHBoxLayout()
    for b in (self.shapes_button, self.labels_button, self.noise_button):
      buttons.addWidget(b)
    self.info = QLabel("Click a pixel or draw an ROI to see its traces.")
    self.info.setWordWrap(True)
    self.figure = Figure(figsize=(4, 3.2), tight_layout=True)
    self.canvas = FigureCanvasQTAgg(self.figure)
    self.canvas.setMinimumHeight(260)
    box = QVBoxLayout(self)
    box.addLayout(form)
    box.addLayout(buttons)
    box.addWidget(self.info)
    box.addWidget(self.canvas)
    self.shapes_button.clicked.connect(self.add_shapes)
    self.labels_button.clicked.connect(self.add_labels)
    self.noise_button.clicked.connect(self.measure_noise)
    self.worker = None
    self.quality: list[str] = []
    self.traces: dict | None = None  # the last traces plotted (tests, screenshots)
    self._watched: set[int] = set()
    self._linked: set[tuple[int, int]] = set()
    self._model: str | None = None
    self._request: object | None = None  # the latest traces asked for
    viewer.mouse_drag_callbacks.append(self._on_click)
    viewer.layers.events.inserted.connect(self._watch_new_layer)
    for layer in viewer.layers:
      self._watch(layer)

  # -- layers --------------------------------------------------------------

  def setup(self, raw: str, denoised: str | None = None, std: str | None = None,
            samples: str | None = None) -> None:
    """Choose the layers by name and link them."""
    self.raw.choose(raw)
    self.denoised.choose(denoised or "(none)")
    self.std.choose(std or "(none)")
    self.samples.choose(samples or "(none)")
    self.link()

  def layers(self) -> tuple[Image | None, Image | None, Image | None]:
    return self.raw.layer(), self.denoised.layer(), self.std.layer()

  def link(self, *_: Any) -> None:
    """Raw and denoised share their display (contrast, colormap); the model of the
    denoised layer (when it came from Denoise) gives the held-out quality."""
    raw, den, std = self.layers()
    if raw is not None and den is not None and raw is not den and \
        (id(raw), id(den)) not in self._linked:
      den.contrast_limits = raw.contrast_limits
      link_layers([raw, den], ("contrast_limits", "colormap", "gamma"))
      self._linked.add((id(raw), id(den)))
    model = (den.metadata.get("deepcad_model") if den is not None else None)
    if model and model != self._model:
      self.show_model(model)

  def show_model(self, path: str) -> None:
    """The held-out quality and noise model stored with a model."""
    self._model = path
    try:
      self.quality = describe_quality(load_model(path).meta)
    except UserError as e:
      self.quality = [str(e)]
    self.info.setText("\n".join(self.quality) or f"{path} stores no held-out quality "
                      "(train with --holdout).")

  def add_shapes(self) -> Shapes:
    layer = self.viewer.add_shapes(name="ROIs", ndim=2, edge_color="yellow",
                                   face_color="transparent", edge_width=1)
    layer.mode = "add_ellipse"
    return layer

  def add_labels(self) -> Labels:
    raw = self.raw.layer()
    if raw is None:
      work.notify_error("choose a raw layer first.")
      return None
    layer = self.viewer.add_labels(np.zeros(raw.data.shape[-2:], np.int32),
                                   name="ROI labels")
    layer.mode = "paint"
    return layer

  def _watch_new_layer(self, event) -> None:
    self._watch(event.value)

  def _watch(self, layer) -> None:
    if id(layer) in self._watched:
      return
    if isinstance(layer, Shapes):
      layer.events.data.connect(lambda e, layer=layer: self.show_shapes(layer))
    elif isinstance(layer, Labels):
      layer.events.paint.connect(lambda e, layer=layer: self.show_labels(layer))
    else:
      return
    self._watched.add(id(layer))

  # -- ROIs ------------------------------------------------------------------

  def _frame(self) -> tuple[int, int]:
    raw = self.raw.layer()
    if raw is None:
      raise UserError("choose a raw layer first (open a movie).")
    return tuple(raw.data.shape[-2:])

  def _on_click(self, viewer, event) -> None:
    layer = viewer.layers.selection.active
    if isinstance(layer, (Shapes, Labels)) and layer.mode != "pan_zoom":
      return
    if event.type != "mouse_press":
      return
    for layer in self.layers():  # the first of raw, denoised, std under the mouse
      if layer is not None:
        y, x = (int(round(v)) for v in layer.world_to_data(event.position)[-2:])
        if 0 <= y < layer.data.shape[-2] and 0 <= x < layer.data.shape[-1]:
          self.show_pixel(y, x)
          return

  def show_pixel(self, y: int, x: int) -> None:
    try:
      frame = self._frame()
    except UserError as e:
      work.notify_error(str(e))
      return
    if not (0 <= y < frame[0] and 0 <= x < frame[1]):
      return
    mask = np.zeros(frame, bool)
    mask[y, x] = True
    if PIXEL_LAYER in self.viewer.layers:
      self.viewer.layers[PIXEL_LAYER].data = [[y, x]]
    else:
      self.viewer.add_points([[y, x]], name=PIXEL_LAYER, symbol="square", size=3,
                             face_color="transparent", border_color="cyan",
                             border_width=0.15)
    self.show_rois(masks_to_rois([(f"pixel (y={y}, x={x})", mask)]))

  def show_shapes(self, layer: Shapes) -> None:
    try:
      rois = masks_to_rois(shape_masks(layer, self._frame()))
    except UserError as e:
      work.notify_error(str(e))
      return
    if rois:
      self.show_rois(rois)

  def show_labels(self, layer: Labels) -> None:
    try:
      rois = label_rois(layer, int(self.viewer.dims.current_step[time_axis(self.viewer)]),
                        self._frame())
    except UserError as e:
      work.notify_error(str(e))
      return
    if rois:
      self.show_rois(rois)

  def show_rois(self, rois: list[Roi]) -> None:
    """Compute the traces in a worker (a newer request cancels an older one) and plot."""
    raw, den, std = self.layers()
    if self.worker is not None:
      self.worker.quit()
    try:
      movies = [None if layer is None else layer_movie(layer) for layer in (raw, den, std)]
      samples = self._sample_movies(movies[1])
    except UserError as e:
      work.notify_error(str(e))
      return
    kind = self.samples.layer().metadata.get("deepcad_uncertainty") if samples else None
    request = self._request = object()
    self.worker = work.start("the traces", self._traces, rois[:MAX_PLOTTED], movies,
                             samples, kind, on_done=self.plot,
                             on_finish=lambda: self._finished(request))

  def _sample_movies(self, denoised) -> list:
    """The chosen samples layer's movies (checked against the denoised movie), or []."""
    layer = self.samples.layer()
    if layer is None:
      return []
    if denoised is None:
      raise UserError("the samples' band is around the denoised trace; choose the "
                      "denoised layer too.")
    movies = sample_movies(layer)
    if tuple(movies[0].shape) != tuple(denoised.shape):
      raise UserError(f"the samples of layer {layer.name!r} are {tuple(movies[0].shape)} "
                      f"but the denoised movie is {tuple(denoised.shape)}; choose the "
                      "samples of this denoised movie.")
    return movies

  def _finished(self, request: object) -> None:
    if request is self._request:  # an older request, cancelled, does not count
      self.worker = None

  @staticmethod
  def _traces(rois: list[Roi], movies: list, samples: list = (), kind: str | None = None):
    out = []
    for movie in list(movies) + list(samples):
      out.append(None if movie is None else movie_traces(movie, rois))
      yield len(out)
    traces = {"rois": rois, "raw": out[0], "denoised": out[1], "std": out[2], "band": None}
    if samples:  # as `deepcad-jax traces` draws it (90%, Student-t below 30 samples)
      band = Traces([r.name for r in rois], [r.pixels for r in rois], out[1],
                    samples=np.stack(out[3:]))
      traces["band"] = band.f_band
      traces["band_label"] = (f"{band.band[1] - band.band[0]:g}% band "
                              f"({len(samples)} samples)")
      if kind == "symmetry spread":  # the Denoise panel's K symmetries: not the error
        traces["band_label"] += ", symmetry spread: narrower than the error"
    return traces

  def plot(self, traces: dict) -> None:
    self.traces = traces
    self.figure.clear()
    rois = traces["rois"]
    t_now = int(self.viewer.dims.current_step[time_axis(self.viewer)])
    for i, roi in enumerate(rois):
      ax = self.figure.add_subplot(len(rois), 1, i + 1)
      t = np.arange(len(traces["raw"]))
      ax.plot(t, traces["raw"][:, i], color="0.6", lw=0.8, label="raw")
      if traces["denoised"] is not None:
        d = traces["denoised"][:, i]
        if traces.get("band") is not None:
          lo, hi = traces["band"]
          ax.fill_between(t, lo[:, i], hi[:, i], color="tab:orange", alpha=0.3, lw=0,
                          label=traces["band_label"])
        elif traces["std"] is not None:
          s = BAND_SIGMAS * traces["std"][:, i]
          ax.fill_between(t, d - s, d + s, color="tab:orange", alpha=0.3, lw=0,
                          label=f"±{BAND_SIGMAS:g} std")
        ax.plot(t, d, color="tab:orange", lw=1.2, label="denoised")
      ax.axvline(t_now, color="k", lw=0.5, ls=":")
      ax.set_title(roi.name, fontsize=8)
      ax.tick_params(labelsize=7)
      if i == 0:
        ax.legend(fontsize=7, loc="upper right")
    if rois:
      self.figure.axes[-1].set_xlabel("frame", fontsize=8)
    self.canvas.draw_idle()

  # -- noise -----------------------------------------------------------------

  def measure_noise(self) -> None:
    """Fit the raw movie's noise model (a worker) and show it."""
    try:
      movie = layer_movie(self.raw.layer())
    except UserError as e:
      work.notify_error(str(e))
      return

    def fit():
      yield 0
      return fit_movie(movie)

    def show(model: NoiseModel) -> None:
      self.info.setText("\n".join(self.quality + [model.describe()]))

    work.start("the noise model", fit, on_done=show)
