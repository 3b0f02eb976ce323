"""Outputs: atomic and locked writes, metadata carried from the input, folder reruns,
precision, and the process-level faults the fault matrix cannot express as rows."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.helpers import noisy_movie, write_tiff
from deepcad_jax import cli
from deepcad_jax.runtime import files as output_mod
from deepcad_jax.data.metadata import read_metadata
from deepcad_jax.data.movie import open_movie
from deepcad_jax.data.writers import MovieWriter, write_movie
from deepcad_jax.runtime.files import AtomicFile, lock_path
from deepcad_jax.errors import UserError
from deepcad_jax.denoising.denoiser import Denoiser, denoise
from deepcad_jax.denoising.files import denoise_files
from deepcad_jax.stream import ReplaySource, StreamDenoiser, run_pipeline


def leftovers(folder) -> list[str]:
  """Temporary and lock files in `folder` (and below)."""
  return sorted(str(p) for p in Path(folder).rglob("*")
                if ".partial" in p.name or p.name.endswith(".lock"))


def dead_pid() -> int:
  """The PID of a process that has exited (and been reaped)."""
  done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  return int(done.stdout)


def run_cli(capsys, *args) -> tuple[int, str, str]:
  code = cli.main(["deepcad-jax", *map(str, args)])
  out = capsys.readouterr()
  return code, out.out, out.err


# ------------------------------------------------------------------ the writer


def test_movie_writer_appears_only_when_complete(tmp_path):
  movie = noisy_movie((12, 8, 8))[0]
  path = tmp_path / "out.tif"
  with MovieWriter(str(path), (8, 8), np.uint16, frames=12) as w:
    w.write(movie[:5])
    assert not path.exists()
    temps = [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(temps) == 1 and temps[0].startswith(f".out.tif.{os.getpid()}-")
    assert Path(lock_path(str(path))).read_text().split()[0] == str(os.getpid())
    w.write(movie[5:])
  np.testing.assert_array_equal(open_movie(str(path)).read(0, 12), movie)
  assert not leftovers(tmp_path)


def test_movie_writer_removes_everything_on_any_exception(tmp_path):
  path = tmp_path / "new" / "deeper" / "out.tif"
  with pytest.raises(KeyboardInterrupt):
    with MovieWriter(str(path), (8, 8), np.float32, frames=4) as w:
      w.write(np.zeros((2, 8, 8), np.float32))
      raise KeyboardInterrupt  # Ctrl-C, or SIGTERM turned into an exception
  assert not (tmp_path / "new").exists()  # the folders made for it went too
  with pytest.raises(RuntimeError, match="2 of 4 frames"):  # never a short movie
    with MovieWriter(str(tmp_path / "short.tif"), (8, 8), np.float32, frames=4) as w:
      w.write(np.zeros((2, 8, 8), np.float32))
  with pytest.raises(TypeError, match="convert them first"):  # never rounded here
    with MovieWriter(str(tmp_path / "int.tif"), (8, 8), np.uint16, frames=1) as w:
      w.write(np.zeros((1, 8, 8), np.float32))
  assert not list(tmp_path.iterdir())


def test_a_writer_that_got_no_frame_leaves_no_file(tmp_path):
  w = MovieWriter(str(tmp_path / "live.tif"), None, np.float32)
  assert w.commit() is False
  assert not list(tmp_path.iterdir())


def test_second_writer_is_refused_and_names_the_pid(tmp_path):
  path = str(tmp_path / "out.tif")
  first = MovieWriter(path, (8, 8), np.float32, frames=1)
  with pytest.raises(UserError, match=rf"out\.tif is being written by another run "
                                      rf"\(PID {os.getpid()}\)"):
    MovieWriter(path, (8, 8), np.float32, frames=1, overwrite=True)
  first.write(np.ones((1, 8, 8), np.float32))
  first.commit()
  with pytest.raises(UserError, match="already exists"):  # checked again once locked
    MovieWriter(path, (8, 8), np.float32, frames=1)
  assert not leftovers(tmp_path)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  path = tmp_path / "out.tif"
  pid = dead_pid()
  Path(lock_path(str(path))).write_text(f"{pid} {socket.gethostname()} feedfacefeedface\n")
  with caplog.at_level(logging.INFO, logger="deepcad_jax"):
    write_movie(str(path), np.ones((2, 8, 8), np.float32))
  assert f"taking over the lock of PID {pid}" in caplog.text
  assert path.exists() and not leftovers(tmp_path)


def test_locks_of_other_hosts_and_unreadable_locks_are_respected(tmp_path, monkeypatch):
  path = tmp_path / "out.tif"
  lock = Path(lock_path(str(path)))
  lock.write_text(f"{dead_pid()} another-host feedfacefeedface\n")
  with pytest.raises(UserError, match=r"another run \(PID \d+ on another-host\)"):
    write_movie(str(path), np.ones((2, 8, 8), np.float32))
  monkeypatch.setattr(output_mod, "_LOCK_WAIT_S", 0.1)
  lock.write_text("")
  with pytest.raises(UserError, match="does not name a run; if no other run writes it, "
                                      "delete that file"):
    write_movie(str(path), np.ones((2, 8, 8), np.float32))
  assert lock.read_text() == "" and not path.exists()


def test_atomic_text_files_commit_together(tmp_path):
  from deepcad_jax.runtime.files import commit
  a, b = AtomicFile(str(tmp_path / "a.json")), AtomicFile(str(tmp_path / "b.csv"))
  json.dump({"x": 1}, a.text())
  b.text().write("t,y\n")
  assert not list(tmp_path.glob("*.json"))
  commit([a, b])
  assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
  assert (tmp_path / "b.csv").read_text() == "t,y\n" and not leftovers(tmp_path)


# ------------------------------------------------------------------ denoise


def test_missing_output_folder_is_created(trained_model, tmp_path, capsys):
  src = write_tiff(tmp_path / "movie.tif", noisy_movie((40, 24, 24))[0])
  out = tmp_path / "nodir" / "sub" / "den.tif"
  code, _, err = run_cli(capsys, "denoise", "--model", trained_model, "--input", src,
                         "--output", out)
  assert code == 0, err
  assert open_movie(str(out)).shape == (40, 24, 24) and not leftovers(tmp_path)


def test_folder_rerun_skips_complete_outputs(trained_model, tmp_path, capsys):
  data, out = tmp_path / "in", tmp_path / "out"
  data.mkdir()
  good = noisy_movie((40, 24, 24))[0]
  write_tiff(data / "a.tif", good)
  bad = good.astype(np.float32)
  bad[7, 3, 3] = np.nan
  write_tiff(data / "b.tif", bad)
  write_tiff(data / "c.tif", good[::-1].copy())
  code, _, err = run_cli(capsys, "denoise", "--model", trained_model, "--input", data,
                         "--output", out)
  assert code == 2 and "b.tif" in err and "contains NaN" in err
  assert "1 of the 3 movies" in err and "run the same command again" in err
  assert sorted(os.listdir(out)) == [".a.tif.made-from.json", "a.tif"]
  first = (out / "a.tif").stat().st_mtime_ns
  write_tiff(data / "b.tif", good)  # the user fixes b.tif
  code, _, err = run_cli(capsys, "denoise", "--model", trained_model, "--input", data,
                         "--output", out)
  assert code == 0, err
  assert f"skipping {data / 'a.tif'}: {out / 'a.tif'} is already complete" in err
  assert (out / "a.tif").stat().st_mtime_ns == first  # not redone
  assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [
      "a.tif", "b.tif", "c.tif"]
  # An output that is not this input's result is not skipped, nor replaced.
  write_tiff(out / "c.tif", good[:8])
  code, _, err = run_cli(capsys, "denoise", "--model", trained_model, "--input", data,
                         "--output", out)
  assert code == 2 and "c.tif already exists but is not a complete output" in err
  assert "8x24x24 uint16, not 40x24x24 float32" in err
  code, _, err = run_cli(capsys, "denoise", "--model", trained_model, "--input", data,
                         "--output", out, "--overwrite")  # redoes them all
  assert code == 0 and "skipping" not in err
  assert open_movie(str(out / "c.tif")).shape == (40, 24, 24) and not leftovers(tmp_path)
  code, _, err = run_cli(capsys, "denoise", "--model", trained_model, "--input", data,
                         "--output", out)
  assert code == 0 and f"every output in {out} is already complete; nothing to do" in err


def test_integer_outputs_are_measured_and_noted(trained_model, tmp_path, caplog):
  bright = write_tiff(tmp_path / "bright.tif", noisy_movie((40, 24, 24))[0])
  dim_movie = np.random.default_rng(0).poisson(2.0, (40, 24, 24)).astype(np.uint16)
  dim = write_tiff(tmp_path / "dim.tif", dim_movie)
  for name, src in (("dim", dim), ("bright", bright)):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepcad_jax"):
      [r] = denoise_files(src, str(tmp_path / f"{name}_u16.tif"), trained_model,
                          output_dtype="input", progress=False)
      [f] = denoise_files(src, str(tmp_path / f"{name}_f32.tif"), trained_model,
                          progress=False)
    assert r.dtype == "uint16" and f.dtype == "float32" and f.rounding_rms == 0
    exact = open_movie(str(tmp_path / f"{name}_f32.tif")).read(0, 40).astype(np.float64)
    rounded = open_movie(str(tmp_path / f"{name}_u16.tif")).read(0, 40)
    np.testing.assert_array_equal(rounded, np.clip(np.rint(exact), 0, 65535))
    measured = np.sqrt(np.mean((rounded - exact) ** 2))
    assert r.rounding_rms == pytest.approx(measured, rel=1e-3)  # measured on the device
    variation = np.sqrt(np.mean(exact.var(0)))
    if name == "dim":  # the network flattened it: rounding matters
      assert measured > 0.1 * variation
      assert f"rounding {tmp_path / 'dim_u16.tif'} to uint16 added {measured:.2f} counts " \
             f"RMS of quantisation noise, {100 * measured / variation:.0f}% of the " \
             f"denoised movie's temporal variation ({variation:.2f} counts RMS); the " \
             "default --output-dtype float32 keeps the network's precision" in caplog.text
    else:
      assert measured < 0.1 * variation and "quantisation" not in caplog.text


def test_output_dtype_flag_gets_one_sentence(trained_model, tmp_path, capsys):
  src = write_tiff(tmp_path / "movie.tif", noisy_movie((40, 24, 24))[0])
  code, _, err = run_cli(capsys, "denoise", "--model", trained_model, "--input", src,
                         "--output", tmp_path / "den.tif", "--output-dtype", "uint12")
  assert code == 2 and "--output-dtype takes float32 (the default), input" in err
  assert "Traceback" not in err and not (tmp_path / "den.tif").exists()


# ------------------------------------------------------------------ metadata


def _imagej_movie(path, axes="TYX", dtype=np.uint16):
  movie = noisy_movie((40, 24, 24))[0].astype(dtype)
  tifffile.imwrite(path, movie, imagej=True, resolution=(1 / 0.65, 1 / 0.65),
                   metadata={"axes": axes, "unit": "micron", "finterval": 0.033,
                             "spacing": 2.5, "Info": "objective 25x", "min": 10,
                             "max": 900, "Properties": {"Indicator": "GCaMP6f"}})
  return str(path)


def _check_imagej(path, axis="T"):
  with tifffile.TiffFile(path) as tif:
    assert tif.is_imagej, path
    ij = tif.imagej_metadata
    md = read_metadata(tif, axis)
    assert tif.series[0].axes == axis + "YX"
  assert ij["unit"] == "micron" and ij["finterval"] == pytest.approx(0.033)
  assert ij["spacing"] == pytest.approx(2.5) and ij["Info"] == "objective 25x"
  assert ij["Properties"] == {"Indicator": "GCaMP6f"} and (ij["min"], ij["max"]) == (10, 900)
  assert ij["frames" if axis == "T" else "slices"] == 40
  assert md.pixel_size == pytest.approx((0.65, 0.65))


def test_imagej_metadata_reaches_every_output(trained_model, tmp_path):
  src = _imagej_movie(tmp_path / "movie.tif")
  out = tmp_path / "den.tif"
  denoise_files(src, str(out), trained_model, symmetries=2, save_samples=True,
                progress=False)
  for path in (out, tmp_path / "den_std.tif", tmp_path / "den_sample00.tif"):
    _check_imagej(str(path))
  # planes stay planes; an integer output too
  zsrc = _imagej_movie(tmp_path / "stack.tif", axes="ZYX")
  denoise_files(zsrc, str(tmp_path / "stack_den.tif"), trained_model,
                output_dtype="input", progress=False)
  _check_imagej(str(tmp_path / "stack_den.tif"), axis="Z")
  assert open_movie(str(tmp_path / "stack_den.tif")).dtype == np.uint16


def test_ome_metadata_reaches_the_output_and_ome_names_give_ome(trained_model, tmp_path):
  movie = noisy_movie((40, 24, 24))[0]
  src = str(tmp_path / "movie.ome.tif")
  tifffile.imwrite(src, movie, metadata={
      "axes": "TYX", "Name": "fov1", "PhysicalSizeX": 0.4, "PhysicalSizeXUnit": "µm",
      "PhysicalSizeY": 0.5, "PhysicalSizeYUnit": "µm", "TimeIncrement": 33.0,
      "TimeIncrementUnit": "ms", "Channel": {"Name": "GCaMP", "EmissionWavelength": 510.0}})
  out = str(tmp_path / "den.ome.tif")
  denoise_files(src, out, trained_model, symmetries=2, progress=False)
  for path in (out, str(tmp_path / "den_std.ome.tif")):
    with tifffile.TiffFile(path) as tif:
      assert tif.is_ome, path
      md = read_metadata(tif)
      xml = tif.ome_metadata
    assert md.ome["PhysicalSizeX"] == 0.4 and md.ome["PhysicalSizeY"] == 0.5
    assert md.ome["TimeIncrement"] == 33.0 and md.ome["TimeIncrementUnit"] == "ms"
    assert md.frame_interval == pytest.approx(0.033) and md.ome["Name"] == "fov1"
    assert md.ome["Channel"] == {"Name": "GCaMP", "EmissionWavelength": "510.0"}
    assert 'Type="float"' in xml and 'SizeT="40"' in xml
  # an ImageJ input written to a .ome.tif name: OME, with its calibration
  ij = _imagej_movie(tmp_path / "ij.tif")
  denoise_files(ij, str(tmp_path / "ij_den.ome.tif"), trained_model, progress=False)
  with tifffile.TiffFile(tmp_path / "ij_den.ome.tif") as tif:
    md = read_metadata(tif)
  assert tif.is_ome and md.unit == "µm" and md.pixel_size == pytest.approx((0.65, 0.65))
  assert md.frame_interval == pytest.approx(0.033)


def test_plain_resolution_tags_are_kept(trained_model, tmp_path):
  src = write_tiff(tmp_path / "movie.tif", noisy_movie((40, 24, 24))[0],
                   resolution=(20000.0, 25000.0), resolutionunit="CENTIMETER")
  out = str(tmp_path / "den.tif")
  denoise_files(src, out, trained_model, progress=False)
  with tifffile.TiffFile(out) as tif:
    md = read_metadata(tif)
  assert md.unit == "cm" and md.pixel_size == pytest.approx((4e-5, 5e-5))


def test_stream_outputs_carry_the_source_metadata(trained_model, tmp_path):
  src = _imagej_movie(tmp_path / "movie.tif")
  s = StreamDenoiser(Denoiser(trained_model), mean="running")
  r = run_pipeline(ReplaySource(src, rate=0), s, str(tmp_path / "live.tif"),
                   progress=False)
  assert r.frames_out == 40 and r.denoised and r.raw
  for path in (r.denoised, r.raw):
    _check_imagej(path)
  assert not leftovers(tmp_path)


def test_simulated_movies_record_their_frame_interval(tmp_path, capsys):
  code, _, err = run_cli(capsys, "simulate", "--output", tmp_path / "sim", "--shape",
                         "8,16,16", "--frame-rate", "20")
  assert code == 0, err
  with tifffile.TiffFile(tmp_path / "sim" / "noisy.tif") as tif:
    assert read_metadata(tif).frame_interval == pytest.approx(0.05)
  assert not leftovers(tmp_path)


# ------------------------------------------------------------------ processes

HOLDER = """
import sys
import numpy as np
from deepcad_jax.data.writers import MovieWriter
writer = MovieWriter(sys.argv[1], (24, 24), np.float32, frames=40)  # locks it
writer.write(np.zeros((8, 24, 24), np.float32))  # and starts its temporary file
print("locked", flush=True)
sys.stdin.read()
"""


def _env():
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def test_an_output_locked_by_a_live_process_then_a_killed_one(trained_model, tmp_path,
                                                             capsys):
  src = write_tiff(tmp_path / "movie.tif", noisy_movie((40, 24, 24))[0])
  out = str(tmp_path / "den.tif")
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, out], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
  try:
    assert holder.stdout.readline().strip() == "locked"
    code, _, err = run_cli(capsys, "denoise", "--model", trained_model, "--input", src,
                           "--output", out)
    assert code == 2 and f"den.tif is being written by another run (PID {holder.pid})" \
        in err
  finally:
    holder.kill()  # kill -9: its lock stays behind
    holder.wait()
  assert os.path.exists(lock_path(out)) and len(leftovers(tmp_path)) == 2
  code, _, err = run_cli(capsys, "denoise", "--model", trained_model, "--input", src,
                         "--output", out)
  assert code == 0, err
  assert f"taking over the lock of PID {holder.pid}, which no longer runs (its " \
         f"unfinished .den.tif.{holder.pid}-" in err
  assert open_movie(out).shape == (40, 24, 24) and not leftovers(tmp_path)


def test_two_concurrent_runs_never_mix_their_outputs(trained_model, tmp_path):
  movie = noisy_movie((40, 24, 24))[0]
  src = write_tiff(tmp_path / "movie.tif", movie)
  out = str(tmp_path / "den.tif")
  args = [sys.executable, "-m", "deepcad_jax", "denoise", "--model", trained_model,
          "--input", src, "--output", out]
  procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env()) for _ in range(2)]
  results = [(p.wait(timeout=300), p.stdout.read() + p.stderr.read()) for p in procs]
  codes = sorted(code for code, _ in results)
  assert codes == [0, 2], results
  loser = next(text for code, text in results if code == 2)
  errors = [line for line in loser.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in loser
  assert "being written by another run (PID" in errors[0] or \
      "already exists" in errors[0], errors
  expected = denoise(movie, trained_model)
  np.testing.assert_allclose(open_movie(out).read(0, 40), expected, rtol=1e-6, atol=1e-4)
  assert not leftovers(tmp_path)


SIGTERM_RUN = """
import signal, sys, time
from deepcad_jax.denoising import engine, files

