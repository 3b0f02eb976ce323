"""The Train, Denoise and Stream widgets: forms whose work runs in thread workers
(`work.start`), so the viewer never freezes; each run can be stopped or cancelled, and
its failure is one notification."""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.layers import Image
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel,
                            QLineEdit, QProgressBar, QPushButton, QSpinBox, QVBoxLayout,
                            QWidget)

from deepcad_jax import config as config_lib
from deepcad_jax.analysis.uncertainty.bootstrap import (MIN_FRAMES, Settings,
                                                        calibrated_uncertainty, check_frames,
                                                        check_memory)
from deepcad_jax.data.movie import ArrayMovie, Movie
from deepcad_jax.data.writers import write_movie
from deepcad_jax.denoising import brightness
from deepcad_jax.denoising.denoiser import Denoiser
from deepcad_jax.errors import UserError
from deepcad_jax.model_io.loading import load_model
from deepcad_jax.stream.denoiser import StreamDenoiser
from deepcad_jax.training.loop import train
from deepcad_jax.viewer import work
from deepcad_jax.viewer.layers import LazyMovie, layer_movie, layer_path

POLL_MS = 200  # how often the Train widget redraws its plot from the running loop


class LayerChoice(QComboBox):
  """The viewer's image layers, kept up to date as layers come and go."""

  def __init__(self, viewer, optional: bool = False):
    super().__init__()
    self.viewer, self.optional = viewer, optional
    for event in (viewer.layers.events.inserted, viewer.layers.events.removed,
                  viewer.layers.events.reordered):
      event.connect(self.refresh)
    self.refresh()

  def refresh(self, *_: Any) -> None:
    current = self.currentText()
    self.blockSignals(True)
    self.clear()
    if self.optional:
      self.addItem("(none)")
    self.addItems([layer.name for layer in self.viewer.layers if isinstance(layer, Image)])
    if current and self.findText(current) >= 0:
      self.setCurrentText(current)
    self.blockSignals(False)

  def layer(self) -> Image | None:
    name = self.currentText()
    return self.viewer.layers[name] if name in self.viewer.layers else None

  def choose(self, name: str) -> None:
    self.refresh()
    self.setCurrentText(name)


class Panel(QWidget):
  """A form with a Run and a Stop button, a progress bar and a status line."""

  what = "the run"
  run_text = "Run"

  def __init__(self, napari_viewer):
    super().__init__()
    viewer = napari_viewer
    self.viewer = viewer
    self.worker = None
    self.cancelled = False
    self.form = QFormLayout()
    self.run_button = QPushButton(self.run_text)
    self.stop_button = QPushButton("Stop")
    self.stop_button.setEnabled(False)
    self.progress = QProgressBar()
    self.status = QLabel("")
    self.status.setWordWrap(True)
    buttons = QHBoxLayout()
    buttons.addWidget(self.run_button)
    buttons.addWidget(self.stop_button)
    box = QVBoxLayout(self)
    box.addLayout(self.form)
    box.addLayout(buttons)
    box.addWidget(self.progress)
    box.addWidget(self.status)
    self.run_button.clicked.connect(self.run)
    self.stop_button.clicked.connect(self.stop)

  @property
  def running(self) -> bool:
    return self.worker is not None

  def run(self) -> None:
    if self.running:
      return
    try:
      args = self.prepare()
    except Exception as e:  # noqa: BLE001 - a bad form is one notification
      self.fail(work.sentence(e, self.what))
      return
    self.status.setText(f"{self.what}...")
    self.cancelled = False
    self.run_button.setEnabled(False)
    self.stop_button.setEnabled(True)
    self.worker = work.start(self.what, self.work, *args, on_yield=self.progressed,
                             on_done=self.done, on_finish=self.finished,
                             on_failed=self.status.setText)

  def fail(self, message: str) -> None:
    self.status.setText(message)
    work.notify_error(message)

  def stop(self) -> None:
    if self.worker is not None:
      self.cancelled = True
      self.worker.quit()

  def finished(self) -> None:
    self.worker = None
    if self.cancelled:
      self.status.setText("cancelled.")
    self.run_button.setEnabled(True)
    self.stop_button.setEnabled(False)

  def prepare(self) -> tuple:
    """The work's arguments from the form (raises `UserError` for a bad form)."""
    raise NotImplementedError

  def work(self, *args: Any):
    raise NotImplementedError

  def progressed(self, value: Any) -> None:
    if isinstance(value, str):  # a new stage of the work
      self.status.setText(value)
    elif isinstance(value, tuple) and len(value) == 2:
      self.progress.setMaximum(int(value[1]))
      self.progress.setValue(int(value[0]))

  def done(self, value: Any) -> None:
    pass


