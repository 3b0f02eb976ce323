import threading
import time

import numpy as np
import pytest
import tifffile

from tests.helpers import noisy_movie, write_tiff
from deepcad_jax import Denoiser, UserError, cli, load_model
from deepcad_jax.model_io.checkpoint import Model
from deepcad_jax.data import as_movie, open_movie
from deepcad_jax.denoising.step import identity_tiles
from deepcad_jax.stream import FolderSource, StreamDenoiser, run_pipeline


@pytest.fixture(scope="module")
def identity_denoiser(trained_model):
  # The identity network shows what the partition alone does; a scale of 1 keeps the
  # normalisation's round trip exact, so frames come out bit for bit.
  model = load_model(trained_model)
  model = Model(model.params, model.meta.replace(scale=1.0), model.source)
  return Denoiser(model, network=identity_tiles())


@pytest.mark.parametrize("seed", range(6))
def test_every_frame_comes_out_once_in_order(identity_denoiser, seed):
  rng = np.random.default_rng(seed)
  length = int(rng.choice([1, 5, 8, 13, 16, 40, 77]))
  batch, overlap = int(rng.choice([8, 16])), int(rng.integers(0, 6))
  movie = rng.normal(size=(length, 12, 20)).astype(np.float32)
  stream = StreamDenoiser(identity_denoiser, batch, overlap, mean=0.0)
  got, t = [], 0
  while t < length:
    n = int(rng.integers(1, 11))
    stream.push(movie[t:t + n] if n > 1 else movie[t])
    got.append(stream.pull())
    t += n
  stream.close()
  got.append(stream.pull())
  out = np.concatenate(got)
  np.testing.assert_array_equal(out, movie)  # exactly once, in order, untouched
  assert len(stream.frames) < 2 * batch  # only what later batches may need is held


def test_stream_equals_offline_denoise(trained_model):
  movie, _ = noisy_movie((53, 24, 30), seed=7)
  mean = float(movie.mean())
  # The overlap scheme: the model's patch (8, 16, 16) and overlap 0.25.
  den = Denoiser(trained_model, tiling="overlap")
  offline = np.concatenate(list(den.blocks(as_movie(movie), mean=mean)))
  stream = StreamDenoiser(den, mean=mean)  # batch 8, overlap from the model: 2 frames
  assert (stream.B, stream.overlap_frames) == (8, 2)
  for t in range(0, 53, 3):
    stream.push(movie[t:t + 3])
  stream.close()
  np.testing.assert_allclose(stream.pull(), offline, rtol=1e-5, atol=1e-3)
  # Exact (the default): equal to offline exact denoising, whatever the core size.
  den = Denoiser(trained_model)
  offline = np.concatenate(list(den.blocks(as_movie(movie), mean=mean)))
  for core in (8, 16):
    stream = StreamDenoiser(den, mean=mean, core_frames=core)
    assert stream.exact and stream.B == 96 + core
    for t in range(0, 53, 5):
      stream.push(movie[t:t + 5])
    stream.close()
    np.testing.assert_allclose(stream.pull(), offline, rtol=1e-5, atol=1e-3)


def test_stream_refuses_denoiser_settings_it_cannot_honour(trained_model):
  # A stream crops its batches: blending or reference stitching would be ignored.
  for setting in ("blend", "reference_stitching"):
    den = Denoiser(trained_model, tiling="overlap", **{setting: True})
    with pytest.raises(UserError, match=f"cannot honour {setting}=True"):
      StreamDenoiser(den, mean=0.0)
  with pytest.raises(UserError, match="cannot honour blend=True"):
    StreamDenoiser(Denoiser(trained_model, blend=True), 8, 2, mean=0.0)


