"""The napari plugin and `deepcad-jax view` in a real viewer (headless under Xvfb): the
readers of every format, the writer, the sample data, each widget end to end on tiny
data and a tiny model, cancelling, bad input as one notification, and the screenshot."""

import glob
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import tifffile

napari = pytest.importorskip("napari")
if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
  pytest.skip("the napari tests need a display: run them under xvfb-run -a",
              allow_module_level=True)

from napari.utils.notifications import notification_manager  # noqa: E402

from tests.helpers import noisy_movie, write_tiff  # noqa: E402
from deepcad_jax import UserError, cli, load_model  # noqa: E402
from deepcad_jax.analysis.simulate import write_simulation  # noqa: E402
from deepcad_jax.data.movie import open_movie  # noqa: E402
from deepcad_jax.data.writers import write_movie  # noqa: E402
from deepcad_jax.viewer import layers as vl, widgets  # noqa: E402
from deepcad_jax.viewer.inspect import InspectWidget  # noqa: E402
from deepcad_jax.viewer.widgets import DenoiseWidget, StreamWidget, TrainWidget  # noqa: E402

WAIT_MS = 120_000
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def viewer(make_napari_viewer):
  return make_napari_viewer()


@pytest.fixture
def errors():
  """The error notifications shown from now on."""
  start = len(notification_manager.records)
  return lambda: [str(n.message) for n in notification_manager.records[start:]
                  if n.severity.name == "ERROR"]


@pytest.fixture(scope="module")
def movie_file(tmp_path_factory):
  return write_tiff(tmp_path_factory.mktemp("movie") / "movie.tif",
                    noisy_movie((64, 24, 24))[0])


def _dock(viewer, widget_cls):
  widget = widget_cls(viewer)
  viewer.window.add_dock_widget(widget, name=widget_cls.__name__)
  return widget


def _open(viewer, path):
  for data, meta, kind in vl.napari_get_reader(path)(path):
    layer = viewer.add_image(data, **meta)
  return layer


def _wait(qtbot, widget):
  qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)


# ------------------------------------------------------------------ plugin


def test_the_manifest_is_valid_and_registered_by_an_entry_point():
  from npe2 import PluginManifest
  manifest = PluginManifest.from_file(os.path.join(ROOT, "deepcad_jax", "viewer",
                                                   "napari.yaml"))
  assert manifest.name == "deepcad-jax"
  assert {w.display_name for w in manifest.contributions.widgets} == {
      "Train", "Denoise", "Inspect", "Stream"}
  for command in manifest.contributions.commands:  # every command imports
    module, name = command.python_name.split(":")
    assert callable(getattr(__import__(module, fromlist=[name]), name))
  with open(os.path.join(ROOT, "pyproject.toml")) as f:
    assert 'deepcad-jax = "deepcad_jax.viewer:napari.yaml"' in f.read()


def test_napari_opens_the_plugin_widgets_reader_and_sample(viewer, movie_file):
  from npe2 import PluginManager, PluginManifest
  pm = PluginManager.instance()
  if "deepcad-jax" not in pm._manifests:  # installed from another checkout: this one's
    pm.register(PluginManifest.from_file(os.path.join(ROOT, "deepcad_jax", "viewer",
                                                      "napari.yaml")))
  for name in ("Train", "Denoise", "Inspect", "Stream"):
    _, widget = viewer.window.add_plugin_dock_widget("deepcad-jax", name)
    assert type(widget).__name__ == f"{name}Widget"
  [layer] = viewer.open(movie_file, plugin="deepcad-jax")
  assert isinstance(layer.data, vl.LazyMovie) and layer.data.shape == (64, 24, 24)
  viewer.open_sample("deepcad-jax", "demo")
  assert viewer.layers[-1].data.shape == (300, 64, 64) and len(viewer.layers) == 3


