"""Fault-matrix rows: files and formats: loaders, writers, the untrusted-file checks."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pytest
import tifffile

from tests.helpers import damaged, noisy_movie
from tests.helpers.fault_matrix import Fault, Files
from tests.helpers.outputs_faults import _under, also, disk_full, little_space

SHAPE = damaged.SHAPE


def _den(f: Files, name: str = "den.tif") -> list[str]:
  return ["--output", f.output(f.root / name)]


def _stream(f: Files) -> list[str]:
  return ["--rate", "0", "--output", f.output(f.root / "live.tif")] + \
      also(f, f.root / "live_raw.tif")


def _succeeded(output: str, shape=SHAPE):
  """A check: the run succeeded, and `output` (relative to the row's folder) is a movie
  of `shape` with finite values."""
  def check(files: Files, code: int, out: str, err: str) -> None:
    from deepcad_jax.data.movie import open_movie
    assert code == 0, err[-3000:]
    movie = open_movie(str(files.root / output))
    assert movie.shape == shape, movie.shape
    frames = movie.read(0, movie.shape[0])
    assert np.isfinite(frames).all() and frames.std() > 0
  return check


def _trained(files: Files, code: int, out: str, err: str) -> None:
  """A check: training succeeded and saved a checkpoint that gives finite weights."""
  from deepcad_jax.model_io.loading import load_model
  assert code == 0, err[-3000:]
  model = load_model(str(files.root / "run"))
  if model.mean is not None:  # the training data's mean, as read: in native order
    true = float(noisy_movie(SHAPE)[0].mean())
    assert abs(model.mean - true) < 1e-3 * true, (model.mean, true)


def _kept_hdf5(files: Files, code: int, out: str, err: str) -> None:
  import h5py
  assert code == 0, err[-3000:]
  with h5py.File(files.root / "other.h5", "r") as f:
    assert sorted(f) == ["denoised", "keep", "notes"], sorted(f)
    assert f["keep"][()].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert f["denoised"].shape == SHAPE


def _kept_zarr(files: Files, code: int, out: str, err: str) -> None:
  import zarr
  assert code == 0, err[-3000:]
  group = zarr.open_group(str(files.root / "group.zarr"), mode="r")
  assert sorted(group.keys()) == ["den", "keep"], sorted(group.keys())
  assert group["keep"][:].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
  assert group["den"].shape == SHAPE
  assert group["den"].nchunks_initialized == group["den"].nchunks


def _still_a_fifo(files: Files, code: int, out: str, err: str) -> None:
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert code == 2 and len(errors) == 1, err[-3000:]
  assert "is a FIFO (named pipe), not a regular file; an output never replaces" in \
      errors[0], errors[0]
  assert stat.S_ISFIFO(os.stat(files.root / "den.tif").st_mode)
  assert [n for n in os.listdir(files.root) if ".partial" in n or ".lock" in n] == []


def _dangling(f: Files) -> str:
  os.symlink("nowhere.tif", f.root / "gone.tif")
  return str(f.root / "gone.tif")


def _big_endian_tiff(f: Files) -> str:
  path = f.root / "be.tif"
  tifffile.imwrite(path, noisy_movie(SHAPE)[0], byteorder=">", photometric="minisblack")
  return f.input(path)


def _big_endian_raw(f: Files) -> str:
  noisy_movie(SHAPE)[0].astype(">u2").tofile(f.root / "be.bin")
  f.input(f.root / "be.bin")
  return f"raw:{f.root / 'be.bin'}[shape=40x24x24,dtype=>u2]"


def _complex_tiff(f: Files) -> str:
  tifffile.imwrite(f.root / "complex.tif", noisy_movie(SHAPE)[0].astype(np.complex64))
  return f.input(f.root / "complex.tif")


def _training_folder_with_fifo(f: Files) -> str:
  (f.root / "movies").mkdir()
  f.movie("movies/a.tif")
  os.mkfifo(f.root / "movies" / "b.tif")
  return str(f.root / "movies")


def _suite2p_disk_full(mp: pytest.MonkeyPatch, f: Files) -> None:
  """The row's disk fills up, for the suite2p writer's files too."""
  import deepcad_jax.data.formats.suite2p as suite2p_mod
  import deepcad_jax.runtime.files as files_mod
  disk_full(mp, f)
  mp.setattr(suite2p_mod, "open", files_mod.open, raising=False)


def _export_disk_full(mp: pytest.MonkeyPatch, f: Files) -> None:
  """Files the bioimage.io export writes under the row's folder hit ENOSPC."""
  import builtins
  import deepcad_jax.export.bioimageio as bioimageio_mod
  real_open = builtins.open

  def fake_open(path, mode="r", *args, **kwargs):
    if _under(path, f.root) and ("w" in mode or "x" in mode):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
    return real_open(path, mode, *args, **kwargs)
  mp.setattr(bioimageio_mod, "open", fake_open, raising=False)


_VDS_OUT = "/tmp/deepcad-jax-no-such-folder/source.h5"  # outside any row's folder

ROWS: list[Fault] = [
    # -- HDF5: only what is stored in the file is read ---------------------------------
    Fault("stream: HDF5 external raw storage (/etc/passwd)", "stream",
          lambda f: ["--model", f.model, "--source", damaged.hdf5_external(f)] + _stream(f),
          r"ext\.h5:/data keeps its values in external raw files \(/etc/passwd\)"),
    Fault("denoise: HDF5 external raw storage", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.hdf5_external(f)] + _den(f),
          r"ext\.h5:/data keeps its values in external raw files"),
    Fault("denoise: HDF5 external link named", "denoise",
          lambda f: ["--model", f.model, "--input",
                     damaged.hdf5_external_link(f) + ":/ext"] + _den(f),
          r"link\.h5:/ext is an external link to .*source\.h5:/data, and deepcad-jax "
          r"reads only data stored inside the file"),
    Fault("train: HDF5 file holding only an external link", "train",
          lambda f: ["--config", "tiny", "--data", damaged.hdf5_external_link(f),
                     "--workdir", f.output(f.root / "run")],
          r"link\.h5:/ext is an external link to .*source\.h5:/data"),
    Fault("denoise: HDF5 virtual dataset with a source outside its folder", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.hdf5_virtual(f, _VDS_OUT)]
          + _den(f), r"vds\.h5:/data is a virtual dataset whose source .*source\.h5 is "
          r"outside the file's folder"),
    Fault("train: HDF5 virtual dataset with a missing source", "train",
          lambda f: ["--config", "tiny", "--data", damaged.hdf5_virtual(f, "gone.h5"),
                     "--workdir", f.output(f.root / "run")],
          r"vds\.h5:/data is a virtual dataset whose source gone\.h5 is missing"),
    Fault("stream: HDF5 virtual dataset with a missing source", "stream",
          lambda f: ["--model", f.model, "--source", damaged.hdf5_virtual(f, "gone.h5")]
          + _stream(f), r"vds\.h5:/data is a virtual dataset whose source gone\.h5 is "
          r"missing \(its frames would be read as the fill value\)"),
    Fault("denoise: HDF5 axes attribute as an array (YXT) is honoured", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.hdf5_movie(
              f, axes=np.array([b"Y", b"X", b"T"]))] + _den(f), "",
          check=_succeeded("den.tif", (24, 40, 24))),
    Fault("denoise: HDF5 axes attribute as an array that does not fit", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.hdf5_movie(
              f, axes=np.array([b"time", b"y"]))] + _den(f),
          r"its metadata's axes 'TY' for .*movie\.h5:/data"),
    # -- Zarr: a missing chunk is not a frame of zeros --------------------------------
    Fault("denoise: Zarr v3 store with missing chunks", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.zarr_missing_chunks(f)]
          + _den(f), r"gaps\.zarr has 3 of its 4 chunks missing, which zarr would read "
          r"as zeros"),
    Fault("train: Zarr v2 store with missing chunks", "train",
          lambda f: ["--config", "tiny", "--data", damaged.zarr_missing_chunks(
              f, zarr_format=2), "--workdir", f.output(f.root / "run")],
          r"gaps\.zarr has 3 of its 4 chunks missing"),
    # -- values that are not intensities ------------------------------------------------
    Fault("denoise: complex TIFF", "denoise",
          lambda f: ["--model", f.model, "--input", _complex_tiff(f)] + _den(f),
          r"complex\.tif holds complex numbers \(complex64\), not intensities"),
    Fault("train: complex HDF5", "train",
          lambda f: ["--config", "tiny", "--data", damaged.hdf5_movie(
              f, data=noisy_movie(SHAPE)[0].astype(np.complex128)),
                     "--workdir", f.output(f.root / "run")],
          r"movie\.h5:/data holds complex numbers \(complex128\)"),
    Fault("denoise: HDF5 string dataset", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.hdf5_movie(
              f, data=np.full((4, 3, 3), b"ab"))] + _den(f),
          r"movie\.h5:/data holds byte strings \(\|S2\), not intensities"),
    Fault("stream: HDF5 compound dataset", "stream",
          lambda f: ["--model", f.model, "--source", damaged.hdf5_movie(
              f, data=np.zeros((4, 3, 3), [("a", "u2"), ("b", "f4")]))] + _stream(f),
          r"movie\.h5:/data holds records \(a compound type\)"),
    # -- big-endian files are read in the machine's byte order ------------------------
    Fault("denoise: big-endian TIFF", "denoise",
          lambda f: ["--model", f.model, "--input", _big_endian_tiff(f)] + _den(f), "",
          check=_succeeded("den.tif")),
    Fault("denoise: big-endian HDF5", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.hdf5_movie(
              f, data=noisy_movie(SHAPE)[0].astype(">f4"))] + _den(f), "",
          check=_succeeded("den.tif")),
    Fault("train: big-endian TIFF", "train",
          lambda f: ["--config", "tiny", "--epochs", "1", "--data", _big_endian_tiff(f),
                     "--workdir", str(f.root / "run")], "", check=_trained),
    Fault("stream: big-endian raw", "stream",
          lambda f: ["--model", f.model, "--source", _big_endian_raw(f), "--rate", "0",
                     "--output", str(f.root / "live.tif")], "",
          check=_succeeded("live.tif")),
    # -- suite2p, ROIs -------------------------------------------------------------------
    Fault("denoise: suite2p folder with negative Ly and Lx", "denoise",
          lambda f: ["--model", f.model, "--input", "suite2p:" + damaged.suite2p_plane(
              f, -24, -24)] + _den(f),
          r"plane0/ops\.npy gives a frame size Ly=-24, Lx=-24, which is not a frame"),
    Fault("denoise: suite2p folder with Ly = 0", "denoise",
          lambda f: ["--model", f.model, "--input", "suite2p:" + damaged.suite2p_plane(
              f, 0, 24)] + _den(f), r"ops\.npy gives a frame size Ly=0, Lx=24"),
    Fault("traces: a deeply nested ROI JSON", "traces",
          lambda f: ["--rois", damaged.deep_json(f), "--movie", f.movie(),
                     "--output", f.output(f.root / "traces")],
          r"rois\.json: the JSON is nested too deeply"),
    # -- special files: never opened -------------------------------------------------
    Fault("denoise: a FIFO as input", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.fifo(f)] + _den(f),
          r"pipe\.tif is a FIFO \(named pipe\), not a regular file"),
    Fault("stream: a FIFO as source", "stream",
          lambda f: ["--model", f.model, "--source", damaged.fifo(f)] + _stream(f),
          r"pipe\.tif is a FIFO \(named pipe\), not a regular file"),
    Fault("train: a FIFO in the training folder", "train",
          lambda f: ["--config", "tiny", "--data", _training_folder_with_fifo(f),
                     "--workdir", f.output(f.root / "run")],
          r"movies/b\.tif is a FIFO \(named pipe\)"),
    Fault("traces: a FIFO as --rois", "traces",
          lambda f: ["--rois", damaged.fifo(f, "rois.json"), "--movie", f.movie(),
                     "--output", f.output(f.root / "traces")],
          r"rois\.json is a FIFO \(named pipe\)"),
    Fault("denoise: a symbolic link loop as input", "denoise",
          lambda f: ["--model", f.model, "--input", damaged.symlink_loop(f)] + _den(f),
          r"loop\.tif is a symbolic link that loops back on itself"),
    Fault("train: a dangling symbolic link as --data", "train",
          lambda f: ["--config", "tiny", "--data", _dangling(f),
                     "--workdir", f.output(f.root / "run")],
          r"gone\.tif is a symbolic link to nowhere\.tif, which does not exist"),
    # -- outputs --------------------------------------------------------------------------
    Fault("denoise: --output a FIFO with --overwrite", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--overwrite", "--output",
                     damaged.fifo(f, "den.tif")], "", check=_still_a_fifo),
    Fault("denoise: --output other.h5:/denoised keeps the file's other datasets",
          "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--overwrite", "--output",
                     damaged.hdf5_other_datasets(f) + ":/denoised"], "",
          check=_kept_hdf5),
    Fault("denoise: --output group.zarr:/den keeps the store's other arrays", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--overwrite", "--output",
                     damaged.zarr_group_with(f) + ":/den"], "", check=_kept_zarr),
    Fault("denoise: suite2p output, not enough space on its disk", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--output",
                     "suite2p:" + f.output(f.root / "s2p" / "plane0")],
          r"plane0 \(with 1 other file\) needs 3\d\d kB but only 1 kB is free on that "
          r"disk",
          patch=little_space),
    Fault("denoise: suite2p output, disk full while writing", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--output",
                     "suite2p:" + f.output(f.root / "s2p" / "plane0")],
          r"suite2p:.*plane0 could not be written: the disk is full",
          patch=_suite2p_disk_full),
    Fault("simulate: --format suite2p on a full disk leaves no folder", "simulate",
          lambda f: ["--shape", "8,16,16", "--format", "suite2p", "--output",
                     f.output(f.root / "sim")],
          r"suite2p:.*(noisy|clean) could not be written: the disk is full",
          patch=_suite2p_disk_full),
    Fault("export: bioimage.io package on a full disk", "export",
          lambda f: ["--model", f.model, "--format", "bioimageio", "--mean", "50",
                     "--output", f.output(f.root / "model.zip")],
          r"model\.zip could not be written: the disk is full", patch=_export_disk_full),
    Fault("denoise: --compression on a TIFF output", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--compression", "gzip"]
          + _den(f), r"den\.tif: compression=gzip applies to HDF5 and Zarr outputs only, "
          r"and this output is TIFF; leave out --compression"),
    Fault("denoise: --raw-shape and --raw-dtype on a TIFF input", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--raw-shape", "40x24x24",
                     "--raw-dtype", "uint16"] + _den(f),
          r"movie\.tif: shape, dtype \(--raw-shape, --raw-dtype\) describe raw binary "
          r"files only, and this is a tiff file"),
    Fault("denoise: --nwb-acquisition on an HDF5 output", "denoise",
          lambda f: ["--model", f.model, "--input", f.movie(), "--nwb-acquisition"]
          + _den(f, "den.h5"), r"den\.h5: nwb_group=acquisition applies to NWB outputs "
          r"only"),
]
