import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import noisy_movie, write_tiff
from deepcad_jax import cli
from deepcad_jax.data import open_movie


def run(capsys, *args):
  code = cli.main(["deepcad-jax", *args])
  out, err = capsys.readouterr()
  assert "Traceback" not in err
  return code, out, err


def test_help_lists_commands(capsys):
  code, out, _ = run(capsys, "--help")
  assert code == 0
  for name in ("demo", "train", "denoise", "simulate", "evaluate"):
    assert f"  {name} " in out
  code, out, _ = run(capsys, "train", "--help")
  assert code == 0 and "--pairs-per-epoch" in out and "--workdir" in out


def test_console_script_runs_in_a_fresh_process():
  proc = subprocess.run([sys.executable, "-m", "deepcad_jax", "--help"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "usage: deepcad-jax COMMAND" in proc.stdout


def test_train_then_denoise_end_to_end(capsys, tmp_path):
  movie, _ = noisy_movie((40, 24, 24))
  data = tmp_path / "data"
  data.mkdir()
  write_tiff(data / "a.tif", movie)
  write_tiff(data / "b.tif", movie[::-1].copy())
  run_dir = str(tmp_path / "run")
  code, out, err = run(capsys, "train", "--config", "tiny", "--data", str(data),
                       "--workdir", run_dir, "--epochs", "1", "--pairs-per-epoch", "8",
                       "--batch-size", "4", "--seed", "3")
  assert code == 0, err
  assert "step 2/2" in out
  assert "epoch 1/1" in err and "loss" in err and "ETA" in err
  output = str(tmp_path / "den.tif")
  code, out, err = run(capsys, "denoise", "--model", run_dir, "--input",
                       str(data / "a.tif"), "--output", output, "--overlap", "0.5",
                       "--batch-size", "4")
  assert code == 0, err
  assert "voxels/s" in out and "patches" in err
  den = open_movie(output)
  assert den.shape == (40, 24, 24) and den.dtype == np.float32  # the network's precision
  code, _, err = run(capsys, "denoise", "--model", run_dir, "--input", str(data / "a.tif"),
                     "--output", output)
  assert code == 2 and "already exists; add --overwrite" in err
  code, _, err = run(capsys, "denoise", "--model", run_dir, "--input", str(data),
                     "--output", str(tmp_path / "den_dir"), "--output-dtype", "float32",
                     "--blend")
  assert code == 0, err
  assert open_movie(str(tmp_path / "den_dir" / "b.tif")).dtype == np.float32


@pytest.fixture
def bad_inputs(tmp_path):
  ok = np.random.default_rng(0).poisson(50, (40, 24, 24)).astype(np.uint16)
  nan = ok.astype(np.float32)
  nan[3, 1, 1] = np.nan
  return {
      "missing": str(tmp_path / "nope.tif"),
      "not_tiff": (tmp_path / "movie.avi").write_bytes(b"RIFF") and str(tmp_path / "movie.avi"),
      "image": write_tiff(tmp_path / "img.tif", ok[0]),
      "short": write_tiff(tmp_path / "short.tif", ok[:12]),
      "nan": write_tiff(tmp_path / "nan.tif", nan),
      "ok": write_tiff(tmp_path / "ok.tif", ok),
  }


@pytest.mark.parametrize("case,extra,message", [
    ("missing", [], r"nope.tif does not exist"),
    ("not_tiff", [], r"movie.avi is not a TIFF file"),
    ("image", [], r"img.tif is a single 2-D image of shape \(24, 24\)"),
    ("short", [], r"short.tif \(12, 24, 24\) has 12 frames; training needs at least 16"),
    ("nan", [], r"nan.tif \(40, 24, 24\) contains NaN"),
    ("ok", ["--patch", "8,12,16"], r"--patch|patch must be three positive multiples of 8"),
    ("ok", ["--patch", "8,16"], r"--patch takes three integers"),
    ("ok", ["--bogus", "1"], r"Unknown command line flag 'bogus'"),
    ("ok", ["--config", "nope"], r"unknown config 'nope'"),
    ("ok", ["--config", "ladder:5"], r"ladder needs a width"),
])
def test_bad_input_gets_one_clear_sentence(capsys, tmp_path, bad_inputs, case, extra,
                                           message):
  code, out, err = run(capsys, "train", "--config", "tiny", "--data", bad_inputs[case],
                       "--workdir", str(tmp_path / "run"), *extra)
  assert code == 2
  lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1, err
  assert __import__("re").search(message, lines[0]), lines[0]


def test_missing_flags_and_unknown_command(capsys):
  code, _, err = run(capsys, "train", "--config", "tiny")
  assert code == 2 and "missing required flag(s): --data, --workdir" in err
  code, _, err = run(capsys, "fly")
  assert code == 2 and "unknown command 'fly'" in err
  code, _, err = run(capsys, "denoise", "--model", "/nonexistent", "--input", "x.tif",
                     "--output", "y.tif")
  assert code == 2 and "/nonexistent is not a model directory" in err


def test_simulate_and_evaluate(capsys, tmp_path):
  sim = str(tmp_path / "sim")
  code, out, err = run(capsys, "simulate", "--output", sim, "--shape", "30,32,32",
                       "--snr", "3", "--seed", "1")
  assert code == 0, err
  assert "SNR 3.0" in out or "SNR 2.9" in out
  code, _, err = run(capsys, "simulate", "--output", sim, "--shape", "30,32,32")
  assert code == 2 and "already exists" in err
  results = str(tmp_path / "scores.json")
  code, out, err = run(capsys, "evaluate", "--denoised", f"{sim}/noisy.tif", "--reference",
                       f"{sim}/clean.tif", "--output", results)
  assert code == 0, err
  assert "SNR dB" in out and "r(x-t)" in out
  with open(results) as f:
    scores = json.load(f)
  assert abs(scores["denoised"]["snr_db"] - 3.0) < 0.5
  info = json.load(open(f"{sim}/info.json"))
  assert info["params"]["seed"] == 1


def test_demo_quick_improves_snr(capsys, tmp_path):
  workdir = str(tmp_path / "demo")
  code, out, err = run(capsys, "demo", "--quick", "--workdir", workdir)
  assert code == 0, err
  summary = json.load(open(os.path.join(workdir, "results.json")))
  assert summary["output_snr_db"] > summary["input_snr_db"] + 3  # measured: -2.0 -> 6.3
  assert "SNR -" in out and "denoised" in out and os.path.exists(
      summary["files"]["denoised"])
  code, _, err = run(capsys, "demo", "--quick", "--workdir", workdir)
  assert code == 2 and "--overwrite" in err
