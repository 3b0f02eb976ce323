"""The fault matrix: every command that takes a file, against bad inputs and faults.

Each row of `FAULTS` names a command, builds its inputs in a fresh folder and says which
sentence the user must get. For every row the harness checks:
- the exit status (2 unless the row says otherwise);
- exactly one line on stderr starts with `error:`, and it matches the row's pattern
  (which names the file);
- no traceback on stdout or stderr;
- every input is byte-identical afterwards;
- no file exists under a final output name, and no temporary file is left beside it.

Rows run in this process (fast) unless `process=True` (signals, kills and concurrent
runs need a real process). `test_fault_matrix_size` reports how many rows there are.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import damaged
from tests.helpers import noisy_movie, write_tiff
from deepcad_jax import cli
from tests.helpers.outputs_faults import (READ_ONLY, also, disk_full, exported_pth, folder_named,
                            held_lock, little_space, movie_folder, read_only_fs,
                            readonly_folder, rois_json)
from tests.helpers.processes import hold_lock, workdir_with_a_checkpoints_file
from tests.helpers.fault_matrix import Fault, Files
from tests.robustness import fault_rows_commands, fault_rows_data


def _truncated_tiff(files: Files, name="cut.tif") -> str:
  path = write_tiff(files.root / "whole.tif", noisy_movie((40, 24, 24))[0])
  data = Path(path).read_bytes()
  os.remove(path)
  return files.raw(name, data[:len(data) // 2])


FAULTS: list[Fault] = [
    # -- inputs that are not movies ------------------------------------------------
    Fault("train: missing file", "train",
          lambda f: ["--config", "tiny", "--data", str(f.root / "nope.tif"),
                     "--workdir", f.output(f.root / "run")], r"nope\.tif does not exist"),
    Fault("train: not a TIFF", "train",
          lambda f: ["--config", "tiny", "--data", f.raw("movie.avi", b"RIFF...."),
                     "--workdir", f.output(f.root / "run")], r"movie\.avi is not a TIFF"),
    Fault("train: a 2-D image", "train",
          lambda f: ["--config", "tiny", "--data", f.input(write_tiff(
              f.root / "img.tif", noisy_movie((1, 24, 24))[0][0])),
                     "--workdir", f.output(f.root / "run")], r"img\.tif is a single 2-D"),
    Fault("denoise: missing input", "denoise",
          lambda f: ["--model", f.model, "--input", str(f.root / "nope.tif"),
                     "--output", f.output(f.root / "den.tif")], r"nope\.tif does not exist"),
    Fault("denoise: not a model", "denoise",
          lambda f: ["--model", str(f.root / "nomodel"), "--input", f.movie(),
                     "--output", f.output(f.root / "den.tif")],
          r"nomodel is not a model directory"),
    Fault("denoise: output is the input", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--output",
                     str(f.root / "movie.tif"), "--overwrite"], r"movie\.tif is the input"),
    Fault("denoise: output exists", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--output",
                     f.raw("den.tif", b"keep me")], r"den\.tif already exists"),
    Fault("denoise: output names no format it writes", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--output",
                     f.output(f.root / "den.png")],
          r"den\.png: cannot tell which format to write from its name; end it in \.tif"),
    Fault("evaluate: shapes differ", "evaluate",
          lambda f: ["--denoised", f.movie("a.tif", (40, 24, 24)), "--reference",
                     f.movie("b.tif", (30, 24, 24))], r"a\.tif|b\.tif"),
    Fault("convert: not a .pth", "convert",
          lambda f: ["--pth", f.raw("model.pth", b"not a zip"), "--output",
                     f.output(f.root / "conv")], r"model\.pth is not a PyTorch checkpoint"),
    Fault("stream: missing source", "stream",
          lambda f: ["--model", f.model, "--source", str(f.root / "nope.tif"),
                     "--output", f.output(f.root / "live.tif")], r"nope\.tif does not exist"),
    # -- outputs: writing, disks, metadata, precision ---------------------------------
    Fault("denoise: output folder read-only (chmod)", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--output",
                     f.output(readonly_folder(f) / "den.tif")],
          r"den\.tif could not be written: permission denied"),
    Fault("denoise: read-only file system", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--output",
                     f.output(f.root / READ_ONLY / "den.tif")],
          r"den\.tif could not be written: .* read-only file system", patch=read_only_fs),
    Fault("denoise: disk full while writing", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--output",
                     f.output(f.root / "den.tif")],
          r"den\.tif could not be written: the disk is full", patch=disk_full),
    Fault("denoise: disk full while writing the std", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--uncertainty", "2",
                     "--output-dtype", "input", "--output", f.output(f.root / "den.tif")]
          + also(f, f.root / "den_std.tif"),
          r"den(_std)?\.tif could not be written: the disk is full",
          patch=lambda mp, f: disk_full(mp, f, room=40 * 24 * 24 * 2 + 30000)),
    Fault("denoise: not enough free space", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--output",
                     f.output(f.root / "den.tif")],
          r"den\.tif \(with 1 other file\) needs 3\d\d kB but only 1 kB is free",
          patch=little_space),  # the other: its float32 frames (brightness correction)
    Fault("denoise: output written by another run", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--output",
                     f.output(held_lock(f, f.root / "den.tif"))],
          r"den\.tif is being written by another run \(PID \d+\)"),
    Fault("denoise: std output name is a folder", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--uncertainty", "2",
                     "--overwrite", "--output", f.output(f.root / "den.tif")]
          + folder_named(f, "den_std.tif"), r"den_std\.tif is a folder"),
    Fault("denoise: output under a file", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--output",
                     f.output(Path(f.raw("notes.txt", b"notes")) / "den.tif")],
          r"den\.tif cannot be written: .*notes\.txt is a file"),
    Fault("denoise: folder input, output is a file", "denoise",
          lambda f: ["--model", f.model, "--input", movie_folder(f), "--output",
                     f.raw("den.tif", b"keep me")],
          r"den\.tif is a file"),
    Fault("simulate: read-only file system", "simulate",
          lambda f: ["--shape", "8,16,16", "--output", str(f.root / READ_ONLY / "sim")]
          + also(f, *(f.root / READ_ONLY / "sim" / n
                      for n in ("noisy.tif", "clean.tif", "info.json"))),
          r"noisy\.tif could not be written: .* read-only file system", patch=read_only_fs),
    Fault("simulate: disk full while writing", "simulate",
          lambda f: ["--shape", "8,16,16", "--output", str(f.root / "sim")]
          + also(f, *(f.root / "sim" / n for n in ("noisy.tif", "clean.tif", "info.json"))),
          r"(noisy|clean)\.tif could not be written: the disk is full", patch=disk_full),
    Fault("stream: read-only file system", "stream",
          lambda f: ["--model", f.model, "--source", f.movie(), "--rate", "0",
                     "--output", f.output(f.root / READ_ONLY / "live.tif")]
          + also(f, f.root / READ_ONLY / "live_raw.tif"),
          r"live(_raw)?\.tif could not be written: .* read-only file system",
          patch=read_only_fs),
    Fault("stream: truncated source", "stream",
          lambda f: ["--model", f.model, "--source", _truncated_tiff(f), "--rate", "0",
                     "--output", f.output(f.root / "live.tif")]
          + also(f, f.root / "live_raw.tif"), r"cut\.tif"),
    Fault("stream: output written by another run", "stream",
          lambda f: ["--model", f.model, "--source", f.movie(), "--rate", "0",
                     "--output", f.output(held_lock(f, f.root / "live.tif"))]
          + also(f, f.root / "live_raw.tif"),
          r"live\.tif is being written by another run \(PID \d+\)"),
    Fault("stream: disk full while writing", "stream",
          lambda f: ["--model", f.model, "--source", f.movie(), "--rate", "0",
                     "--output", f.output(f.root / "live.tif")]
          + also(f, f.root / "live_raw.tif"),
          r"live(_raw)?\.tif could not be written: the disk is full", patch=disk_full),
    Fault("convert: read-only file system", "convert",
          lambda f: ["--pth", exported_pth(f), "--output",
                     f.output(f.root / READ_ONLY / "conv")],
          r"conv could not be written: .* read-only file system", patch=read_only_fs),
    Fault("traces: read-only file system", "traces",
          lambda f: ["--rois", rois_json(f), "--movie", f.movie(), "--output",
                     str(f.root / READ_ONLY / "tr")]
          + also(f, *(f.root / READ_ONLY / "tr" / n
                      for n in ("traces.csv", "traces.json", "traces.png"))),
          r"traces\.csv could not be written: .* read-only file system", patch=read_only_fs),
    Fault("export: read-only file system", "export",
          lambda f: ["--model", f.model, "--format", "pth", "--output",
                     f.output(f.root / READ_ONLY / "model.pth")]
          + also(f, f.root / READ_ONLY / "para.yaml"),
          r"model\.pth could not be written: .* read-only file system", patch=read_only_fs),
    Fault("events: read-only file system", "events",
          lambda f: ["--raw", f.movie(), "--denoised", f.movie("den.tif", seed=1),
                     "--output", str(f.root / READ_ONLY / "check")]
          + also(f, *(f.root / READ_ONLY / "check" / n
                      for n in ("z_map.tif", "events.csv", "events.json"))),
          r"z_map\.tif could not be written: .* read-only file system", patch=read_only_fs),
    Fault("events: disk full while writing", "events",
          lambda f: ["--raw", f.movie(), "--denoised", f.movie("den.tif", seed=1),
                     "--output", str(f.root / "check")]
          + also(f, *(f.root / "check" / n
                      for n in ("z_map.tif", "events.csv", "events.json"))),
          r"z_map\.tif could not be written: the disk is full",
          patch=lambda mp, f: disk_full(mp, f, room=1000)),
    Fault("evaluate: read-only file system", "evaluate",
          lambda f: ["--denoised", f.movie("a.tif"), "--reference", f.movie("b.tif", seed=1),
                     "--output", f.output(f.root / READ_ONLY / "scores.json")],
          r"scores\.json could not be written: .* read-only file system",
          patch=read_only_fs),

    # -- inputs: damaged files, odd TIFFs, honest numbers -----------------------------
    Fault("train: truncated TIFF", "train",
          lambda f: ["--config", "tiny", "--data", damaged.truncated(f),
                     "--workdir", f.output(f.root / "run")], r"cut\.tif is damaged or truncated"),
    Fault("train: truncated compressed TIFF", "train",
          lambda f: ["--config", "tiny", "--data", damaged.truncated(f, compression="zlib"),
                     "--workdir", f.output(f.root / "run")], r"cut\.tif is damaged or truncated"),
    Fault("train: cut inside the last frame", "train",
          lambda f: ["--config", "tiny", "--data", damaged.truncated(f, keep=0.995),
                     "--workdir", f.output(f.root / "run")], r"cut\.tif is (damaged|truncated)"),
    Fault("train: one truncated file in a folder", "train",
          lambda f: ["--config", "tiny", "--data", damaged.folder_with_cut_file(f),
                     "--workdir", f.output(f.root / "run")], r"b\.tif is damaged or truncated"),
    Fault("train: damaged page (read-time)", "train",
          lambda f: ["--config", "tiny", "--data", damaged.corrupt_page(f),
                     "--workdir", f.output(f.root / "run")],
          r"bad\.tif: frames .* could not be read"),
    Fault("train: metadata claims more frames", "train",
          lambda f: ["--config", "tiny", "--data", damaged.claims_more_frames(f),
                     "--workdir", f.output(f.root / "run")], r"short\.tif is truncated"),
    Fault("train: ImageJ metadata with fewer frames than pages", "train",
          lambda f: ["--config", "tiny", "--data", damaged.wrong_page_count(f),
                     "--workdir", f.output(f.root / "run")],
          r"ij\.tif holds 40 pages but its metadata describes 20"),
    Fault("train: RGB image", "train",
          lambda f: ["--config", "tiny", "--data", damaged.rgb(f),
                     "--workdir", f.output(f.root / "run")], r"rgb\.tif is a colour image"),
    Fault("train: two series", "train",
          lambda f: ["--config", "tiny", "--data", damaged.two_series(f),
                     "--workdir", f.output(f.root / "run")], r"two\.tif holds 2 image series"),
    Fault("train: zero frames", "train",
          lambda f: ["--config", "tiny", "--data", damaged.zero_frames(f),
                     "--workdir", f.output(f.root / "run")], r"zero\.tif holds no frames"),
    Fault("train: empty file", "train",
          lambda f: ["--config", "tiny", "--data", damaged.empty(f),
                     "--workdir", f.output(f.root / "run")], r"empty\.tif is empty \(0 bytes\)"),
    Fault("denoise: truncated TIFF", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.truncated(f),
                     "--output", f.output(f.root / "den.tif")], r"cut\.tif is damaged or truncated"),
    Fault("denoise: damaged page (read-time)", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.corrupt_page(f),
                     "--output", f.output(f.root / "den.tif")],
          r"bad\.tif: frames .* could not be read"),
    Fault("denoise: RGB image", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.rgb(f),
                     "--output", f.output(f.root / "den.tif")], r"rgb\.tif is a colour image"),
    Fault("denoise: two series", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.two_series(f),
                     "--output", f.output(f.root / "den.tif")], r"two\.tif holds 2 image series"),
    Fault("denoise: empty file", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.empty(f),
                     "--output", f.output(f.root / "den.tif")], r"empty\.tif is empty"),
    Fault("denoise: zero frames", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.zero_frames(f),
                     "--output", f.output(f.root / "den.tif")], r"zero\.tif holds no frames"),
    Fault("stream: truncated source", "stream",
          lambda f: ["--model", f.model, "--source", damaged.truncated(f), "--rate", "0",
                     "--output", f.output(f.root / "live.tif")],
          r"cut\.tif is damaged or truncated"),
    Fault("stream: damaged --mean-image", "stream",
          lambda f: ["--model", f.model, "--source", f.movie(), "--rate", "0",
                     "--mean-image", damaged.truncated(f, "mean.tif"),
                     "--output", f.output(f.root / "live.tif")],
          r"mean\.tif is damaged or truncated"),
    Fault("events: truncated raw", "events",
          lambda f: ["--raw", damaged.truncated(f), "--denoised", f.movie(),
                     "--output", f.output(f.root / "check")], r"cut\.tif is damaged or truncated"),
    Fault("events: a folder as --denoised", "events",
          lambda f: ["--raw", f.movie(), "--denoised", damaged.folder(f),
                     "--output", f.output(f.root / "check")], r"folder\.tif is a folder"),
    Fault("calibrate: truncated noisy movie", "calibrate",
          lambda f: ["--model", str(damaged.model_copy(f)), "--noisy", damaged.truncated(f),
                     "--clean", f.movie()], r"cut\.tif is damaged or truncated"),
    Fault("calibrate: RGB ground truth", "calibrate",
          lambda f: ["--model", str(damaged.model_copy(f)), "--noisy", f.movie(),
                     "--clean", damaged.rgb(f)], r"rgb\.tif is a colour image"),
    Fault("evaluate: truncated reference", "evaluate",
          lambda f: ["--denoised", f.movie(), "--reference", damaged.truncated(f)],
          r"cut\.tif is damaged or truncated"),
    Fault("evaluate: a folder as --reference", "evaluate",
          lambda f: ["--denoised", f.movie(), "--reference", damaged.folder(f)],
          r"folder\.tif is a folder"),
    Fault("traces: truncated label image", "traces",
          lambda f: ["--rois", damaged.truncated(f, "labels.tif"), "--movie", f.movie(),
                     "--output", f.output(f.root / "traces")],
          r"labels\.tif is damaged or truncated"),
    Fault("traces: truncated sample", "traces",
          lambda f: ["--rois", f.input(write_tiff(f.root / "labels.tif",
                                                  np.ones((24, 24), np.uint16))),
                     "--movie", f.movie(), "--samples", damaged.truncated(f, "s0.tif"),
                     "--output", f.output(f.root / "traces")],
          r"s0\.tif is damaged or truncated"),
    Fault("denoise: model metadata cut off", "denoise",
          lambda f: ["--model", damaged.model_truncated_meta(f), "--input", f.movie(),
                     "--output", f.output(f.root / "den.tif")],
          r"model/checkpoints/\d+: the checkpoint's metadata cannot be read"),
    Fault("denoise: model features edited", "denoise",
          lambda f: ["--model", damaged.model_meta_edited(f, features=8), "--input",
                     f.movie(), "--output", f.output(f.root / "den.tif")],
          r"model: the arrays of checkpoint \d+ do not match its metadata",
          process=True),
    Fault("denoise: model patch edited", "denoise",
          lambda f: ["--model", damaged.model_meta_edited(f, patch=[7, 1000]), "--input",
                     f.movie(), "--output", f.output(f.root / "den.tif")],
          r"model: the metadata of checkpoint \d+ is invalid"),
    Fault("denoise: model checkpoints folder empty", "denoise",
          lambda f: ["--model", damaged.model_empty_checkpoints(f), "--input", f.movie(),
                     "--output", f.output(f.root / "den.tif")],
          r"model holds no complete checkpoint"),
    Fault("denoise: model half-written (no arrays)", "denoise",
          lambda f: ["--model", damaged.model_half_written(f), "--input", f.movie(),
                     "--output", f.output(f.root / "den.tif")],
          r"model: the arrays of checkpoint \d+ cannot be read"),
    Fault("denoise: model arrays cut", "denoise",
          lambda f: ["--model", damaged.model_cut_arrays(f), "--input", f.movie(),
                     "--output", f.output(f.root / "den.tif")],
          r"model: the arrays of checkpoint \d+ cannot be read",
          process=True),
    Fault("denoise: model calibration.json cut off", "denoise",
          lambda f: ["--model", damaged.model_bad_calibration(f), "--input", f.movie(),
                     "--output", f.output(f.root / "den.tif")],
          r"calibration\.json is damaged"),
    Fault("export: model metadata cut off", "export",
          lambda f: ["--model", damaged.model_truncated_meta(f), "--format", "pth",
                     "--output", f.output(f.root / "model.pth")],
          r"model/checkpoints/\d+: the checkpoint's metadata cannot be read"),
    Fault("stream: model half-written", "stream",
          lambda f: ["--model", damaged.model_half_written(f), "--source", f.movie(),
                     "--rate", "0", "--output", f.output(f.root / "live.tif")],
          r"model: the arrays of checkpoint \d+ cannot be read"),
    Fault("calibrate: model features edited", "calibrate",
          lambda f: ["--model", damaged.model_meta_edited(f, features=8), "--noisy",
                     f.movie(), "--clean", f.movie("clean.tif")],
          r"model: the arrays of checkpoint \d+ do not match"),
    Fault("traces: model arrays cut", "traces",
          lambda f: ["--model", damaged.model_cut_arrays(f), "--raw", f.movie(),
                     "--rois", f.input(write_tiff(f.root / "labels.tif",
                                                  np.ones((24, 24), np.uint16))),
                     "--output", f.output(f.root / "traces")],
          r"model: the arrays of checkpoint \d+ cannot be read"),
    Fault("train: --init-from a model with cut-off metadata", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--init-from",
                     damaged.model_truncated_meta(f), "--workdir", f.output(f.root / "run")],
          r"model/checkpoints/\d+: the checkpoint's metadata cannot be read"),
    Fault("evaluate: NaN in the denoised movie", "evaluate",
          lambda f: ["--denoised", damaged.nan_movie(f), "--reference", f.movie()],
          r"nan\.tif holds 1 NaN or infinite value"),
    Fault("evaluate: NaN in the reference", "evaluate",
          lambda f: ["--denoised", f.movie(), "--reference", damaged.nan_movie(f)],
          r"nan\.tif holds 1 NaN"),
    Fault("evaluate: NaN in the std", "evaluate",
          lambda f: ["--denoised", f.movie(), "--reference", f.movie("ref.tif"),
                     "--uncertainty", damaged.nan_movie(f, "den_std.tif")],
          r"den_std\.tif holds 1 NaN"),
    Fault("calibrate: calibration.json exists", "calibrate",
          lambda f: ["--model", damaged.model_calibrated(f), "--noisy", f.movie(),
                     "--clean", f.movie("clean.tif")],
          r"model/calibration\.json already exists"),
    Fault("calibrate: std does not track the error", "calibrate",
          lambda f: ["--model", str(damaged.model_copy(f)), "--noisy", f.movie(),
                     "--clean", f.input(write_tiff(f.root / "clean.tif",
                                                   noisy_movie((40, 24, 24))[1]))],
          r"std does not track the error on .*movie\.tif .*nothing was stored in "
          r".*model/calibration\.json"),
    Fault("train: --features 100000 (memory)", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--features", "100000",
                     "--workdir", f.output(f.root / "run")],
          r"training .*run with f=100000 .* needs at least [\d.e+]+ [TPE]B; .* has "),
    Fault("simulate: a shape larger than memory", "simulate",
          lambda f: ["--output", f.output(f.root / "sim"), "--shape",
                     "100000,100000,100000"],
          r"sim: simulating a movie of shape \(100000, 100000, 100000\) .* needs at "
          r"least .*; this machine has"),
    Fault("events: NaN in the raw movie", "events",
          lambda f: ["--raw", damaged.nan_movie(f), "--denoised", f.movie(),
                     "--output", f.output(f.root / "check")],
          r"raw movie .*nan\.tif holds NaN or infinite values"),
    Fault("events: a raw movie without noise", "events",
          lambda f: ["--raw", f.input(write_tiff(f.root / "flat.tif",
                                                 np.full((40, 24, 24), 7, np.uint16))),
                     "--denoised", f.movie(), "--output", f.output(f.root / "check")],
          r"flat\.tif has no frame-to-frame variation"),
    Fault("denoise: one truncated file in a folder", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.folder_with_cut_file(f),
                     "--output", f.output(f.root / "out")], r"b\.tif is damaged or truncated"),
    Fault("convert: para.yaml that does not parse", "convert",
          lambda f: ["--pth", damaged.pth_with_para(f, "patch_x: [16\n"),
                     "--output", f.output(f.root / "conv")],
          r"para\.yaml: patch_x should be a number"),
    Fault("convert: para.yaml with impossible values", "convert",
          lambda f: ["--pth", damaged.pth_with_para(
              f, "patch_x: -5\npatch_y: 0\npatch_t: 1e9\n"),
                     "--output", f.output(f.root / "conv")],
          r"para\.yaml: infer\.patch must be three sizes"),
    Fault("stream: RGB source", "stream",
          lambda f: ["--model", f.model, "--source", damaged.rgb(f), "--rate", "0",
                     "--output", f.output(f.root / "live.tif")], r"rgb\.tif is a colour image"),
    Fault("stream: source with two series", "stream",
          lambda f: ["--model", f.model, "--source", damaged.two_series(f), "--rate", "0",
                     "--output", f.output(f.root / "live.tif")], r"two\.tif holds 2 image series"),
    Fault("traces: RGB label image", "traces",
          lambda f: ["--rois", damaged.rgb(f, "labels.tif"), "--movie", f.movie(),
                     "--output", f.output(f.root / "traces")], r"labels\.tif is a colour image"),
    Fault("evaluate: empty --raw", "evaluate",
          lambda f: ["--denoised", f.movie(), "--reference", f.movie("ref.tif"),
                     "--raw", damaged.empty(f)], r"empty\.tif is empty"),
    Fault("events: shapes differ", "events",
          lambda f: ["--raw", f.movie("raw.tif"), "--denoised", f.movie("den.tif", (30, 24, 24)),
                     "--output", f.output(f.root / "check")],
          r"raw\.tif \(40, 24, 24\) and denoised .*den\.tif \(30, 24, 24\) differ"),
    Fault("calibrate: zero-frame noisy movie", "calibrate",
          lambda f: ["--model", str(damaged.model_copy(f)), "--noisy", damaged.zero_frames(f),
                     "--clean", f.movie()], r"zero\.tif holds no frames"),
    Fault("export: RGB --sample", "export",
          lambda f: ["--model", f.model, "--format", "bioimageio", "--mean", "50",
                     "--sample", damaged.rgb(f, "sample.tif"),
                     "--output", f.output(f.root / "model.zip")], r"sample\.tif is a colour image"),
    Fault("train: --init-from a half-written model", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--init-from",
                     damaged.model_half_written(f), "--workdir", f.output(f.root / "run")],
          r"model: the arrays of checkpoint \d+ cannot be read"),
    Fault("export: truncated --sample", "export",
          lambda f: ["--model", f.model, "--format", "bioimageio", "--mean", "50",
                     "--sample", damaged.truncated(f, "sample.tif"),
                     "--output", f.output(f.root / "model.zip")],
          r"sample\.tif is damaged or truncated"),

    # -- processes: locks, signals, kills, checkpoints --------------------------------
    Fault("train: workdir in use by another run", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--fresh", "--workdir",
                     f.input(hold_lock(f, f.root / "run"))],
          r"run is in use by another training run \(PID \d+", process=True),
    Fault("train: workdir is a file", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--workdir",
                     f.raw("run", b"not a folder")], r"run is a file, not a folder"),
    Fault("train: workdir/checkpoints is a file", "train",
          lambda f: ["--config", "tiny", "--data", f.movie(), "--fresh", "--workdir",
                     workdir_with_a_checkpoints_file(f)],
          r"run/checkpoints is a file, not a folder"),

] + fault_rows_data.ROWS + fault_rows_commands.ROWS


def _digest(path: str) -> str:
  if os.path.isdir(path):
    return "dir:" + ",".join(sorted(os.listdir(path)))
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _leftovers(files: Files) -> list[str]:
  """Final outputs, and temporary files beside them, that a failed run left."""
  found = [p for p in files.outputs if os.path.exists(p)]
  folders = {os.path.dirname(p) for p in files.outputs}
  for folder in folders:
    if os.path.isdir(folder):
      found += [os.path.join(folder, n) for n in os.listdir(folder)
                if (".partial" in n or n.endswith((".tmp", ".lock")))
                and os.path.join(folder, n) not in files.inputs]
  return found


def _run_in_process(argv: list[str]) -> tuple[int, str, str]:
  import contextlib
  import io
  out_buf, err_buf = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf):
    code = cli.main(argv)
  return code, out_buf.getvalue(), err_buf.getvalue()


def run_fault(fault: Fault, root: Path, model: str) -> tuple[int, str, str, Files]:
  files = Files(root, model)
  args = fault.make(files)
  before = {p: _digest(p) for p in files.inputs}
  argv = ["deepcad-jax", fault.command, *args]
  if fault.patch is not None:
    with pytest.MonkeyPatch.context() as mp:
      fault.patch(mp, files)
      code, out, err = _run_in_process(argv)
  elif fault.process:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "deepcad_jax", *argv[1:]],
                          capture_output=True, text=True, env=env, timeout=300)
    code, out, err = done.returncode, done.stdout, done.stderr
  else:
    code, out, err = _run_in_process(argv)
  changed = [p for p, d in before.items() if not os.path.exists(p) or _digest(p) != d]
  assert not changed, f"inputs changed: {changed}"
  return code, out, err, files


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault(fault, tmp_path, trained_model):
  code, out, err, files = run_fault(fault, tmp_path, trained_model)
  assert "Traceback" not in out + err, err[-3000:]
  if fault.check is not None:
    fault.check(files, code, out, err)
    return
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, err[-3000:]
  assert re.search(fault.expect, errors[0]), errors[0]
  assert code == fault.code, (code, err[-2000:])
  assert not _leftovers(files), _leftovers(files)


def test_fault_matrix_size():
  commands = sorted({f.command for f in FAULTS})
  print(f"fault matrix: {len(FAULTS)} rows over {len(commands)} commands "
        f"({', '.join(commands)})")
  assert len(FAULTS) >= 10