def stop(*_):
  raise KeyboardInterrupt  # what the CLI does with SIGTERM: unwind like Ctrl-C

signal.signal(signal.SIGTERM, stop)
fetch = engine.Engine.fetch

def slow(submitted, host_dtype):  # a long run: time to be stopped between windows
  time.sleep(0.5)
  return fetch(submitted, host_dtype)

engine.Engine.fetch = staticmethod(slow)
files.denoise_files(sys.argv[1], sys.argv[2], sys.argv[3], progress=False,
                    tiling="overlap", patch=(16, 16, 16), symmetries=2)
"""


def test_sigterm_during_denoise_leaves_nothing(trained_model, tmp_path):
  src = write_tiff(tmp_path / "movie.tif", noisy_movie((64, 24, 24))[0])
  out = tmp_path / "den.tif"
  proc = subprocess.Popen([sys.executable, "-c", SIGTERM_RUN, src, str(out),
                           trained_model], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=_env())
  deadline = time.monotonic() + 240
  while not list(tmp_path.glob(".den.tif.*.partial")):  # frames are being written
    assert proc.poll() is None, proc.stdout.read()
    assert time.monotonic() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  text = proc.communicate(timeout=120)[0]
  assert proc.returncode != 0 and "KeyboardInterrupt" in text, text
  assert sorted(os.listdir(tmp_path)) == ["movie.tif"], text  # no output, temp or lock


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_an_output_never_replaces_a_device(device):
  """`--output tiff:/dev/full --overwrite`: refused before any lock or temporary file
  is made beside the device, and the device is left as it was."""
  if not os.path.exists(device):
    pytest.skip(f"no {device} here")
  before = os.stat(device)
  with pytest.raises(UserError, match=rf"{device} is a character device, not a regular "
                     "file; an output never replaces it"):
    write_movie(f"tiff:{device}", np.zeros((2, 4, 4), np.float32), overwrite=True)
  after = os.stat(device)
  assert (after.st_mode, after.st_rdev) == (before.st_mode, before.st_rdev)
  assert not os.path.exists(lock_path(device))


def test_a_fifo_output_is_refused_even_if_it_appears_late(tmp_path):
  """A FIFO that appears under the output's name while it is written is not replaced
  by the final rename: the output is removed and the FIFO kept."""
  path = tmp_path / "den.tif"
  with pytest.raises(UserError, match=r"den\.tif is a FIFO"):
    with MovieWriter(str(path), (4, 4), np.float32, frames=1, overwrite=True) as w:
      w.write(np.zeros((1, 4, 4), np.float32))
      os.mkfifo(path)
  assert os.path.exists(path) and not path.is_file()
  assert sorted(os.listdir(tmp_path)) == ["den.tif"]
