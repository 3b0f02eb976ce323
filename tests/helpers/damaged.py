"""Builders of damaged and odd inputs for the fault matrix (tests/test_faults.py).

Each takes the row's `Files` and returns the path of what it made, declared as an input
(so the harness checks it is left byte-identical).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import tifffile

from tests.helpers import noisy_movie, write_tiff
from deepcad_jax.model_io.loading import load_model
from deepcad_jax.export import export

SHAPE = (40, 24, 24)


def _whole(files, name: str, **kwargs) -> bytes:
  """The bytes of a good movie written with `kwargs` (not left on disk)."""
  path = files.root / f".whole-{name}"
  tifffile.imwrite(path, noisy_movie(SHAPE)[0], **{"photometric": "minisblack", **kwargs})
  data = path.read_bytes()
  os.remove(path)
  return data


def truncated(files, name: str = "cut.tif", keep: float = 0.5, **kwargs) -> str:
  """A movie cut off after `keep` of its bytes (a copy that did not finish)."""
  data = _whole(files, name, **kwargs)
  return files.raw(name, data[:int(len(data) * keep)])


def folder_with_cut_file(files) -> str:
  """A folder of movies: a.tif whole, b.tif truncated."""
  (files.root / "movies").mkdir()
  write_tiff(files.root / "movies" / "a.tif", noisy_movie(SHAPE)[0])
  data = _whole(files, "b.tif")
  (files.root / "movies" / "b.tif").write_bytes(data[:len(data) // 2])
  files.input(files.root / "movies" / "a.tif")
  files.input(files.root / "movies" / "b.tif")
  return str(files.root / "movies")


def corrupt_page(files, name: str = "bad.tif", page: int = 20) -> str:
  """A zlib-compressed movie whose page `page` holds zeros instead of its data: the
  file opens, and the damage shows only when that frame is read."""
  path = files.root / name
  tifffile.imwrite(path, noisy_movie(SHAPE)[0], photometric="minisblack",
                   compression="zlib")
  with tifffile.TiffFile(path) as tif:
    offset, count = tif.pages[page].dataoffsets[0], tif.pages[page].databytecounts[0]
  data = bytearray(path.read_bytes())
  data[offset:offset + count] = bytes(count)
  return files.raw(name, bytes(data))


def rgb(files, name: str = "rgb.tif") -> str:
  """A (64, 64, 3) colour image, as a camera or a screenshot tool writes it."""
  image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
  tifffile.imwrite(files.root / name, image, photometric="rgb")
  return files.input(files.root / name)


def two_series(files, name: str = "two.tif") -> str:
  """A file with two image series (two movies written into one TIFF)."""
  with tifffile.TiffWriter(files.root / name) as tw:
    tw.write(noisy_movie(SHAPE)[0], photometric="minisblack")
    tw.write(noisy_movie((20, 24, 24))[0], photometric="minisblack")
  return files.input(files.root / name)


def zero_frames(files, name: str = "zero.tif") -> str:
  """A movie of shape (0, 24, 24)."""
  with warnings.catch_warnings():  # tifffile: "writing zero-size array"
    warnings.simplefilter("ignore")
    tifffile.imwrite(files.root / name, np.zeros((0, 24, 24), np.uint16),
                     photometric="minisblack")
  return files.input(files.root / name)


def wrong_page_count(files, name: str = "ij.tif", claim: int = 20) -> str:
  """An ImageJ movie of 40 pages whose metadata says `claim` frames."""
  data = _whole(files, name, imagej=True, metadata={"axes": "TYX"}, photometric=None)
  for key in (b"images", b"frames"):
    data = data.replace(key + b"=40\n", key + f"={claim}\n".encode())
  return files.raw(name, data)


def claims_more_frames(files, name: str = "short.tif") -> str:
  """A movie whose shape metadata says 80 frames where 40 were written."""
  data = _whole(files, name).replace(b'"shape": [40,', b'"shape": [80,')
  return files.raw(name, data)


def nan_movie(files, name: str = "nan.tif") -> str:
  """A float32 movie with a NaN in frame 5."""
  movie = noisy_movie(SHAPE)[0].astype(np.float32)
  movie[5, 3, 4] = np.nan
  return files.input(write_tiff(files.root / name, movie))


def folder(files, name: str = "folder.tif") -> str:
  """A folder where a file is expected (its name even ends in .tif)."""
  path = files.root / name
  path.mkdir()
  return files.input(path)


def empty(files, name: str = "empty.tif") -> str:
  return files.raw(name, b"")


def model_copy(files, name: str = "model") -> Path:
  """A copy of the row's trained model, to damage."""
  dst = files.root / name
  shutil.copytree(files.model, dst)
  return dst


def _step(model: Path) -> Path:
  steps = sorted((p for p in (model / "checkpoints").iterdir() if p.name.isdigit()),
                 key=lambda p: int(p.name))
  return steps[-1]


