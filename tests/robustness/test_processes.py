"""Processes, signals and progress: the workdir lock, kills, SIGTERM, checkpoint saves
that fail or come every few minutes, compile-free ETAs, --help defaults, --version."""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import jaxlib
import numpy as np
import pytest

import deepcad_jax
from tests.helpers import noisy_movie, tiny_config, write_tiff
from deepcad_jax import UserError, cli, load_model
from deepcad_jax.analysis import metrics
from deepcad_jax import train
from deepcad_jax.runtime import progress as progress_module
from deepcad_jax.errors import Terminated
from deepcad_jax.runtime.locks import LOCK_NAME, WorkdirLock
from deepcad_jax.runtime.progress import Progress
from tests.helpers.processes import descendants, running, start_lock_holder, stop


@pytest.fixture
def movie_path(tmp_path):
  return write_tiff(tmp_path / "movie.tif", noisy_movie((40, 24, 24))[0])


@pytest.fixture
def logs(caplog):
  """What deepcad_jax logs at INFO and above (its logger may not propagate: the CLI's)."""
  logger = logging.getLogger("deepcad_jax")
  level = logger.level
  logger.addHandler(caplog.handler)
  logger.setLevel(logging.INFO)
  yield caplog
  logger.removeHandler(caplog.handler)
  logger.setLevel(level)


def _tiny(**changes):
  return tiny_config(**{"train.epochs": 1, **changes})


# ------------------------------------------------------------------ the workdir lock


