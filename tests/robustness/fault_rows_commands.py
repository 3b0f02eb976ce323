"""Fault-matrix rows: command flags, processes and signals, outputs and overwrites."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import numpy as np
import tifffile

from tests.helpers import damaged, noisy_movie, write_tiff
from tests.helpers.fault_matrix import Fault, Files
from tests.helpers.outputs_faults import exported_pth


# -- helpers of the rows --------------------------------------------------------------


def _model(files: Files, name: str = "model") -> str:
  """A copy of the row's model whose every file is a declared input (a model directory
  whose checkpoints are replaced keeps its listing: its files must not change)."""
  model = damaged.model_copy(files, name)
  for path in sorted(model.rglob("*")):
    if path.is_file():
      files.input(path)
  return str(model)


def _model_with_mean(files: Files, text: str) -> str:
  """A model whose stored mean reads `text` in its metadata (NaN, 1e400)."""
  model = damaged.model_copy(files)
  for meta in model.glob("checkpoints/*/meta/metadata"):
    edited = re.sub(r'"mean": [^,}]+', f'"mean": {text}', meta.read_text(), count=1)
    assert edited != meta.read_text()
    meta.write_text(edited)
  return files.input(model)


def _beside_own_std(files: Files) -> str:
  """An output `den.tif` whose `den_std.tif` is already there (the user's own file)."""
  files.raw("den_std.tif", b"the user's own file")
  return files.output(files.root / "den.tif")


def _config_file(files: Files, text: str) -> str:
  return files.raw("my_config.py", text.encode())


def _watched_folder(files: Files) -> str:
  """A watched folder whose fourth file changes frame size (then STOP)."""
  folder = files.root / "incoming"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    files.input(write_tiff(folder / f"a{i}.tif",
                           rng.poisson(50, (16, 24, 24)).astype(np.uint16)))
  files.input(write_tiff(folder / "b0.tif", rng.poisson(50, (16, 32, 32)).astype(np.uint16)))
  files.raw("incoming/STOP", b"")
  return str(folder)


def _raw_frames_kept(files: Files, code: int, out: str, err: str) -> None:
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert code == 2 and len(errors) == 1, err[-2000:]
  assert re.search(r"b0\.tif holds frames of 32x32 but the stream's frames are 24x24",
                   errors[0]), errors[0]
  raw = tifffile.imread(files.root / "live_raw.tif")
  assert raw.shape == (48, 24, 24)  # the three files acquired before it
  assert tifffile.imread(files.root / "live.tif").shape == (48, 24, 24)


def _folder_with_foreign_output(files: Files) -> str:
  """in/x.tif, and out/x.tif of the right shape and dtype that some other run made."""
  (files.root / "in").mkdir()
  files.movie("in/x.tif")
  (files.root / "out").mkdir()
  files.input(write_tiff(files.root / "out" / "x.tif",
                         noisy_movie((40, 24, 24), 5)[0].astype(np.float32)))
  return str(files.root / "in")


def _stale_bioimageio_folder(files: Files) -> list[str]:
  """A working folder that an export killed with SIGKILL left beside the output."""
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stale = files.root / f".bioimageio-{socket.gethostname()}-{dead.pid}-0badc0de"
  stale.mkdir()
  (stale / "deepcad_rt.onnx").write_bytes(b"x" * 1000)
  return []


def _stale_folder_removed(files: Files, code: int, out: str, err: str) -> None:
  assert code == 0, err[-2000:]
  assert (files.root / "model.zip").is_file()
  assert not [n for n in os.listdir(files.root) if n.startswith(".bioimageio-")]


def _notes(files: Files) -> str:
  return files.raw("notes.txt", b"my notes\n")


def _simulate(flag: str, value: str, expect: str) -> Fault:
  return Fault(f"simulate: {flag} {value}", "simulate",
               lambda f: ["--shape", "8,16,16", flag, value,
                          "--output", f.output(f.root / "sim")], expect)


SIMULATE_ROWS = [
    _simulate("--snr", "nan", r"--snr must be a finite number at most 100; got nan"),
    _simulate("--snr", "inf", r"--snr must be a finite number at most 100; got inf"),
    _simulate("--snr", "1000", r"--snr must be a finite number at most 100"),
    _simulate("--neurons", "0", r"--neurons must be a whole number at least 1; got 0"),
    _simulate("--neurons", "-1", r"--neurons must be a whole number at least 1; got -1"),
    _simulate("--frame-rate", "0", r"--frame-rate must be a finite number above 0"),
    _simulate("--frame-rate", "nan", r"--frame-rate must be a finite number above 0"),
    _simulate("--spike-rate", "inf", r"--spike-rate must be a finite number at least 0 "
              r"and below 30"),
    _simulate("--spike-rate", "-1", r"--spike-rate must be a finite number at least 0"),
    _simulate("--spike-rate", "29", r"--spike-rate 29 and --neuropil-coupling 0\.5 the "
              r"simulated neuropil becomes negative"),
    _simulate("--vessels", "-3", r"--vessels must be a whole number at least 0; got -3"),
    _simulate("--read-noise", "-1", r"--read-noise must be a finite number at least 0"),
    _simulate("--read-noise", "inf", r"--read-noise must be a finite number at least 0"),
    _simulate("--seed", "-1", r"--seed must be a whole number at least 0 and at most "
              r"4294967295; got -1"),
]


ROWS: list[Fault] = [
    # -- an output is never an input, --overwrite or not -------------------------------
    Fault("evaluate: --output exists (no --overwrite)", "evaluate",
          lambda f: ["--denoised", f.movie("a.tif"), "--reference", f.movie("b.tif", seed=1),
                     "--output", _notes(f)], r"notes\.txt already exists; add --overwrite"),
    Fault("evaluate: --output is its own --denoised", "evaluate",
          lambda f: ["--denoised", f.movie("a.tif"), "--reference", f.movie("b.tif", seed=1),
                     "--output", str(f.root / "a.tif"), "--overwrite"],
          r"--output .*a\.tif is the input --denoised .*a\.tif"),
    Fault("evaluate: --output is its --reference (another spelling)", "evaluate",
          lambda f: ["--denoised", f.movie("a.tif"), "--reference", f.movie("b.tif", seed=1),
                     "--output", str(f.root / "." / "b.tif"), "--overwrite"],
          r"is the input --reference .*b\.tif"),
    Fault("prune: --output is the --model", "prune",
          lambda f: ["--model", _model(f), "--keep", "0.5", "--output",
                     str(f.root / "model"), "--overwrite"],
          r"--output .*model is the input --model .*model; choose another --output"),
    Fault("train: --init-from X --workdir X --fresh", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--init-from", _model(f),
                     "--workdir", str(f.root / "model"), "--fresh"],
          r"--workdir .*model is the input --init-from .*model"),
    Fault("convert: --output is the --pth", "convert",
          lambda f: ["--pth", exported_pth(f), "--output", str(f.root / "model.pth"),
                     "--overwrite"], r"--output .*model\.pth is the input --pth"),
    Fault("export: --output inside the model's checkpoints", "export",
          lambda f: ["--model", _model(f), "--format", "pth", "--output",
                     str(f.root / "model" / "checkpoints" / "m.pth")],
          r"m\.pth is inside the input --model .*model"),
    Fault("stream: --output is the --source", "stream",
          lambda f: ["--model", f.model, "--source", f.movie(), "--rate", "0",
                     "--output", str(f.root / "movie.tif"), "--overwrite"],
          r"--output .*movie\.tif is the input --source"),
    Fault("stream: its raw output is the --source", "stream",
          lambda f: ["--model", f.model, "--source", f.movie("live_raw.tif"), "--rate", "0",
                     "--output", str(f.root / "live.tif"), "--overwrite"],
          r"live_raw\.tif is the input --source"),
    Fault("score: --json is the --movie", "score",
          lambda f: ["--model", f.model, "--movie", f.movie(), "--json",
                     str(f.root / "movie.tif"), "--overwrite"],
          r"--json .*movie\.tif is the input --movie"),
    Fault("events: an output is the --raw movie", "events",
          lambda f: ["--raw", f.movie("z_map.tif"), "--denoised", f.movie("den.tif", seed=1),
                     "--output", str(f.root), "--overwrite"],
          r"z_map\.tif is the input --raw"),
    Fault("traces: an output is the --rois file", "traces",
          lambda f: ["--rois", f.raw("traces.json", b"[]"), "--movie", f.movie(),
                     "--output", str(f.root), "--overwrite"],
          r"traces\.json is the input --rois"),

    # -- models whose stored numbers are not finite -------------------------------------
    Fault("denoise: a model whose stored mean is NaN", "denoise",
          lambda f: ["--model", _model_with_mean(f, "NaN"), "--input", f.movie(),
                     "--output", f.output(f.root / "den.tif")],
          r"model: the metadata of checkpoint \d+ is invalid .*stored mean is nan, not a "
          r"finite number"),
    Fault("stream: a model whose stored mean is 1e400", "stream",
          lambda f: ["--model", _model_with_mean(f, "1e400"), "--source", f.movie(),
                     "--rate", "0", "--output", f.output(f.root / "live.tif")],
          r"model: the metadata of checkpoint \d+ is invalid .*stored mean is inf"),
    Fault("train: --scale inf", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--normalise", "fixed",
                     "--scale", "inf", "--workdir", f.output(f.root / "run")],
          r"data\.scale must be positive and finite; got inf"),

    # -- numbers given on the command line ----------------------------------------------
    Fault("train: --seed -1 (no workdir left)", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--seed", "-1",
                     "--workdir", f.output(f.root / "run")],
          r"--seed\) must be a whole number at least 0 and at most 4294967295; got -1"),
    Fault("train: --seed 1e23", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--seed", "1e23",
                     "--workdir", f.output(f.root / "run")], r"--seed=1e23"),
    Fault("train: --seed 2^32", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--seed", "4294967296",
                     "--workdir", f.output(f.root / "run")],
          r"--seed\) must be a whole number .* got 4294967296"),
    Fault("train: --lr inf (no workdir left)", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--lr", "inf",
                     "--workdir", f.output(f.root / "run")],
          r"--lr\) must be a finite number above 0; got inf"),
    Fault("train: --lr 0", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--lr", "0",
                     "--workdir", f.output(f.root / "run")],
          r"--lr\) must be a finite number above 0; got 0"),
    Fault("train: --lr -0.001", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--lr", "-0.001",
                     "--workdir", f.output(f.root / "run")],
          r"--lr\) must be a finite number above 0"),
    Fault("train: a loss that becomes NaN leaves no empty workdir", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--lr", "1e30",
                     "--workers", "0", "--workdir", f.output(f.root / "run")],
          r"the loss became nan at step \d+; lower --lr"),
    Fault("prune: --criterion taylor --batches 0", "prune",
          lambda f: ["--model", f.model, "--keep", "0.5", "--criterion", "taylor",
                     "--data", f.movie(), "--batches", "0", "--output",
                     f.output(f.root / "pruned")],
          r"--batches must be a whole number at least 1; got 0"),
    Fault("prune: --criterion taylor --batches -1", "prune",
          lambda f: ["--model", f.model, "--keep", "0.5", "--criterion", "taylor",
                     "--data", f.movie(), "--batches", "-1", "--output",
                     f.output(f.root / "pruned")],
          r"--batches must be a whole number at least 1; got -1"),
    Fault("events: --threshold nan", "events",
          lambda f: ["--raw", f.movie(), "--denoised", f.movie("den.tif", seed=1),
                     "--threshold", "nan", "--output", f.output(f.root / "check")],
          r"--threshold must be a finite number above 0; got nan"),
    Fault("events: --box 0,0,0", "events",
          lambda f: ["--raw", f.movie(), "--denoised", f.movie("den.tif", seed=1),
                     "--box", "0,0,0", "--output", f.output(f.root / "check")],
          r"--box \(T\) must be a whole number at least 1; got 0"),
    Fault("events: --box -1,5,5", "events",
          lambda f: ["--raw", f.movie(), "--denoised", f.movie("den.tif", seed=1),
                     "--box", "-1,5,5", "--output", f.output(f.root / "check")],
          r"--box \(T\) must be a whole number at least 1; got -1"),
    Fault("stream: --rate -1", "stream",
          lambda f: ["--model", f.model, "--source", f.movie(), "--rate", "-1",
                     "--output", f.output(f.root / "live.tif")],
          r"--rate must be a finite number at least 0; got -1"),
    Fault("stream: --rate nan", "stream",
          lambda f: ["--model", f.model, "--source", f.movie(), "--rate", "nan",
                     "--output", f.output(f.root / "live.tif")],
          r"--rate must be a finite number at least 0; got nan"),
    Fault("calibrate: --uncertainty 0", "calibrate",
          lambda f: ["--model", _model(f), "--noisy", f.movie(), "--clean",
                     f.movie("clean.tif", seed=1), "--uncertainty", "0"],
          r"--uncertainty must be a whole number at least 1 and at most 8; got 0"),
    Fault("export: --mean nan", "export",
          lambda f: ["--model", f.model, "--format", "bioimageio", "--mean", "nan",
                     "--output", f.output(f.root / "model.zip")],
          r"--mean must be a finite number; got nan"),
    *SIMULATE_ROWS,
    Fault("bench: --movie 0,0,0", "bench",
          lambda f: ["--movie", "0,0,0", "--notorch", "--output",
                     f.output(f.root / "bench.json")],
          r"--movie \(T\) must be a whole number at least 8; got 0"),
    Fault("bench: --features 100000 (memory, before running)", "bench",
          lambda f: ["--features", "100000", "--notorch", "--output",
                     f.output(f.root / "bench.json")],
          r"the network with f=100000 on patch \(16, 32, 32\) needs at least [\d.]+ [TPGE]B"),
    Fault("bench: --movie 100000,100000,100000 (memory, before running)", "bench",
          lambda f: ["--movie", "100000,100000,100000", "--notorch", "--output",
                     f.output(f.root / "bench.json")],
          r"benchmarking a movie of shape \(100000, 100000, 100000\) needs at least 10 PB"),
    Fault("bench: --output an existing file that is not JSON (before running)", "bench",
          lambda f: ["--notorch", "--output", _notes(f)],
          r"notes\.txt exists and is not a JSON list of benchmark records"),
    Fault("denoise: --batch-size 100000 (memory, before running)", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--batch-size", "100000",
                     "--output", f.output(f.root / "den.tif")],
          r"--batch-size 100000: .* tiles of .* per device and call need about .*, over "
          r"the memory budget"),
    Fault("denoise: --brightness not one of regional, model", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--brightness", "local",
                     "--output", f.output(f.root / "den.tif")],
          r"--brightness=local: value should be one of <regional\|model>"),
    Fault("denoise: --uncertainty calibrated --draws 1 (before denoising)", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--uncertainty",
                     "calibrated", "--draws", "1", "--output", f.output(f.root / "den.tif")],
          r"--draws takes at least 2 bootstrap draws; got 1"),
    Fault("denoise: --uncertainty calibrated --bias-probes -1 (before denoising)", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--uncertainty",
                     "calibrated", "--bias-probes", "-1", "--output",
                     f.output(f.root / "den.tif")],
          r"--bias-probes takes 0 or more network passes; got -1"),
    Fault("denoise: --uncertainty calibrated on a movie of 5 frames (before denoising)",
          "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(shape=(5, 24, 24)),
                     "--uncertainty", "calibrated", "--output", f.output(f.root / "den.tif")],
          r"movie\.tif: calibrated uncertainty needs at least 12 frames for its held-out "
          r"check; got 5; leave --uncertainty out for this movie"),
    Fault("denoise: --uncertainty calibrated beside an existing *_std.tif (before denoising)",
          "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--uncertainty", "calibrated",
                     "--output", _beside_own_std(f)],
          r"den_std\.tif already exists; add --overwrite to replace it"),

    # -- config files, folders, watched folders, working folders ------------------------
    Fault("train: --config file without get_config", "train",
          lambda f: ["--config", _config_file(f, "X = 1\n"), "--data", f.movie(),
                     "--workdir", f.output(f.root / "run")],
          r"config file .*my_config\.py defines no get_config\(\)"),
    Fault("train: --config file that does not run", "train",
          lambda f: ["--config", _config_file(f, "def get_config(:\n"), "--data", f.movie(),
                     "--workdir", f.output(f.root / "run")],
          r"config file .*my_config\.py could not be run \(SyntaxError"),
    Fault("ladder: --clean of another shape, before any rung is trained", "ladder",
          lambda f: ["--data", f.movie(), "--clean", f.movie("clean.tif", (30, 24, 24)),
                     "--config", "tiny", "--widths", "4", "--nomeasure", "--holdout", "24:40",
                     "--workdir", f.output(f.root / "ladder")],
          r"--clean .*clean\.tif \(30, 24, 24\) and .*movie\.tif \(40, 24, 24\) differ"),
    Fault("denoise: folder output of the same name made from another input", "denoise",
          lambda f: ["--model", f.model, "--input", _folder_with_foreign_output(f),
                     "--output", str(f.root / "out")],
          r"out/x\.tif already exists but is not a complete output of .*in/x\.tif "
          r"\(nothing records what it was made from\)"),
    Fault("stream: a watched file changes frame size", "stream",
          lambda f: ["--model", f.model, "--source", _watched_folder(f), "--idle-timeout",
                     "5", "--output", str(f.root / "live.tif")], "",
          check=_raw_frames_kept),
    Fault("export: a working folder left by a killed export is removed", "export",
          lambda f: ["--model", f.model, "--format", "bioimageio", "--mean", "50",
                     "--output", str(f.root / "model.zip")] + _stale_bioimageio_folder(f),
          "", check=_stale_folder_removed),
]