def model_truncated_meta(files) -> str:
  """A model whose metadata JSON was cut off."""
  model = model_copy(files)
  meta = _step(model) / "meta" / "metadata"
  text = meta.read_text()
  meta.write_text(text[:len(text) // 2])
  return files.input(model)


def model_meta_edited(files, **changes) -> str:
  """A model whose metadata was edited (e.g. features) so it no longer fits its arrays."""
  model = model_copy(files)
  meta = _step(model) / "meta" / "metadata"
  record = json.loads(meta.read_text())
  for key, value in changes.items():
    record[key] = value
    if key == "features":
      record["config"]["model"]["features"] = value
  meta.write_text(json.dumps(record))
  return files.input(model)


def model_empty_checkpoints(files) -> str:
  """A model whose checkpoints/ folder is empty."""
  model = model_copy(files)
  shutil.rmtree(model / "checkpoints")
  (model / "checkpoints").mkdir()
  return files.input(model)


def model_half_written(files) -> str:
  """A model whose last step lost its arrays (a copy or a save that stopped)."""
  model = model_copy(files)
  shutil.rmtree(_step(model) / "params")
  return files.input(model)


def model_cut_arrays(files) -> str:
  """A model whose array files were cut to 10 bytes each."""
  model = model_copy(files)
  for root, _, names in os.walk(_step(model) / "params"):
    for n in names:
      path = Path(root) / n
      if "/d/" in str(path) or path.parent.name == "d":
        path.write_bytes(path.read_bytes()[:10])
  return files.input(model)


def model_bad_calibration(files) -> str:
  """A model whose calibration.json was cut off."""
  model = model_copy(files)
  (model / "calibration.json").write_text('{"std_scale": 3')
  return files.input(model)


def model_calibrated(files) -> str:
  """A model that already holds a calibration.json."""
  model = model_copy(files)
  (model / "calibration.json").write_text('{"std_scale": 2.0}')
  return files.input(model)


def pth_with_para(files, para: str) -> str:
  """The row's model exported as a DeepCAD-RT .pth, with `para` as its para.yaml."""
  folder = files.root / "pth"
  folder.mkdir()
  export(load_model(files.model), str(folder / "model.pth"), "pth")
  (folder / "para.yaml").write_text(para)
  files.input(folder / "para.yaml")
  return files.input(folder / "model.pth")


# -- files and formats: HDF5, Zarr, suite2p, odd dtypes, special files ---------------


def hdf5_movie(files, name: str = "movie.h5", data=None, **attrs) -> str:
  """An HDF5 file with the movie (or `data`) as /data, declared an input."""
  import h5py
  with h5py.File(files.root / name, "w") as f:
    f["data"] = noisy_movie(SHAPE)[0] if data is None else data
    f["data"].attrs.update(attrs)
  return files.input(files.root / name)


def hdf5_external(files, name: str = "ext.h5", target: str = "/etc/passwd") -> str:
  """An HDF5 dataset whose values are stored in another file (external raw storage)."""
  import h5py
  with h5py.File(files.root / name, "w") as f:
    f.create_dataset("data", shape=(8, 4, 4), dtype="u1", external=[(target, 0, 128)])
  return files.input(files.root / name)


def hdf5_external_link(files, name: str = "link.h5") -> str:
  """An HDF5 file holding only an external link /ext to a movie in another file."""
  import h5py
  source = hdf5_movie(files, "source.h5")
  with h5py.File(files.root / name, "w") as f:
    f["ext"] = h5py.ExternalLink(source, "/data")
  return files.input(files.root / name)


def hdf5_virtual(files, source: str, name: str = "vds.h5") -> str:
  """A virtual dataset /data mapping the whole of `source`:/data (which may be missing
  or outside the folder)."""
  import h5py
  layout = h5py.VirtualLayout(SHAPE, np.uint16)
  layout[:] = h5py.VirtualSource(source, "data", shape=SHAPE, dtype=np.uint16)
  with h5py.File(files.root / name, "w") as f:
    f.create_virtual_dataset("data", layout, fillvalue=0)
  return files.input(files.root / name)


def hdf5_other_datasets(files, name: str = "other.h5") -> str:
  """An HDF5 file with datasets a denoised movie must not replace (/keep, /notes)."""
  import h5py
  with h5py.File(files.root / name, "w") as f:
    f["keep"] = np.arange(5.0)
    f["notes"] = "kept"
    f["denoised"] = np.zeros(3)
  return str(files.root / name)


def zarr_missing_chunks(files, name: str = "gaps.zarr", zarr_format: int = 3) -> str:
  """A Zarr store whose movie lacks all but its first chunk (a copy that did not
  finish); zarr would read the rest as zeros."""
  import zarr
  array = zarr.create_array(str(files.root / name), shape=SHAPE, chunks=(10, 24, 24),
                            dtype=np.uint16, zarr_format=zarr_format)
  array[:10] = noisy_movie(SHAPE)[0][:10]
  for sub in sorted(Path(files.root / name).rglob("*")):
    if sub.is_file():
      files.input(sub)
  return str(files.root / name)


def zarr_group_with(files, name: str = "group.zarr") -> str:
  """A Zarr group holding an array /keep that a denoised array must not replace."""
  import zarr
  group = zarr.open_group(str(files.root / name), mode="w")
  group.create_array("keep", shape=(5,), dtype=np.float32)[:] = np.arange(5.0)
  return str(files.root / name)


def suite2p_plane(files, ly: int, lx: int, name: str = "plane0") -> str:
  """A suite2p plane folder whose ops.npy gives the frame size Ly x Lx."""
  folder = files.root / name
  folder.mkdir()
  noisy_movie(SHAPE)[0].astype("<i2").tofile(folder / "data.bin")
  np.save(folder / "ops.npy", np.array({"Ly": ly, "Lx": lx, "nframes": SHAPE[0]},
                                       dtype=object), allow_pickle=True)
  files.input(folder / "data.bin")
  files.input(folder / "ops.npy")
  return str(folder)


def fifo(files, name: str = "pipe.tif") -> str:
  """A FIFO (named pipe) named like a movie: opening it would block. Not declared an
  input (reading it to compare would block too)."""
  os.mkfifo(files.root / name)
  return str(files.root / name)


def symlink_loop(files, name: str = "loop.tif") -> str:
  """A symbolic link that points at itself."""
  os.symlink(name, files.root / name)
  return str(files.root / name)


def deep_json(files, name: str = "rois.json", depth: int = 100_000) -> str:
  """A JSON file nested `depth` levels deep."""
  return files.raw(name, b'{"rois": ' + b"[" * depth + b"]" * depth + b"}")