def test_stream_with_uncertainty_gives_and_writes_the_mean_and_std(trained_model,
                                                                    tmp_path):
  movie, _ = noisy_movie((29, 24, 30), seed=3)
  mean = float(movie.mean())
  for tiling in ("exact", "overlap"):
    den = Denoiser(trained_model, symmetries=2, tiling=tiling)
    offline = np.concatenate(list(den.blocks(as_movie(movie), mean=mean)))
    assert offline.shape == (29, 24, 30, 2)
    stream = StreamDenoiser(den, mean=mean)
    assert stream.pull().shape == (0, 0, 0, 2)
    for t in range(0, 29, 4):
      stream.push(movie[t:t + 4])
    stream.close()
    np.testing.assert_allclose(stream.pull(), offline, rtol=1e-5, atol=1e-3)
  # The pipeline writes the mean as the output and the std beside it, as offline.
  out = tmp_path / "live.tif"
  r = run_pipeline(SlowSource(movie), StreamDenoiser(den, mean=mean), str(out),
                   progress=False)
  assert r.frames_out == 29 and r.extras == [str(tmp_path / "live_std.tif")]
  np.testing.assert_allclose(tifffile.imread(out), offline[..., 0], rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(tifffile.imread(tmp_path / "live_std.tif"), offline[..., 1],
                             rtol=1e-5, atol=1e-3)


def test_mean_options(trained_model, identity_denoiser):
  s = StreamDenoiser(identity_denoiser, 8, 2, mean="running")
  s.push(np.full((8, 8, 8), 10.0))
  assert s._mean() == 10.0
  with pytest.raises(UserError, match="mean must be"):
    StreamDenoiser(identity_denoiser, 8, 2, mean="median")
  with pytest.raises(UserError, match="overlap_frames"):
    StreamDenoiser(identity_denoiser, 8, 8)


class SlowSource:
  """Frames as fast as possible; optionally failing after `fail_at` frames."""

  def __init__(self, movie, fail_at=None):
    self.movie, self.fail_at = movie, fail_at

  def frames(self, stop):
    for i, frame in enumerate(self.movie):
      if i == self.fail_at:
        raise RuntimeError("camera disconnected")
      yield frame


def test_back_pressure_blocks_and_drop_policy_counts(tmp_path, identity_denoiser):
  movie = np.random.default_rng(0).normal(size=(120, 8, 8)).astype(np.float32)

  def slow_output(raw, den):
    time.sleep(0.002 * len(den))

  s = StreamDenoiser(identity_denoiser, 8, 2, mean=0.0)
  r = run_pipeline(SlowSource(movie), s, str(tmp_path / "block.tif"), queue_frames=4,
                   policy="block", on_output=slow_output, progress=False)
  assert r.frames_in == r.frames_out == 120 and r.dropped == 0
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "block.tif"), movie)

  s = StreamDenoiser(identity_denoiser, 8, 2, mean=0.0)
  r = run_pipeline(SlowSource(movie * 1000), s, str(tmp_path / "u16.tif"), progress=False,
                   output_dtype=np.uint16)
  assert r.clipped == np.count_nonzero(np.rint(movie * 1000) < 0)  # clipped, not wrapped
  assert tifffile.imread(tmp_path / "u16.tif").max() <= 65535

  s = StreamDenoiser(identity_denoiser, 8, 2, mean=0.0)
  r = run_pipeline(SlowSource(movie), s, str(tmp_path / "drop.tif"), queue_frames=4,
                   policy="drop", on_output=slow_output, progress=False)
  assert r.dropped > 0 and r.frames_out == 120 - r.dropped and not r.kept_up
  assert tifffile.imread(tmp_path / "drop_raw.tif").shape == (120, 8, 8)  # raw keeps all


@pytest.mark.parametrize("stage", ["acquisition", "processing", "output"])
def test_a_failing_stage_stops_the_pipeline_and_keeps_the_output(tmp_path,
                                                                 identity_denoiser, stage):
  movie = np.random.default_rng(1).normal(size=(60, 8, 8)).astype(np.float32)
  s = StreamDenoiser(identity_denoiser, 8, 2, mean=0.0)
  source = SlowSource(movie, fail_at=40 if stage == "acquisition" else None)
  seen = []

  def output(raw, den):
    seen.append(len(den))
    if stage == "output" and sum(seen) > 30:
      raise OSError("disk full")

  if stage == "processing":
    original = s.push

    def push(frames):
      if s.received >= 35:
        raise ValueError("device lost")
      original(frames)
    s.push = push
  with pytest.raises((RuntimeError, ValueError, OSError)):
    run_pipeline(source, s, str(tmp_path / "out.tif"), on_output=output, progress=False)
  written = tifffile.imread(tmp_path / "out.tif")
  if stage == "acquisition":  # what the camera delivered is still denoised
    assert len(written) == 40
  assert 0 < len(written) <= 60
  np.testing.assert_array_equal(written, movie[:len(written)])