def _text(edit: QLineEdit) -> str | None:
  return edit.text().strip() or None


# ------------------------------------------------------------------ train


class TrainWidget(Panel):
  """Train on a layer or files: live loss and held-out score, stop, and resume (Train
  again on the same workdir continues from its last checkpoint)."""

  what = "training"
  run_text = "Train / resume"

  def __init__(self, napari_viewer):
    super().__init__(napari_viewer)
    viewer = napari_viewer
    self.layer_choice = LayerChoice(viewer, optional=True)
    self.data = QLineEdit()
    self.data.setPlaceholderText("a movie file or folder (default: the layer)")
    self.workdir = QLineEdit()
    self.workdir.setPlaceholderText("run folder (made if missing)")
    self.config = QLineEdit("demo")
    self.holdout = QLineEdit("0.2")
    self.overrides = QLineEdit()
    self.overrides.setPlaceholderText("section.field=value, ... (like --set)")
    for label, widget in (("layer", self.layer_choice), ("or files", self.data),
                          ("workdir", self.workdir), ("config", self.config),
                          ("holdout", self.holdout), ("set", self.overrides)):
      self.form.addRow(label, widget)
    self.figure = Figure(figsize=(4, 2.6), tight_layout=True)
    self.canvas = FigureCanvasQTAgg(self.figure)
    self.layout().addWidget(self.canvas)
    self.losses: collections.deque = collections.deque()
    self.scores: collections.deque = collections.deque()
    self.total = 0
    self.stop_event = threading.Event()
    self.result = None
    self.timer = QTimer(self)
    self.timer.setInterval(POLL_MS)
    self.timer.timeout.connect(self.redraw)

  def prepare(self) -> tuple:
    workdir = _text(self.workdir)
    if workdir is None:
      raise UserError("give a workdir: the folder of the run (made if missing; a run "
                      "already there resumes).")
    cfg = config_lib.load_config(_text(self.config) or "demo")
    items = [s.strip() for s in (self.overrides.text() or "").split(",") if s.strip()]
    holdout = _text(self.holdout)
    if holdout and holdout not in ("0", "none"):
      items.append(f"data.holdout={holdout}")
    cfg = config_lib.override_strings(cfg, items)
    data = _text(self.data) or self._layer_data(workdir)
    self.stop_event = threading.Event()
    self.losses.clear()
    self.scores.clear()
    self.result = None
    self.progress.setRange(0, 0)  # busy until the run says how many steps it has
    self.timer.start()
    return data, workdir, cfg

  def _layer_data(self, workdir: str) -> str:
    """The chosen layer's file, or the layer written as workdir/<layer>.tif."""
    layer = self.layer_choice.layer()
    if layer is None:
      raise UserError("choose a layer or give files to train on.")
    path = layer_path(layer)
    if path is not None:
      return path
    movie = layer_movie(layer)
    out = os.path.join(workdir, "data", f"{layer.name}.tif".replace(os.sep, "_"))
    if not os.path.exists(out):
      os.makedirs(os.path.dirname(out), exist_ok=True)
      write_movie(out, movie.read(0, movie.shape[0]), overwrite=False)
    return out

  def work(self, data: str, workdir: str, cfg):
    def on_step(step: int, loss: float) -> None:
      self.losses.append((step, loss))

    result = train(data, workdir, cfg, progress=False, on_step=on_step,
                   stop=self.stop_event, on_score=lambda s, v: self.scores.append((s, v)))
    yield (result.step, result.total_steps)
    return result

  def stop(self) -> None:
    """Stop after the current step; a checkpoint is saved, Train resumes."""
    self.stop_event.set()
    self.status.setText("stopping after this step (a checkpoint is saved)...")

  def done(self, result) -> None:
    self.result = result
    self.total = result.total_steps
    self.status.setText(result.describe().replace("run again to resume",
                                                  "Train again to resume"))

  def finished(self) -> None:
    super().finished()
    self.timer.stop()
    if self.progress.maximum() == 0:
      self.progress.setRange(0, 1)
    self.redraw()

  def redraw(self) -> None:
    """The loss (left) and the held-out estimated MSE (right) against the step."""
    losses, scores = list(self.losses), list(self.scores)
    self.figure.clear()
    ax = self.figure.add_subplot(111)
    if losses:
      ax.plot(*zip(*losses), color="tab:blue", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if scores:
      right = ax.twinx()
      right.plot(*zip(*scores), "o-", color="tab:orange")
      right.set_ylabel("held-out est. MSE", color="tab:orange")
    self.canvas.draw_idle()


# ------------------------------------------------------------------ denoise


def _model_field() -> QLineEdit:
  """Where the Denoise and Stream panels take their model."""
  field = QLineEdit()
  field.setPlaceholderText("run directory or DeepCAD-RT .pth")
  return field


UNCERTAINTY_CHOICES = ["symmetry spread (K below)", "calibrated (from the recording)"]
CALIBRATED = 1


class DenoiseWidget(Panel):
  """Denoise a layer with a model; adds the denoised layer beside it, and optionally
  an error std with samples: calibrated on the recording itself (the equivariant
  bootstrap of `denoise --uncertainty calibrated`) or the spread of K test-time
  symmetries."""

  what = "denoising"
  run_text = "Denoise"

  def __init__(self, napari_viewer):
    super().__init__(napari_viewer)
    viewer = napari_viewer
    self.layer_choice = LayerChoice(viewer)
    self.model = _model_field()
    self.step = QLineEdit()
    self.step.setPlaceholderText("last (or a number, or best)")
    self.symmetries = QSpinBox()
    self.symmetries.setRange(1, 8)
    self.symmetries.setToolTip("K >= 2 adds the std over K test-time symmetries")
    self.uncertainty = QComboBox()
    self.uncertainty.addItems(UNCERTAINTY_CHOICES)
    self.uncertainty.setToolTip(
        f"calibrated: the error std from the recording alone ({config_lib.UNCERTAINTY_DRAWS} "
        "bootstrap draws; about 12 network passes per voxel); symmetry spread: the std "
        "over K test-time symmetries (K >= 2), several times narrower than the error")
    self.samples = QComboBox()
    self.samples.addItems(["no samples", "add the samples"])
    for label, widget in (("layer", self.layer_choice), ("model", self.model),
                          ("step", self.step), ("uncertainty", self.uncertainty),
                          ("symmetries", self.symmetries), ("samples", self.samples)):
      self.form.addRow(label, widget)

  def prepare(self) -> tuple:
    layer = self.layer_choice.layer()
    movie = layer_movie(layer)
    model = _text(self.model)
    if model is None:
      raise UserError("give a model: a training run directory or a DeepCAD-RT .pth.")
    step = _text(self.step)
    k = self.symmetries.value()
    samples = self.samples.currentIndex() == 1
    if self.uncertainty.currentIndex() == CALIBRATED:
      if k > 1:
        raise UserError("the calibrated uncertainty runs the plain network; set "
                        "symmetries to 1, or choose the symmetry spread.")
      check_frames(movie, "the calibrated uncertainty", MIN_FRAMES,
                   "for its held-out check", "choose the symmetry spread")
      check_memory(movie, "the calibrated uncertainty",
                   Settings(keep_samples=samples).bytes_per_voxel(),
                   "run denoise --uncertainty calibrated on the command line, which works "
                   "in segments, or use a smaller layer")
      options = {"calibrated": True, "save_samples": samples}
    else:
      options = {"symmetries": k} if k > 1 else {}
      if k > 1 and samples:
        options["save_samples"] = True
    return movie, layer.name, model, int(step) if step and step.isdigit() else step, options

  def work(self, movie: Movie, name: str, model_path: str, step, options: dict):
    options = dict(options)
    calibrated = options.pop("calibrated", False)
    keep_samples = calibrated and options.pop("save_samples")
    model = load_model(model_path, step)
    den = Denoiser(model, **options)
    out = np.empty(movie.shape, np.float32)
    extra = np.empty((den.channels - 1,) + movie.shape, np.float32) if den.channels else None
    measure = brightness.Measure(movie, brightness.patch_frames(model.config))
    for f in den.frames(movie):
      out[f.start:f.start + len(f.data)] = f.data
      measure.add(f.data)
      if extra is not None:
        extra[:, f.start:f.start + len(f.data)] = np.moveaxis(f.extras, -1, 0)
      yield (f.start + len(f.data), movie.shape[0])
    correction = measure.fit()  # as `denoise` does: each region keeps the raw mean
    out += correction.field
    if extra is not None and len(extra) > 1:  # the samples are values; the std is not
      extra[1:] += correction.field
    kind, check = "symmetry spread", ""
    std = None if extra is None else extra[0]
    samples = extra[1:] if extra is not None and len(extra) > 1 else None
    if calibrated:
      yield (f"calibrating the uncertainty on {name}: {config_lib.UNCERTAINTY_DRAWS} "
             "bootstrap draws...")
      yield (0, 0)  # no count of its own: the bar shows that it runs
      u = calibrated_uncertainty(movie, den, out, keep_samples=keep_samples)
      kind, std, samples = "calibrated", u.std, u.samples
      check = (f"; calibrated uncertainty, held-out check: "
               f"{u.record['verdict']['verdict']}")
      yield (1, 1)  # where a Stop pressed during the calibration takes effect
    return (name, model, model_path, out, std, samples, kind,
            correction.describe() + check)

  def done(self, value) -> None:
    if self.cancelled:  # stopped while the last stage ran: its result is dropped
      return
    name, model, model_path, out, std, samples, kind, described = value
    meta = {"deepcad_model": model_path, "deepcad_step": model.meta["step"],
            "deepcad_raw": name}
    raw = self.viewer.layers[name] if name in self.viewer.layers else None
    limits = raw.contrast_limits if raw is not None else None
    self.viewer.add_image(out, name=f"{name} denoised", metadata=meta,
                          contrast_limits=limits)
    meta_std = dict(meta, deepcad_uncertainty=kind)
    if std is not None:
      self.viewer.add_image(std, name=f"{name} std", colormap="magma", metadata=meta_std)
    if samples is not None:
      self.viewer.add_image(samples, name=f"{name} samples", metadata=meta_std,
                            visible=False)
    self.status.setText(f"denoised {name} with {model_path} (step {model.meta['step']}); "
                        f"{described}.")


# ------------------------------------------------------------------ stream


class StreamWidget(Panel):
  """A live replay: the chosen layer's frames pushed one by one at a frame rate into a
  `StreamDenoiser`; the latest raw and denoised frames are shown as they come."""

  what = "streaming"
  run_text = "Replay"

  def __init__(self, napari_viewer):
    super().__init__(napari_viewer)
    viewer = napari_viewer
    self.layer_choice = LayerChoice(viewer)
    self.model = _model_field()
    self.rate = QDoubleSpinBox()
    self.rate.setRange(0.0, 1000.0)
    self.rate.setValue(30.0)
    self.rate.setToolTip("frames per second (0: as fast as possible)")
    for label, widget in (("layer", self.layer_choice), ("model", self.model),
                          ("frames/s", self.rate)):
      self.form.addRow(label, widget)
    self.denoised: list[np.ndarray] = []

  def prepare(self) -> tuple:
    layer = self.layer_choice.layer()
    movie = layer_movie(layer)
    model = _text(self.model)
    if model is None:
      raise UserError("give a model: a training run directory or a DeepCAD-RT .pth.")
    self.denoised = []
    return movie, layer.name, model, self.rate.value()

  def work(self, movie: Movie, name: str, model_path: str, rate: float):
    stream = StreamDenoiser(load_model(model_path))
    t0, n = time.perf_counter(), movie.shape[0]
    for i in range(n):
      if rate > 0:
        time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
      frame = movie.read(i, i + 1)[0]
      stream.push(frame)
      yield ("frame", i, n, frame, stream.pull())
    stream.close()
    yield ("frame", n, n, None, stream.pull())
    return name

  def progressed(self, value) -> None:
    if self.cancelled:
      return
    _, i, n, frame, out = value
    self.progress.setMaximum(n)
    self.progress.setValue(i)
    if len(out):
      self.denoised.extend(out[..., 0] if out.ndim == 4 else out)
      self._show("stream denoised", self.denoised[-1])
    if frame is not None:
      self._show("stream raw", frame)
    self.status.setText(f"frame {i}/{n} in, {len(self.denoised)} denoised out")

  def _show(self, name: str, image: np.ndarray) -> None:
    if name in self.viewer.layers:
      self.viewer.layers[name].data = image
    else:
      self.viewer.add_image(image, name=name)

  def done(self, name: str) -> None:
    if self.denoised:
      movie = np.stack(self.denoised)
      self.viewer.add_image(LazyMovie(ArrayMovie(movie, f"{name} streamed")),
                            name=f"{name} streamed", contrast_limits=(
                                float(movie.min()), float(movie.max()) + 1e-6))
