"""Signals to the commands that run others (ladder) and to the stream: they stop with
the signal's exit status, write no result of a half-done step and name only the files
that exist."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import noisy_movie, write_tiff


def _cli(*args, stderr) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # A shell's background job starts with SIGINT ignored, and Python then installs no
  # KeyboardInterrupt handler: the child gets the default, as a terminal's command has.
  return subprocess.Popen([sys.executable, "-m", "deepcad_jax", *args], env=env,
                          stdout=subprocess.PIPE, stderr=stderr, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(predicate, timeout=180.0) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.1)
  return False


def _signal_after(proc: subprocess.Popen, err, text: str, sig: int) -> str:
  """Send `sig` once `text` appears on the process's stderr; its stderr at exit."""
  try:
    assert _wait_for(lambda: text in err.read_text() or proc.poll() is not None)
    assert proc.poll() is None, err.read_text()[-2000:]
    time.sleep(1)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return err.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_ladder_without_a_half_trained_rung(tmp_path, sig):
  movie = write_tiff(tmp_path / "movie.tif", noisy_movie((40, 24, 24))[0])
  work, err = tmp_path / "ladder", tmp_path / "stderr.txt"
  with open(err, "w") as f:
    proc = _cli("ladder", "--data", movie, "--workdir", str(work), "--config", "tiny",
                "--widths", "4", "--epochs", "200", "--holdout", "24:40", "--nomeasure",
                stderr=f)
  text = _signal_after(proc, err, "per epoch", sig)
  assert proc.returncode == 128 + sig, text[-2000:]
  assert "Traceback" not in text
  assert not (work / "ladder.json").exists() and not (work / "ladder.csv").exists()
  assert text.splitlines()[-1] in ("interrupted.", "terminated (SIGTERM).")


@pytest.mark.slow
def test_a_stopped_stream_names_only_the_files_it_wrote(tmp_path, trained_model):
  movie = write_tiff(tmp_path / "movie.tif", noisy_movie((40, 24, 24))[0])
  err = tmp_path / "stderr.txt"
  with open(err, "w") as f:  # 20 s of frames at 2 Hz: stopped before the end
    proc = _cli("stream", "--model", trained_model, "--source", movie, "--rate", "2",
                "--output", str(tmp_path / "live.tif"), stderr=f)
  text = _signal_after(proc, err, "compiled", signal.SIGINT)
  assert proc.returncode == 130, text[-2000:]
  [said] = [line for line in text.splitlines() if "stream stopped;" in line]
  named = re.findall(r"\S+\.tif", said)
  assert named and all(os.path.isfile(p) for p in named), (said, os.listdir(tmp_path))
  if not (tmp_path / "live.tif").exists():
    assert "no denoised file was written" in said


@pytest.mark.slow
@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_denoise_leaves_no_output_and_no_traceback(tmp_path, trained_model, sig,
                                                            status):
  """Stopped while it works (a second after it names its input), `denoise` exits with the
  signal's status, in one line, and leaves neither the output nor its temporary files
  (the regional brightness correction's float32 spill included); the input is as it
  was."""
  movie = write_tiff(tmp_path / "movie.tif", noisy_movie((4000, 64, 64))[0])
  before = open(movie, "rb").read()
  err = tmp_path / "stderr.txt"
  with open(err, "w") as f:
    proc = _cli("denoise", "--model", trained_model, "--input", movie, "--output",
                str(tmp_path / "den.tif"), stderr=f)
  text = _signal_after(proc, err, "Denoising", sig)
  assert proc.returncode == status, text[-2000:]
  assert "Traceback" not in text, text[-2000:]
  assert sorted(os.listdir(tmp_path)) == ["movie.tif", "stderr.txt"]
  assert open(movie, "rb").read() == before


@pytest.mark.slow
@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_demo_writes_no_result_and_runs_again(tmp_path, sig, status):
  """Stopped while it trains, `demo` exits with the signal's status in one line and
  writes no denoised movie and no results; run again with --overwrite, it completes."""
  work, err = tmp_path / "demo", tmp_path / "stderr.txt"
  with open(err, "w") as f:
    proc = _cli("demo", "--quick", "--workdir", str(work), stderr=f)
  text = _signal_after(proc, err, "compiling the training step", sig)
  assert proc.returncode == status, text[-2000:]
  assert "Traceback" not in text, text[-2000:]
  assert not (work / "denoised.tif").exists() and not (work / "results.json").exists()
  again = subprocess.run([sys.executable, "-m", "deepcad_jax", "demo", "--quick",
                          "--workdir", str(work), "--overwrite"], capture_output=True,
                         text=True, env={k: v for k, v in os.environ.items()
                                         if k != "XLA_FLAGS"})
  assert again.returncode == 0, again.stderr[-2000:]
  assert (work / "denoised.tif").exists() and (work / "results.json").exists()