def test_a_held_workdir_names_the_pid_and_is_untouched(tmp_path, movie_path, devices):
  run = tmp_path / "run"
  holder = start_lock_holder(run)
  try:
    with pytest.raises(UserError, match=rf"run is in use by another training run "
                       rf"\(PID {holder.pid}, started .*kill {holder.pid}"):
      train(movie_path, str(run), _tiny(), devices=devices[:1], progress=False, fresh=True)
    assert os.listdir(run) == [LOCK_NAME]  # --fresh deleted nothing, no checkpoint began
  finally:
    stop(holder)
  result = train(movie_path, str(run), _tiny(), devices=devices[:1], progress=False)
  assert result.step == 16
  assert not os.path.exists(run / LOCK_NAME)  # released: the file goes with the lock


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path, movie_path, devices, logs):
  run = tmp_path / "run"
  holder = start_lock_holder(run)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  stop(holder)
  assert json.loads((run / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind
  result = train(movie_path, str(run), _tiny(), devices=devices[:1], progress=False)
  assert result.step == 16
  assert f"left by PID {holder.pid}" in logs.text and "no longer running" in logs.text


def test_the_lock_within_one_process(tmp_path):
  with WorkdirLock(str(tmp_path / "a")) as lock:
    holder = json.loads(open(lock.path).read())
    assert holder["pid"] == os.getpid()
    with pytest.raises(UserError, match=f"PID {os.getpid()}"):
      WorkdirLock(str(tmp_path / "a")).acquire()  # a second open file is a second holder
    with WorkdirLock(str(tmp_path / "b")):
      pass
  assert os.listdir(tmp_path / "a") == []
  WorkdirLock(str(tmp_path / "a")).acquire().release()


# ------------------------------------------------------------------ kills and signals


def _cli(*args, **kwargs) -> subprocess.Popen:
  """`deepcad-jax ARGS` in a fresh process (one CPU device), stderr to a file."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen([sys.executable, "-m", "deepcad_jax", *args], env=env,
                          stdout=subprocess.PIPE, text=True, **kwargs)


def _wait_for(predicate, timeout=120.0, every=0.1):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(every)
  return False


@pytest.mark.slow
def test_kill_9_takes_the_grain_workers_along(tmp_path, movie_path):
  err = tmp_path / "stderr.txt"
  with open(err, "w") as f:
    proc = _cli("train", "--config", "tiny", "--data", movie_path, "--workdir",
                str(tmp_path / "run"), "--workers", "2", "--epochs", "1000", stderr=f)
  try:
    assert _wait_for(lambda: "step 1/" in err.read_text() or proc.poll() is not None), \
        err.read_text()[-2000:]  # training: the workers have started
    below = descendants(proc.pid)
    workers = [p for p in below if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
    assert len(workers) == 2, below  # grain's workers (and multiprocessing's tracker)
  finally:
    proc.kill()
    proc.wait()
    proc.stdout.close()
  survivors = lambda: [p for p in below if running(p)]  # noqa: E731
  try:
    assert _wait_for(lambda: not survivors(), timeout=10), survivors()
  finally:
    for pid in survivors():
      os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_workers_quietly(tmp_path, movie_path):
  """A terminal's Ctrl-C reaches grain's workers too: they leave it to the parent."""
  err = tmp_path / "stderr.txt"
  with open(err, "w") as f:
    proc = _cli("train", "--config", "tiny", "--data", movie_path, "--workdir",
                str(tmp_path / "run"), "--workers", "2", "--epochs", "1000", stderr=f,
                start_new_session=True)
  try:
    assert _wait_for(lambda: "step 1/" in err.read_text() or proc.poll() is not None)
    below = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  text = err.read_text()
  assert proc.returncode == 130, text[-2000:]
  assert "Traceback" not in out + text and "KeyboardInterrupt" not in text, text[-3000:]
  assert "(interrupted; run again to resume)" in out
  assert _wait_for(lambda: not [p for p in below if running(p)], timeout=10)


def test_sigterm_during_train_saves_and_exits_143(tmp_path, movie_path):
  err = tmp_path / "stderr.txt"
  run = tmp_path / "run"
  with open(err, "w") as f:
    proc = _cli("train", "--config", "tiny", "--data", movie_path, "--workdir", str(run),
                "--epochs", "1000", stderr=f)
  try:
    assert _wait_for(lambda: "step 1/" in err.read_text() or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  text = err.read_text()
  assert proc.returncode == 143, text[-2000:]
  assert "Traceback" not in out + text
  assert "SIGTERM: stopping after this step and saving a checkpoint" in text
  step = int(out.split("step ")[1].split("/")[0])
  assert "(interrupted; run again to resume)" in out and step > 0
  assert load_model(str(run)).meta["step"] == step


def test_sigterm_during_stream_unwinds_and_exits_143(tmp_path, movie_path, trained_model):
  err = tmp_path / "stderr.txt"
  with open(err, "w") as f:
    proc = _cli("stream", "--model", trained_model, "--source", movie_path, "--output",
                str(tmp_path / "live.tif"), "--rate", "2", stderr=f)  # 20 s of frames
  try:
    assert _wait_for(lambda: "compiled" in err.read_text() or proc.poll() is not None)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  text = err.read_text()
  assert proc.returncode == 143, text[-2000:]
  assert "Traceback" not in out + text
  assert text.splitlines()[-1] == "terminated (SIGTERM)."
  assert not [line for line in text.splitlines() if line.startswith("error:")]


def test_sigterm_in_any_command_raises_terminated(tmp_path, monkeypatch, capsys):
  """In-process: a command that gets SIGTERM unwinds (its `finally` runs), prints one
  line and returns 143; the handler is the previous one again afterwards."""
  unwound = []

  def evaluate_files(*args, **kwargs):
    try:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)  # the handler raises before this ends
    finally:
      unwound.append(sys.exc_info()[0])

  monkeypatch.setattr(metrics, "evaluate_files", evaluate_files)
  before = signal.getsignal(signal.SIGTERM)
  code = cli.main(["deepcad-jax", "evaluate", "--denoised", "a.tif", "--reference",
                   "b.tif"])
  assert code == 143 and unwound == [Terminated]
  assert capsys.readouterr().err.strip().splitlines() == ["terminated (SIGTERM)."]
  assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------ checkpoints


def _steps(run) -> list[int]:
  folder = os.path.join(run, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(
      folder) else []


def _leftovers(run) -> list[str]:
  return [n for n in os.listdir(os.path.join(run, "checkpoints")) if "tmp" in n]


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs prlimit (Linux)")
@pytest.mark.slow
def test_a_failed_save_stops_training_at_once_in_one_sentence(tmp_path, movie_path, devices):
  """A real write failure: the run's file-size limit is lowered after its first
  checkpoint, so the next save fails inside Orbax's writer threads (EFBIG; ENOSPC takes
  the same path)."""
  run = str(tmp_path / "run")
  proc = _cli("train", "--config", "tiny", "--data", movie_path, "--workdir", run,
              "--pairs-per-epoch", "64", "--epochs", "1000", "--save-every", "0",
              stderr=subprocess.PIPE)
  try:
    assert _wait_for(lambda: _steps(run) or proc.poll() is not None, every=0.01)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1000, 1000))
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 2, err[-3000:]
  assert "Traceback" not in out + err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err[-3000:]
  noise = [line for line in err.splitlines() if not line.startswith(("I ", "step ", "error:"))]
  assert not noise, noise  # only our log and progress lines: no library's
  assert re.search(r"could not save the checkpoint of step 128 in \S+/run/checkpoints "
                   r"\(File too large\); training stopped, the last complete checkpoint "
                   r"is step 64", errors[0]), errors[0]
  assert _steps(run) == [64] and not _leftovers(run)
  assert not os.path.exists(os.path.join(run, LOCK_NAME))
  resumed = train(movie_path, run, _tiny(**{"data.pairs_per_epoch": 64, "train.epochs": 2}),
                  devices=devices[:1], progress=False)
  assert resumed.step == 128 and resumed.losses[0][0] == 65


def test_no_room_for_a_checkpoint_is_refused_before_writing(tmp_path, movie_path, devices,
                                                           monkeypatch):
  train_module = sys.modules["deepcad_jax.training.loop"]  # the package's `train` is the function
  real = train_module.shutil.disk_usage
  saves = []

  def disk_usage(path):
    usage = real(path)
    saves.append(path)
    return usage._replace(free=0) if len(saves) > 1 else usage  # full after one save

  monkeypatch.setattr(train_module.shutil, "disk_usage", disk_usage)
  run = str(tmp_path / "run")
  with pytest.raises(UserError, match=r"could not save the checkpoint of step 32 in \S+ "
                     r"\(no space left: it needs about \d+ MB and 0 MB are free\); training "
                     r"stopped, the last complete checkpoint is step 16"):
    train(movie_path, run, _tiny(**{"train.epochs": 3}), devices=devices[:1], progress=False)
  assert _steps(run) == [16] and not _leftovers(run)


@pytest.mark.slow
def test_save_every_keeps_the_latest_and_the_epoch_checkpoints(tmp_path, movie_path, devices):
  run = str(tmp_path / "run")
  seen = {}

  def look(step, loss):
    seen[step] = _steps(run)

  cfg = _tiny(**{"train.epochs": 3, "train.save_every": 1e-9, "train.keep_checkpoints": 1})
  train(movie_path, run, cfg, devices=devices[:1], progress=False, on_step=look)
  # The pace is measured over steps 2..4; from then on a save every step (1e-9 minutes).
  assert seen[4] == [] and seen[6] == [5] and seen[10] == [9]
  assert seen[20] == [16, 19] and seen[40] == [32, 39]  # the last epoch's, and the latest
  assert _steps(run) == [48]
  # 0 saves only at the end of each epoch.
  seen.clear()
  train(movie_path, run + "0", _tiny(**{"train.save_every": 0.0, "train.epochs": 2}),
        devices=devices[:1], progress=False, on_step=lambda s, _: seen.update(
            {s: _steps(run + "0")}))
  assert seen[15] == [] and seen[20] == [16] and _steps(run + "0") == [16, 32]


@pytest.mark.slow
def test_kill_9_mid_epoch_resumes_to_the_same_parameters(tmp_path, movie_path):
  """Every run in a process of its own (the same XLA set-up, so the same float
  rounding): uninterrupted; killed mid-epoch after a --save-every checkpoint; resumed."""
  args = ["train", "--config", "tiny", "--data", movie_path, "--pairs-per-epoch", "96",
          "--epochs", "1", "--workers", "2"]
  full, run = str(tmp_path / "full"), str(tmp_path / "run")
  assert _cli(*args, "--workdir", full, stderr=subprocess.DEVNULL).communicate()[0]
  proc = _cli(*args, "--workdir", run, "--save-every", "1e-6", stderr=subprocess.DEVNULL)
  try:
    assert _wait_for(lambda: any(s >= 8 for s in _steps(run)) or proc.poll() is not None,
                     every=0.01)
  finally:
    proc.kill()
    proc.wait()
    proc.stdout.close()
  killed_at = _steps(run)[-1]
  assert 8 <= killed_at < 96, killed_at  # mid-epoch
  resumed = _cli(*args, "--workdir", run, stderr=subprocess.PIPE)
  out, err = resumed.communicate()
  assert resumed.returncode == 0 and f"Resuming {run} from step {killed_at}" in err, err
  assert "step 96/96" in out
  for a, b in zip(jax.tree_util.tree_leaves(load_model(full).params),
                  jax.tree_util.tree_leaves(load_model(run).params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ progress


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_eta_leaves_compilation_out(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(progress_module.time, "perf_counter", clock)
  lines = io.StringIO()
  bar = Progress(1001, "step", stream=lines, every_s=0)
  bar.status(0, "compiling the training step...")
  clock.now = 600.0  # ten minutes of compiling, then the first step
  bar.restart(1)
  clock.now = 610.0
  bar.update(101)  # 100 steps in 10 s: 900 steps to go take 90 s
  assert lines.getvalue().splitlines() == [
      "step 0/1001  compiling the training step...",
      "step 101/1001  10.00/s  ETA 1m30s"]
  clock.now = 700.0
  other = Progress(101, "tiles", stream=lines, every_s=0)
  clock.now = 800.0
  other.exclude(60.0)  # the first call compiled for a minute: 1 tile in 40 s
  other.update(1)
  assert lines.getvalue().splitlines()[-1] == "tiles 1/101  0.03/s  ETA 1h06m40s"
  clock.now = 801.0
  other.exclude(99.5)  # most of that was compiling: 2 tiles in 1.5 s
  other.update(2)
  assert lines.getvalue().splitlines()[-1] == "tiles 2/101  1.33/s  ETA 1m14s"


def test_train_says_compiling_and_estimates_the_epoch(tmp_path, movie_path, devices, logs,
                                                       capsys, monkeypatch):
  monkeypatch.setattr(sys.modules["deepcad_jax.training.loop"], "LONG_CPU_EPOCH_S", 0.0)
  train(movie_path, str(tmp_path / "run"), _tiny(), devices=devices[:1])
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step")]
  assert err[0] == "step 0/16  compiling the training step..."
  assert err[1].startswith("step 1/16  epoch 1/1  loss ") and err[1].endswith("ETA ?")
  assert "Compiled the training step and ran it once in" in logs.text
  assert re.search(r"About \d+s per epoch \([\d.e-]+ s per step of 1 pair\(s\)\)", logs.text)
  assert re.search(r"On this CPU one epoch of 16 pairs with 8x16x16 patches takes about "
                   r"\d+s\. For a first try use --config demo .*--pairs-per-epoch \d+ takes "
                   r"about", logs.text), logs.text


def test_bench_reports_each_measurement_as_it_starts_and_ends(tmp_path, logs):
  code = cli.main(["deepcad-jax", "bench", "--workload", "reference", "--movie", "8,16,16",
                   "--patch", "8,16,16", "--repeats", "1", "--features", "4", "--output",
                   str(tmp_path / "b.json")])
  assert code == 0
  lines = [r.getMessage() for r in logs.records if r.getMessage().startswith("bench: ")]
  assert len(lines) == 4, lines
  assert lines[0] == ("bench: reference (overlap tiling of a 8x16x16 movie, f=4): "
                      "compiling and timing...")
  assert re.match(r"bench: reference done: median [\d.e-]+ s over 1 run\(s\), compile ",
                  lines[1]), lines[1]
  assert lines[2].startswith("bench: reference (exact tiling") and "done" in lines[3]


# ------------------------------------------------------------------ --help and --version


def _help_default(text: str, flag: str) -> str:
  match = re.search(rf"\n  --{flag}: .*?\(default: '([^']*)'\)", text, re.S)
  assert match, (flag, text)
  return match.group(1)


@pytest.mark.parametrize("args, expect", [
    ([], {"config": "deepcad_rt", "epochs": "10", "pairs-per-epoch": "4000",
          "patch": "144,144,144", "lr": "5e-05", "workers": "2", "save-every": "5.0"}),
    (["--config", "demo"], {"config": "demo", "epochs": "40", "pairs-per-epoch": "100",
                            "patch": "16,32,32", "lr": "0.001", "workers": "0"}),
    (["--config=tiny", "--epochs", "7"], {"config": "tiny", "epochs": "2", "features": "4"}),
])
def test_train_help_shows_the_defaults_of_the_config_in_use(args, expect, capsys):
  assert cli.main(["deepcad-jax", "train", *args, "--help"]) == 0
  text = capsys.readouterr().out
  assert f"Defaults shown are those of --config {expect['config']}" in text
  for flag, value in expect.items():
    assert _help_default(text, flag) == value, flag


def test_help_with_an_unknown_config_is_one_sentence(capsys):
  assert cli.main(["deepcad-jax", "train", "--config", "nope", "--help"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: unknown config 'nope'") and len(err.splitlines()) == 1


def test_version(capsys):
  assert cli.main(["deepcad-jax", "--version"]) == 0
  assert capsys.readouterr().out.strip() == (
      f"deepcad-jax {deepcad_jax.__version__} (jax {jax.__version__}, jaxlib "
      f"{jaxlib.__version__}, Python {platform.python_version()})")


def test_slow_commands_say_what_they_are_doing(tmp_path, trained_model, logs):
  """export and calibrate log what they start before their long silent steps."""
  assert cli.main(["deepcad-jax", "export", "--model", trained_model, "--format", "onnx",
                   "--output", str(tmp_path / "m.onnx")]) == 0
  assert "checking the ONNX graph against JAX with ONNX Runtime on a " in logs.text
  model = shutil.copytree(trained_model, tmp_path / "model")  # calibrate writes into it
  noisy, clean = noisy_movie((40, 24, 24))
  assert cli.main(["deepcad-jax", "calibrate", "--model", str(model), "--noisy",
                   write_tiff(tmp_path / "n.tif", noisy), "--clean",
                   write_tiff(tmp_path / "c.tif", clean), "--uncertainty", "2",
                   "--accept-uncorrelated"]) == 0
  assert re.search(r"calibrate: denoising \S+n\.tif \(40, 24, 24\) under 2 symmetries x 1 "
                   r"member\(s\)\.\.\.", logs.text), logs.text