def test_folder_source_reads_files_as_they_arrive(tmp_path):
  folder = tmp_path / "acq"
  folder.mkdir()
  movie = np.arange(10 * 4 * 4, dtype=np.uint16).reshape(10, 4, 4)

  def acquire():
    for i in range(0, 10, 3):
      write_tiff(folder / f"f{i:04d}.tif", movie[i:i + 3])
      time.sleep(0.05)
    (folder / "STOP").write_text("")

  writer = threading.Thread(target=acquire)
  writer.start()
  frames = list(FolderSource(str(folder), idle_timeout=5, poll=0.01).frames(threading.Event()))
  writer.join()
  np.testing.assert_array_equal(np.stack(frames), movie)


def test_stream_cli_replays_a_tiff_at_a_fixed_rate(capsys, tmp_path, trained_model,
                                                  monkeypatch):
  movie, _ = noisy_movie((48, 16, 16), seed=2)
  src = write_tiff(tmp_path / "movie.tif", movie)
  out = str(tmp_path / "live.tif")
  code = cli.main(["deepcad-jax", "stream", "--model", trained_model, "--source", src,
                   "--output", out, "--rate", "200", "--preview-every", "0.05"])
  text = capsys.readouterr()
  assert code == 0, text.err
  assert "48 in, 48 denoised, 0 dropped" in text.out and "kept up" in text.out
  assert "median" in text.out and "99th percentile" in text.out
  assert open_movie(out).shape == (48, 16, 16)
  assert open_movie(str(tmp_path / "live_raw.tif")).dtype == np.uint16
  assert list(tmp_path.glob("preview_*.png"))
  code = cli.main(["deepcad-jax", "stream", "--model", trained_model, "--source", src,
                   "--output", out])
  assert code == 2 and "already exists" in capsys.readouterr().err
  # --live without a display falls back to preview images, and says so.
  monkeypatch.delenv("DISPLAY", raising=False)
  monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
  code = cli.main(["deepcad-jax", "stream", "--model", trained_model, "--source", src,
                   "--output", out, "--overwrite", "--live", "--preview-every", "0",
                   "--rate", "0"])
  text = capsys.readouterr()
  assert code == 0, text.err
  assert "no display: writing preview images every 5 s" in text.out


def test_stream_cli_writes_the_std_with_uncertainty(capsys, tmp_path, trained_model):
  movie, _ = noisy_movie((40, 16, 16), seed=5)
  src = write_tiff(tmp_path / "movie.tif", movie)
  out = str(tmp_path / "live.tif")
  code = cli.main(["deepcad-jax", "stream", "--model", trained_model, "--source", src,
                   "--output", out, "--rate", "0", "--preview-every", "0",
                   "--uncertainty", "2", "--mean", str(float(movie.mean()))])
  text = capsys.readouterr()
  assert code == 0, text.err
  std_file = str(tmp_path / "live_std.tif")
  assert f"std and samples: {std_file}" in text.out
  # the stream normalises by the mean it was given and the model's scale; offline the
  # same when given that mean (without it, by the movie's own mean and spread)
  blocks = np.concatenate(list(Denoiser(trained_model, tiling="exact", symmetries=2).blocks(
      as_movie(movie), mean=float(movie.mean()))))
  offline_mean, offline_std = blocks[..., 0], blocks[..., 1]
  np.testing.assert_allclose(open_movie(out).read(0, 40), offline_mean, rtol=1e-5,
                             atol=1e-3)
  np.testing.assert_allclose(open_movie(std_file).read(0, 40), offline_std, rtol=1e-5,
                             atol=1e-3)
  code = cli.main(["deepcad-jax", "stream", "--model", trained_model, "--source", src,
                   "--output", str(tmp_path / "b.tif"), "--save-samples"])
  assert code == 2 and "--save-samples keeps the samples" in capsys.readouterr().err
  (tmp_path / "c_std.tif").write_bytes(b"")  # an earlier run's std: refused up front
  code = cli.main(["deepcad-jax", "stream", "--model", trained_model, "--source", src,
                   "--output", str(tmp_path / "c.tif"), "--uncertainty", "2"])
  assert code == 2 and "c_std.tif already exists" in capsys.readouterr().err
  assert not (tmp_path / "c.tif").exists() and not (tmp_path / "c_raw.tif").exists()
  with pytest.raises(UserError, match="finite number"):
    StreamDenoiser(trained_model, mean="nan")