def test_the_core_imports_without_napari_or_qt():
  code = ("import sys; sys.modules['napari'] = None; sys.modules['qtpy'] = None; "
          "import deepcad_jax, deepcad_jax.cli; from deepcad_jax import denoise, train; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('PyQt5', 'PySide2', 'vispy', 'magicgui')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=ROOT).stdout
  assert out.strip() == "[]"


@pytest.mark.parametrize("fmt", ["tiff", "hdf5", "zarr", "nwb", "suite2p"])
def test_the_reader_opens_every_format_lazily(viewer, tmp_path, fmt):
  info = write_simulation(str(tmp_path), movie_format=fmt, shape=(20, 16, 16))
  path = info["noisy"].replace("suite2p:", "")  # a suite2p plane folder
  reader = vl.napari_get_reader(path)
  assert reader is not None
  [(data, meta, kind)] = reader(path)
  assert kind == "image" and isinstance(data, vl.LazyMovie) and data.shape == (20, 16, 16)
  reads = []
  read = data.movie.read
  data.movie.read = lambda t0, t1: reads.append((t0, t1)) or read(t0, t1)
  layer = viewer.add_image(data, **meta)
  viewer.dims.set_current_step(0, 7)
  expected = open_movie(path).read(7, 8)[0]
  np.testing.assert_allclose(np.asarray(layer.data[7]), expected, rtol=1e-3, atol=1e-3)
  assert reads and all(t1 - t0 < 20 for t0, t1 in reads)  # never the whole movie


def test_the_reader_opens_caiman_and_raw_and_declines_others(tmp_path):
  movie = noisy_movie((12, 16, 16))[0].astype(np.float32)
  write_movie(str(tmp_path / "m.mmap"), movie)
  [mmap] = glob.glob(str(tmp_path / "m*.mmap"))
  raw = tmp_path / "m.bin"
  movie.astype(np.uint16).tofile(raw)
  spec = f"raw:{raw}[shape=12x16x16,dtype=uint16]"
  for path in (mmap, spec):
    [(data, _, _)] = vl.napari_get_reader(path)(path)
    np.testing.assert_allclose(data[3:5], movie[3:5])
  (tmp_path / "notes.txt").write_text("hello")
  assert vl.napari_get_reader(str(tmp_path / "notes.txt")) is None
  assert vl.napari_get_reader(str(raw)) is None  # a raw file names no shape


def test_the_writer_and_the_sample_data(tmp_path):
  out = str(tmp_path / "w.tif")
  assert vl.write_tiff(out, np.ones((3, 8, 8), np.float32), {}) == [out]
  assert tifffile.imread(out).shape == (3, 8, 8)
  for shape in ((8, 8), (2, 2, 8, 8)):
    with pytest.raises(UserError, match="writes \\(T, Y, X\\) movies"):
      vl.write_tiff(str(tmp_path / "x.tif"), np.ones(shape), {})
  assert not os.path.exists(tmp_path / "x.tif")
  noisy, clean = vl.sample_movie("quick")
  assert noisy[1]["name"].startswith("noisy") and clean[1]["name"].startswith("clean")
  assert noisy[0].shape == clean[0].shape == (48, 32, 32)


# ------------------------------------------------------------------ train


def test_train_widget_trains_with_live_loss_and_score(viewer, qtbot, tmp_path, movie_file):
  layer = _open(viewer, movie_file)
  w = _dock(viewer, TrainWidget)
  w.layer_choice.choose(layer.name)
  w.workdir.setText(str(tmp_path / "run"))
  w.config.setText("tiny")
  w.holdout.setText("0.25")
  w.run()
  _wait(qtbot, w)
  assert w.result is not None and not w.result.interrupted
  assert len(w.losses) == w.result.total_steps and [s for s, _ in w.scores] == [
      w.result.total_steps // 2, w.result.total_steps]
  assert w.figure.axes and w.figure.axes[0].lines  # the loss curve is drawn
  assert load_model(str(tmp_path / "run")).meta["step"] == w.result.total_steps


def test_train_stops_cleanly_and_resumes(viewer, qtbot, tmp_path, movie_file):
  w = _dock(viewer, TrainWidget)
  _open(viewer, movie_file)
  w.layer_choice.choose("movie.tif")
  w.workdir.setText(str(tmp_path / "run"))
  w.config.setText("tiny")
  w.holdout.setText("0")
  w.overrides.setText("train.epochs=500")
  w.run()
  qtbot.waitUntil(lambda: len(w.losses) > 0, timeout=WAIT_MS)
  w.stop()
  _wait(qtbot, w)
  stopped = w.result.step
  assert w.result.interrupted and 0 < stopped < w.result.total_steps
  assert load_model(str(tmp_path / "run")).meta["step"] == stopped
  w.overrides.setText(f"train.epochs={stopped // 4 + 1}")  # 4 steps per epoch here
  w.run()
  _wait(qtbot, w)
  assert not w.result.interrupted and w.result.step > stopped


def test_train_bad_input_is_one_notification(viewer, qtbot, tmp_path, trained_model,
                                             errors):
  w = _dock(viewer, TrainWidget)
  w.workdir.setText(str(tmp_path / "run"))
  w.config.setText("tiny")
  w.holdout.setText("0")
  (tmp_path / "notes.txt").write_text("hello")
  w.data.setText(str(tmp_path / "notes.txt"))  # a wrong file
  w.run()
  _wait(qtbot, w)
  viewer.add_image(np.ones((16, 16), np.float32), name="flat")  # a 2-D image
  w.data.setText("")
  w.layer_choice.choose("flat")
  w.run()
  _wait(qtbot, w)
  shutil.copytree(trained_model, tmp_path / "run")  # a run of f=4: resumed at f=8
  w.data.setText(os.path.join(os.path.dirname(trained_model), "movie.tif"))
  w.overrides.setText("train.epochs=2,model.features=8")
  w.run()
  _wait(qtbot, w)
  shown = errors()
  assert len(shown) == 3, shown
  assert "notes.txt" in shown[0] and "3-D" in shown[1] and "features" in shown[2]
  assert all("\n" not in s and "Traceback" not in s for s in shown)
  assert w.status.text() == shown[2] and w.run_button.isEnabled()


# ------------------------------------------------------------------ denoise


def test_denoise_widget_adds_denoised_and_std(viewer, qtbot, trained_model, movie_file):
  layer = _open(viewer, movie_file)
  w = _dock(viewer, DenoiseWidget)
  w.layer_choice.choose(layer.name)
  w.model.setText(trained_model)
  w.symmetries.setValue(2)
  w.run()
  _wait(qtbot, w)
  den, std = viewer.layers["movie.tif denoised"], viewer.layers["movie.tif std"]
  assert den.data.shape == std.data.shape == (64, 24, 24)
  assert den.metadata["deepcad_model"] == trained_model and float(std.data.mean()) > 0
  assert np.asarray(den.data).std() < np.asarray(layer.data).std()


def test_denoise_widget_adds_the_calibrated_uncertainty(viewer, qtbot, trained_model,
                                                       movie_file, errors):
  layer = _open(viewer, movie_file)
  w = _dock(viewer, DenoiseWidget)
  w.layer_choice.choose(layer.name)
  w.model.setText(trained_model)
  w.uncertainty.setCurrentIndex(widgets.CALIBRATED)
  w.symmetries.setValue(2)
  w.run()  # the calibrated uncertainty runs the plain network: one notification
  _wait(qtbot, w)
  assert len(errors()) == 1 and "set symmetries to 1" in errors()[0]
  w.symmetries.setValue(1)
  w.samples.setCurrentIndex(1)
  w.run()
  _wait(qtbot, w)
  std, samples = viewer.layers["movie.tif std"], viewer.layers["movie.tif samples"]
  assert std.metadata["deepcad_uncertainty"] == "calibrated"
  assert std.data.shape == (64, 24, 24) and samples.data.shape == (8, 64, 24, 24)
  den = np.asarray(viewer.layers["movie.tif denoised"].data)
  # the samples are the estimate plus the deviations whose smoothed RMS is the std
  spread = float(((np.asarray(samples.data) - den) ** 2).mean())
  assert 0.5 < spread / float((np.asarray(std.data) ** 2).mean()) < 2
  assert "held-out check" in w.status.text(), w.status.text()
  inspect = _dock(viewer, InspectWidget)  # the traces' band from those samples
  inspect.setup("movie.tif", "movie.tif denoised", "movie.tif std", "movie.tif samples")
  inspect.show_pixel(5, 7)
  qtbot.waitUntil(lambda: inspect.traces is not None and inspect.worker is None,
                  timeout=WAIT_MS)
  lo, hi = inspect.traces["band"]
  assert inspect.traces["band_label"] == "90% band (8 samples)"
  assert (lo[:, 0] <= den[:, 5, 7] + 1e-6).all() and (hi[:, 0] >= den[:, 5, 7] - 1e-6).all()


def test_the_calibrated_uncertainty_stopped_or_too_big_adds_nothing(
    viewer, qtbot, trained_model, movie_file, errors, monkeypatch):
  from deepcad_jax.runtime import resources
  layer = _open(viewer, movie_file)
  w = _dock(viewer, DenoiseWidget)
  w.layer_choice.choose(layer.name)
  w.model.setText(trained_model)
  w.uncertainty.setCurrentIndex(widgets.CALIBRATED)
  real = widgets.calibrated_uncertainty

  def stopped_during(*args, **kwargs):  # Stop pressed while the calibration runs
    w.stop()
    return real(*args, **kwargs)
  monkeypatch.setattr(widgets, "calibrated_uncertainty", stopped_during)
  w.run()
  _wait(qtbot, w)
  assert w.status.text() == "cancelled." and "movie.tif denoised" not in viewer.layers
  monkeypatch.setattr(resources, "host_available_bytes", lambda: 1 << 20)
  w.run()  # 1 MiB free: refused before anything runs
  _wait(qtbot, w)
  assert len(errors()) == 1 and "works in segments" in errors()[0], errors()
  assert "movie.tif denoised" not in viewer.layers


def test_denoise_bad_input_is_one_notification(viewer, qtbot, tmp_path, movie_file,
                                               errors):
  w = _dock(viewer, DenoiseWidget)
  _open(viewer, movie_file)
  w.layer_choice.choose("movie.tif")
  (tmp_path / "model.txt").write_text("not a model")
  w.model.setText(str(tmp_path / "model.txt"))
  w.run()
  _wait(qtbot, w)
  viewer.add_image(np.ones((16, 16), np.float32), name="flat")
  w.layer_choice.choose("flat")
  w.run()
  _wait(qtbot, w)
  shown = errors()
  assert len(shown) == 2 and "model.txt" in shown[0] and "3-D" in shown[1], shown
  assert "movie.tif denoised" not in viewer.layers


# ------------------------------------------------------------------ stream


def test_stream_widget_replays_and_shows_every_frame(viewer, qtbot, trained_model,
                                                    movie_file):
  w = _dock(viewer, StreamWidget)
  _open(viewer, movie_file)
  w.layer_choice.choose("movie.tif")
  w.model.setText(trained_model)
  w.rate.setValue(0)
  w.run()
  _wait(qtbot, w)
  assert viewer.layers["stream raw"].data.shape == (24, 24)
  assert viewer.layers["movie.tif streamed"].data.shape == (64, 24, 24)


def test_a_run_can_be_cancelled(viewer, qtbot, trained_model, movie_file):
  w = _dock(viewer, StreamWidget)
  _open(viewer, movie_file)
  w.layer_choice.choose("movie.tif")
  w.model.setText(trained_model)
  w.rate.setValue(20)
  w.run()
  qtbot.waitUntil(lambda: w.progress.value() > 2, timeout=WAIT_MS)
  w.stop()
  _wait(qtbot, w)
  assert w.status.text() == "cancelled." and "movie.tif streamed" not in viewer.layers
  assert w.progress.value() < 64 and w.run_button.isEnabled()


# ------------------------------------------------------------------ inspect


def _inspect(viewer, trained_model, movie_file):
  from deepcad_jax import denoise
  raw = _open(viewer, movie_file)
  mean, std = denoise(movie_file, trained_model, symmetries=2)
  viewer.add_image(mean, name="den", metadata={"deepcad_model": trained_model})
  viewer.add_image(std, name="std")
  w = _dock(viewer, InspectWidget)
  w.setup(raw.name, "den", "std")
  return w


def test_inspect_a_drawn_roi_plots_traces_with_a_band(viewer, qtbot, trained_model,
                                                      movie_file):
  w = _inspect(viewer, trained_model, movie_file)
  assert viewer.layers["den"].contrast_limits == viewer.layers["movie.tif"].contrast_limits
  shapes = w.add_shapes()
  shapes.add_ellipses(np.array([[10, 10], [4, 4]]))  # centre, radii
  qtbot.waitUntil(lambda: w.traces is not None and w.worker is None, timeout=WAIT_MS)
  [roi] = w.traces["rois"]
  assert roi.name == "shape 1" and 30 < roi.pixels < 80
  assert w.traces["raw"].shape == w.traces["denoised"].shape == (64, 1)
  ax = w.figure.axes[0]
  assert len(ax.lines) >= 2 and ax.collections  # raw, denoised, and the band
  assert "held-out quality" in w.info.text() or "stores no held-out" in w.info.text()


def test_inspect_a_clicked_pixel_and_painted_labels(viewer, qtbot, trained_model,
                                                    movie_file):
  w = _inspect(viewer, trained_model, movie_file)

  class Click:
    type, position = "mouse_press", (10.0, 5.0, 7.0)

  viewer.layers.selection.active = viewer.layers["movie.tif"]
  w._on_click(viewer, Click())
  qtbot.waitUntil(lambda: w.traces is not None and w.worker is None, timeout=WAIT_MS)
  assert w.traces["rois"][0].name == "pixel (y=5, x=7)"
  np.testing.assert_allclose(w.traces["raw"][:, 0],
                             open_movie(movie_file).read(0, 64)[:, 5, 7])
  w.traces = None
  labels = w.add_labels()
  labels.data[2:5, 2:5] = 1
  labels.data[10:12, 10:14] = 2
  w.show_labels(labels)
  qtbot.waitUntil(lambda: w.traces is not None and w.worker is None, timeout=WAIT_MS)
  assert [r.pixels for r in w.traces["rois"]] == [9, 8]
  w.measure_noise()
  qtbot.waitUntil(lambda: "noise model" in w.info.text(), timeout=WAIT_MS)


# ------------------------------------------------------------------ view


def test_view_screenshot_writes_a_png_of_the_window(tmp_path, trained_model, movie_file,
                                                    qapp, capsys):
  from qtpy.QtGui import QImage
  from deepcad_jax import denoise
  mean, std = denoise(movie_file, trained_model, symmetries=2)
  den = write_tiff(tmp_path / "den.tif", mean)
  sd = write_tiff(tmp_path / "std.tif", std)
  out = str(tmp_path / "view.png")
  code = cli.main(["deepcad-jax", "view", "--raw", movie_file, "--denoised", den, "--std",
                   sd, "--pixel", "12,12", "--screenshot", out])
  assert code == 0, capsys.readouterr().err
  image = QImage(out)
  assert image.width() > 800 and image.height() > 500
  ptr = image.convertToFormat(QImage.Format_RGB888).constBits()
  ptr.setsize(image.height() * image.bytesPerLine())
  pixels = np.frombuffer(ptr, np.uint8)
  assert pixels.std() > 10 and len(np.unique(pixels)) > 50  # not blank
  assert cli.main(["deepcad-jax", "view", "--raw", movie_file, "--screenshot", out]) == 2
  assert "already exists" in capsys.readouterr().err
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no partial file


def test_view_samples_give_the_band_as_traces_draws_it(tmp_path, trained_model, movie_file,
                                                        qapp, capsys):
  from deepcad_jax import calibrated_uncertainty, denoise, write_uncertainty
  from deepcad_jax.analysis.traces import Traces, movie_traces
  from deepcad_jax.viewer import app
  den = write_tiff(tmp_path / "den.tif", denoise(movie_file, trained_model))
  u = calibrated_uncertainty(movie_file, trained_model, den, draws=4, keep_samples=True)
  paths = write_uncertainty(u, den)
  viewer, w = app.open_view(movie_file, den, paths[0], show=False, pixel=(12, 12),
                            samples=str(tmp_path / "den_sample*.tif"))
  try:
    app.wait_for(w)
    assert viewer.layers["samples: 4"].data.shape == (4, 64, 24, 24)
    assert viewer.dims.current_step[-3] == 32  # the movies' middle frame, not a sample
    roi = w.traces["rois"][0]
    samples = np.stack([movie_traces(open_movie(p), [roi]) for p in paths[2:]])
    lo, hi = Traces([roi.name], [1], movie_traces(open_movie(den), [roi]),
                    samples=samples).f_band
    np.testing.assert_allclose(w.traces["band"][0], lo, rtol=1e-5)
    np.testing.assert_allclose(w.traces["band"][1], hi, rtol=1e-5)
    assert w.traces["band_label"] == "90% band (4 samples)"
    assert "90% band (4 samples)" in [t.get_text() for t in
                                      w.figure.axes[0].get_legend().get_texts()]
  finally:
    viewer.close()
  out = str(tmp_path / "v.png")
  assert cli.main(["deepcad-jax", "view", "--raw", movie_file, "--samples",
                   str(tmp_path / "den_sample*.tif"), "--screenshot", out]) == 2
  assert "add --denoised" in capsys.readouterr().err
  assert cli.main(["deepcad-jax", "view", "--raw", movie_file, "--denoised", den,
                   "--samples", paths[2], "--screenshot", out]) == 2
  assert "a band needs at least 2 samples" in capsys.readouterr().err
  assert not os.path.exists(out)


def test_view_bad_input_and_without_napari(tmp_path, monkeypatch, capsys, movie_file):
  flat = write_tiff(tmp_path / "flat.tif", np.ones((16, 16), np.uint16))
  small = write_tiff(tmp_path / "small.tif", np.ones((4, 8, 8), np.uint16))
  out = str(tmp_path / "v.png")
  assert cli.main(["deepcad-jax", "view", "--raw", movie_file, "--denoised", small,
                   "--screenshot", out]) == 2
  assert "--denoised" in capsys.readouterr().err and not os.path.exists(out)
  assert cli.main(["deepcad-jax", "view", "--raw", flat, "--screenshot", out]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "flat.tif" in err
  with monkeypatch.context() as m:
    m.delenv("DISPLAY")
    m.delenv("WAYLAND_DISPLAY", raising=False)
    assert cli.main(["deepcad-jax", "view", "--raw", movie_file]) == 2
    assert "xvfb-run -a deepcad-jax view" in capsys.readouterr().err
  monkeypatch.setitem(sys.modules, "napari", None)
  assert cli.main(["deepcad-jax", "view", "--raw", movie_file]) == 2
  err = capsys.readouterr().err
  assert err.strip() == ('error: deepcad-jax view needs napari, which is not installed; '
                         'install it with pip install "deepcad-jax[napari]".')


def test_no_worker_is_left_running():
  assert not [t for t in threading.enumerate() if "Worker" in type(t).__name__]
