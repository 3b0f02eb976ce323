"""Writing movies: `MovieWriter`, `VolumeWriter` (with `SplitOutputs`) and `write_movie`.

`MovieWriter` writes a movie frame block by frame block as they are produced (the
denoised movie, its std and samples, simulated movies, the live stream), with the
input's metadata (`data.metadata`), in the format its name says (`data.spec`): TIFF,
HDF5, Zarr, NWB, a suite2p plane folder or a CaImAn memmap; `VolumeWriter` writes
every plane and channel of a split recording into one HDF5 or Zarr file (`SplitOutputs`
hands out its parts). Each is an atomic, locked output of `runtime.files`: complete
under its final name, or absent.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterable, Sequence

import numpy as np
import tifffile

from deepcad_jax.data.formats import caiman, hdf5, nwb, suite2p, zarr_store
from deepcad_jax.data.metadata import Format, MovieMetadata
from deepcad_jax.data.spec import MovieSpec, split_name
from deepcad_jax.errors import UserError
from deepcad_jax.runtime.files import (AtomicFile, TwoPhase, aborting,
                                       check_space)

log = logging.getLogger("deepcad_jax")

BIGTIFF_BYTES = 2**32 - 2**25  # above this, write BigTIFF
PAGE_BYTES = 512               # TIFF tags per page, at most (for space estimates)
_PLACEHOLDER = " " * 256       # the description until the movie's length is known


def movie_bytes(shape: Sequence[int], dtype) -> int:
  """Bytes a (T, Y, X) TIFF movie of `dtype` takes on disk, at most."""
  t = int(shape[0])
  return int(np.prod(shape)) * np.dtype(dtype).itemsize + t * PAGE_BYTES + 2**16


def output_space(path: "str | MovieSpec", shape: Sequence[int], dtype) -> tuple[str, int]:
  """(the file or folder on disk, the bytes it needs at most) of a (T, Y, X) output
  named `path` in any format: for `check_space`, which must look at the disk of the
  file itself (`suite2p:/disk/plane0` is on /disk). A suite2p folder holds int16, and
  float32 frames beside them until its scale is known."""
  spec = MovieSpec.parse(path)
  need = movie_bytes(shape, dtype)
  if spec.kind == "suite2p":
    voxels = int(np.prod(shape))
    need = voxels * 2 + (voxels * 4 if spec.scale is None else 0) + \
        int(np.prod(shape[1:])) * 8 + 2**16
  if spec.kind in ("hdf5", "zarr") and spec.dataset and os.path.exists(spec.path):
    need += _size_on_disk(spec.path)  # the copy that keeps the file's other arrays
  return spec.path, need


def _size_on_disk(path: str) -> int:
  """Bytes of a file, or of every file in a folder (a Zarr store)."""
  if not os.path.isdir(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path)
             for n in names)


# Output options, the formats they apply to, and the flag or bracket that gives them: an
# option given for another format is refused, never silently ignored.
_OUTPUT_OPTIONS = (("compression", ("hdf5", "zarr"), "--compression"),
                   ("zarr_format", ("zarr",), "[zarr_format=...]"),
                   ("nwb_group", ("nwb",), "--nwb-acquisition"),
                   ("scale", ("suite2p",), "[scale=...]"))
_FORMAT_NAMES = {"tiff": "TIFF", "hdf5": "HDF5", "zarr": "Zarr", "nwb": "NWB",
                 "suite2p": "suite2p", "caiman": "CaImAn memmap"}

WRITABLE = ("tiff", "hdf5", "zarr", "nwb", "suite2p", "caiman")
VOLUME_FORMATS = ("hdf5", "zarr")  # hold every plane and channel of a recording in one file


def output_format(path: str | MovieSpec) -> str:
  """The format an output is written in: its `FORMAT:` prefix, else its suffix (a
  folder named planeN is a suite2p plane folder); one sentence when neither says."""
  spec = MovieSpec.parse(path)
  kind = spec.kind
  if kind not in WRITABLE:
    raise UserError(f"{path}: cannot tell which format to write from its name; end it "
                    "in .tif, .h5, .zarr, .nwb or .mmap (CaImAn), or name a suite2p plane "
                    "folder (suite2p:FOLDER or .../plane0).")
  for option, formats, flag in _OUTPUT_OPTIONS:
    value = getattr(spec, option)
    if value is not None and kind not in formats:
      names = " and ".join(_FORMAT_NAMES[f] for f in formats)
      raise UserError(f"{spec.path}: {option}={value} applies to {names} outputs only, "
                      f"and this output is {_FORMAT_NAMES[kind]}; leave out {flag} (or "
                      f"choose an output in {names}).")
  return kind


def written_path(path: str | MovieSpec, frame_shape, frames: int | None) -> str:
  """The file or folder an output named `path` is written as (a CaImAn memmap's name
  gains the movie's shape); for checks such as "is that the input?"."""
  spec = MovieSpec.parse(path)
  if output_format(spec) == "caiman":
    return caiman.memmap_name(spec.path, frame_shape, frames)
  return spec.path


def _sink(spec: MovieSpec, kind: str):
  """The writer of a non-TIFF format (`open`, `write`, `close`, `abort`)."""
  if kind == "hdf5":
    return hdf5.HDF5Sink(spec.dataset, spec.compression, final=spec.path)
  if kind == "zarr":
    ome = split_name(spec.path)[1].lower() == ".ome.zarr"
    return zarr_store.ZarrSink(spec.dataset, spec.compression, ome, spec.zarr_format,
                               final=spec.path)
  if kind == "nwb":
    return nwb.NWBSink(spec.dataset, spec.nwb_group == "acquisition")
  if kind == "caiman":
    return caiman.CaimanSink(spec.path)
  return suite2p.Suite2pSink(spec.scale, os.path.abspath(spec.path))


def _checked_frames(path: str, frames: np.ndarray, frame_shape: tuple[int, ...],
                    dtype: np.dtype) -> np.ndarray:
  """`frames` (n, Y, X) as `dtype`; refuses frames of another size, or of a kind that
  would have to be rounded (a bug of the caller, not of the user's input)."""
  if frames.shape[1:] != frame_shape:
    raise ValueError(f"{path}: frames of {frames.shape[1:]} given to a movie of "
                     f"{frame_shape} frames.")
  if frames.dtype != dtype:
    if not np.can_cast(frames.dtype, dtype, "same_kind"):
      raise TypeError(f"{path}: {frames.dtype} frames given to a {dtype} movie "
                      "(convert them first).")
    frames = frames.astype(dtype)
  return frames


class MovieWriter(TwoPhase):
  """A movie (T, Y, X) written block by block as frames are produced.

  Args:
    path: the final name, in the format it names (`output_format`): .tif, .tiff
      (.ome.tif gives an OME-TIFF), .h5/.hdf5 (dataset `data`, or `out.h5:/path`), .zarr,
      (.ome.zarr: an OME-Zarr image), .nwb, a suite2p plane folder (`suite2p:FOLDER`), a
      CaImAn memmap (.mmap or `caiman:NAME`: written as `NAME_d1_Y_d2_X_d3_1_order_C_
      frames_T.mmap`, which needs `frame_shape` and `frames`); options in brackets, e.g.
      `out.h5[compression=gzip]`, `suite2p:plane0[scale=0.5]`, `out.nwb[nwb_group=acquisition]`,
      `out.zarr[zarr_format=2]`.
    frame_shape: (Y, X), or None: that of the first frames written.
    dtype: the frames' dtype (blocks of another kind are refused, never rounded here).
    frames: the number of frames if known (then BigTIFF only above 4 GB, and `finish`
      checks that all came); None for a stream (BigTIFF, any length).
    metadata: the input's metadata (`data.metadata`), for the description, the
      resolution tags and the format; may also be set before the first write.
    overwrite: replace an existing file.
    bigtiff: write BigTIFF (default: when `frames` are unknown or above 4 GB).

  The file appears under `path` only once `finish()` and `publish()` (or `commit()`)
  succeed; a writer that received no frame leaves no file.
  """

  def __init__(self, path: str, frame_shape: Sequence[int] | None, dtype, *,
               frames: int | None = None, metadata: MovieMetadata | None = None,
               overwrite: bool = False, bigtiff: bool | None = None):
    self.frame_shape = None if frame_shape is None else tuple(int(n) for n in frame_shape)
    self.dtype = np.dtype(dtype)
    self.expected = None if frames is None else int(frames)
    self.bigtiff = bigtiff
    self.metadata = metadata
    self.count = 0
    self.closed = False
    self._tw: tifffile.TiffWriter | None = None
    self._format: Format | None = None
    self._text = os.fspath(path)
    spec = MovieSpec.parse(path)
    if spec.plane is not None or spec.channel is not None:
      raise ValueError(f"{path}: one plane or channel of a file is written by "
                       "SplitOutputs, not MovieWriter.")
    self.kind = output_format(spec)
    if self.kind == "caiman":  # the name holds the shape
      spec = spec.with_(path=written_path(spec, self.frame_shape, frames))
      self._text = spec.path
    self.target = spec.path  # the file or folder on disk (for its disk's free space)
    self._sink = None if self.kind == "tiff" else _sink(spec, self.kind)
    self._started = False
    self.file = AtomicFile(spec.path, overwrite=overwrite,
                           directory=self.kind in ("zarr", "suite2p"))

  @property
  def path(self) -> str:
    return self._text

  def _open(self) -> None:
    self._format = Format.choose(self.path, self.dtype, self.metadata)
    big = self.bigtiff
    if big is None:
      big = self.expected is None or movie_bytes(
          (self.expected,) + self.frame_shape, self.dtype) > BIGTIFF_BYTES
    self._tw = tifffile.TiffWriter(self.file.open(), bigtiff=big, byteorder="<",
                                   ome=False, imagej=False, shaped=False)
    self._page = {"photometric": "minisblack", "contiguous": True,
                  **self._format.page_kwargs()}

  def write(self, frames: np.ndarray) -> None:
    """Append frames (n, Y, X) or one frame (Y, X)."""
    if self.closed:
      raise RuntimeError(f"{self.path}: written after it was finished or aborted.")
    frames = np.asarray(frames)
    if frames.ndim == 2:
      frames = frames[None]
    if self.frame_shape is None:
      self.frame_shape = tuple(frames.shape[1:])
    try:
      frames = _checked_frames(self.path, frames, self.frame_shape, self.dtype)
    except (ValueError, TypeError):
      self.abort()
      raise
    if self._sink is not None:
      self._write_sink(frames)
      return
    with aborting(self):
      first = self._tw is None
      if first:
        self._open()
      for frame in frames:
        if first:
          self._tw.write(frame, description=_PLACEHOLDER,
                         extratags=self._format.extratags(), **self._page)
          first = False
        else:
          self._tw.write(frame, **self._page)
        self.count += 1

  def _write_sink(self, frames: np.ndarray) -> None:
    with aborting(self):
      if not self._started:
        self._started = True
        self._sink.open(self.file.reserve(), self.frame_shape, self.dtype, self.expected,
                        self.metadata)
      self._sink.write(self.count, frames)
      self.count += len(frames)

  def _check_count(self) -> None:
    if self.expected is not None and self.count != self.expected:
      self.abort()
      raise RuntimeError(f"{self.path}: {self.count} of {self.expected} frames were "
                         "written; the file was removed.")

  def finish(self) -> bool:
    """Write the description, close and fsync; False (no file) if no frame came."""
    if self.file.finished:
      return True
    self.closed = True
    if self._sink is not None:
      return self._finish_sink()
    if self._tw is None:
      self.file.abort()
      return False
    self._check_count()
    shape = (self.count,) + self.frame_shape
    with aborting(self):
      description = self._format.description(shape, self.dtype)
      self._tw.overwrite_description(description.encode("utf-8"))
      self._tw.close()
      self._tw = None
    return self.file.finish()

  def _finish_sink(self) -> bool:
    if not self._started:
      self.file.abort()
      return False
    self._check_count()
    with aborting(self):
      self._sink.close(self.count)
    return self.file.finish()

  def publish(self) -> None:
    self.file.publish()

  def abort(self) -> None:
    self.closed = True
    if self._sink is not None:
      with contextlib.suppress(Exception):
        self._sink.abort()
    if self._tw is not None:
      tw, self._tw = self._tw, None
      with contextlib.suppress(Exception):
        tw.close()
    self.file.abort()


class VolumeWriter:
  """Every plane and channel of a split recording in one HDF5 dataset or Zarr array,
  each movie written into its slice as it is denoised (`part`).

  Args:
    path: the output file (`den.h5`, `den.zarr:/x`, `den.ome.zarr`), in a format of
      VOLUME_FORMATS.
    axes: the recording's axes, letters of TZCYX in its file's order; the output keeps
      that order (an OME-Zarr output: time, channel, z, y, x, as OME-Zarr requires)
      and says it in its `axes` attribute and dimension names.
    shape: the recording's size along `axes`.
    dtype, metadata, overwrite: as for `MovieWriter`.

  The file is created with the first frames and appears under `path` only once every
  plane and channel is complete (the last part's `finish` and `publish`); an error in
  any part removes it.
  """

  def __init__(self, path: str, axes: str, shape: Sequence[int], dtype, *,
               metadata: MovieMetadata | None = None, overwrite: bool = False):
    spec = MovieSpec.parse(path).with_(plane=None, channel=None)
    self.kind = output_format(spec)
    if self.kind not in VOLUME_FORMATS:
      raise ValueError(f"{path}: {self.kind} outputs hold one movie; write one per plane.")
    self.path = str(spec)
    self.target = spec.path
    self.sink = _sink(spec, self.kind)
    sizes = dict(zip(axes, (int(n) for n in shape)))
    self.axes = self.sink.axes_for(axes)
    self.shape = tuple(sizes[a] for a in self.axes)
    self.sizes = {a: sizes.get(a, 1) for a in "TZCYX"}
    self.dtype = np.dtype(dtype)
    self.metadata = metadata
    self.done: set[tuple[int, int]] = set()
    self.array = None
    self.finished = False
    self.aborted = False
    self.file = AtomicFile(spec.path, overwrite=overwrite, directory=self.kind == "zarr")

  @property
  def complete(self) -> bool:
    return len(self.done) == self.sizes["Z"] * self.sizes["C"]

  def part(self, plane: int, channel: int) -> VolumePart:
    """The writer of plane `plane`, channel `channel` (T, Y, X)."""
    if not (0 <= plane < self.sizes["Z"] and 0 <= channel < self.sizes["C"]):
      raise ValueError(f"{self.path}: no plane {plane}, channel {channel} in "
                       f"{self.sizes['Z']} plane(s) x {self.sizes['C']} channel(s).")
    return VolumePart(self, plane, channel)

  def write(self, plane: int, channel: int, start: int, frames: np.ndarray) -> None:
    """Frames start.. of one plane and channel, (n, Y, X), into their slice."""
    if self.aborted:
      raise RuntimeError(f"{self.path}: written after it was removed.")
    with aborting(self):
      if self.array is None:
        self.array = self.sink.open_volume(self.file.reserve(), self.axes, self.shape,
                                           self.dtype, self.metadata)
      end = start + len(frames)
      index = tuple(slice(start, end) if a == "T" else plane if a == "Z" else
                    channel if a == "C" else slice(None) for a in self.axes)
      kept = [a for a in self.axes if a in "TYX"]
      self.array[index] = np.transpose(frames, ["TYX".index(a) for a in kept])

  def finish(self) -> bool:
    """Close and fsync the file once every part is done (else False: not yet)."""
    if self.finished:
      return True
    if not self.complete:
      return False
    with aborting(self):
      self.sink.close(self.sizes["T"])
    self.finished = self.file.finish()
    return self.finished

  def publish(self) -> None:
    if self.finished:
      self.file.publish()

  def abort(self) -> None:
    self.aborted = True
    with contextlib.suppress(Exception):
      self.sink.abort()
    self.file.abort()


class VolumePart:
  """One plane and channel of a `VolumeWriter`, written like a `MovieWriter`: its
  `finish` and `publish` finish and publish the file when it is the last part."""

  def __init__(self, volume: VolumeWriter, plane: int, channel: int):
    self.volume = volume
    self.key = (int(plane), int(channel))
    self.frame_shape = (volume.sizes["Y"], volume.sizes["X"])
    self.dtype = volume.dtype
    self.count = 0
    self.path = f"{volume.path}[plane={plane},channel={channel}]"

  def write(self, frames: np.ndarray) -> None:
    """Append frames (n, Y, X) or one frame (Y, X)."""
    if self.key in self.volume.done:
      raise RuntimeError(f"{self.path}: written after it was finished.")
    frames = np.asarray(frames)
    if frames.ndim == 2:
      frames = frames[None]
    try:
      frames = _checked_frames(self.path, frames, self.frame_shape, self.dtype)
      if self.count + len(frames) > self.volume.sizes["T"]:
        raise ValueError(f"{self.path}: more than the recording's "
                         f"{self.volume.sizes['T']} frames written.")
    except (ValueError, TypeError):
      self.abort()
      raise
    self.volume.write(*self.key, self.count, frames)
    self.count += len(frames)

  def finish(self) -> bool:
    """This part is complete (all its frames came); the file is closed with the last."""
    if self.count != self.volume.sizes["T"]:
      self.abort()
      raise RuntimeError(f"{self.path}: {self.count} of {self.volume.sizes['T']} frames "
                         "were written; the file was removed.")
    self.volume.done.add(self.key)
    self.volume.finish()
    return True

  def publish(self) -> None:
    self.volume.publish()

  def abort(self) -> None:
    self.volume.abort()


class SplitOutputs:
  """The movie writers of one run: a `MovieWriter` for each output, except the outputs
  named for one plane and channel of a split recording (`den.h5[plane=0,channel=1]`),
  which are parts of one `VolumeWriter` per file (created with the first part, so
  checked for space and locked then). As a context manager it removes, on any error,
  the files whose parts did not all come; that a file is left incomplete at the end
  of a run without an error is a bug, said as such."""

  def __init__(self) -> None:
    self.volumes: dict[str, VolumeWriter] = {}

  def writer(self, path: str, frame_shape: Sequence[int], dtype, *, frames: int,
             metadata: MovieMetadata | None = None, overwrite: bool = False,
             recording: tuple[str, tuple[int, ...]] | None = None
             ) -> MovieWriter | VolumePart:
    """The writer of output `path`.

    Args:
      path: the output, possibly one plane/channel of a file
        (`den.h5[plane=0,channel=1]`).
      frame_shape: a frame's (Y, X).
      dtype: the output's dtype.
      frames: the number of frames the output will hold.
      metadata: metadata written with it.
      overwrite: replace an existing file.
      recording: the axes and shape of the whole recording a plane/channel output
        belongs to (`Movie.recording`); required for those outputs.

    Returns:
      A `MovieWriter`, or for a plane/channel output its part of the file's
      `VolumeWriter` (created with the first part).
    """
    spec = MovieSpec.parse(path)
    if spec.plane is None and spec.channel is None:
      return MovieWriter(path, frame_shape, dtype, frames=frames, metadata=metadata,
                         overwrite=overwrite)
    if recording is None:
      raise ValueError(f"{path}: a plane/channel output needs its recording's layout.")
    whole = str(spec.with_(plane=None, channel=None))
    volume = self.volumes.get(whole)
    if volume is None:
      axes, shape = recording
      check_space([(spec.path, int(np.prod(shape)) * np.dtype(dtype).itemsize + 2**16)])
      volume = self.volumes[whole] = VolumeWriter(whole, axes, shape, dtype,
                                                  metadata=metadata, overwrite=overwrite)
    return volume.part(spec.plane or 0, spec.channel or 0)

  def abort(self) -> None:
    for volume in self.volumes.values():
      if not volume.file.done:
        volume.abort()

  def __enter__(self) -> SplitOutputs:
    return self

  def __exit__(self, kind, value, tb) -> None:
    left = [v.path for v in self.volumes.values() if not v.file.done]
    self.abort()
    if kind is None and left:
      raise RuntimeError(f"{', '.join(left)}: not every plane and channel was written; "
                         "the file was removed.")


def write_movie(path: str, frames: np.ndarray | Iterable[np.ndarray],
                shape: tuple[int, ...] | None = None, dtype=None, *,
                metadata: MovieMetadata | None = None, overwrite: bool = True) -> None:
  """Write a (T, Y, X) movie, from an array or from blocks of frames as they come.

  The file appears under its name only once complete (`MovieWriter`); its disk is
  checked for space first.

  Args:
    path: the output file.
    frames: a (T, Y, X) array, or an iterable of blocks of frames (each cast to `dtype`
      and reshaped to (n, Y, X)).
    shape, dtype: the movie's (T, Y, X) and dtype when `frames` is an iterable (taken
      from the array otherwise).
    metadata: metadata written with it.
    overwrite: replace an existing file (the default here).
  """
  if isinstance(frames, np.ndarray):
    shape, dtype = frames.shape, frames.dtype
    frames = [frames]
  dtype = np.dtype(dtype)
  shape = tuple(int(n) for n in shape)
  if len(shape) != 3:
    raise UserError(f"{path}: a movie is (T, Y, X); got shape {shape}.")
  check_space([output_space(path, shape, dtype)])
  with MovieWriter(path, shape[1:], dtype, frames=shape[0], metadata=metadata,
                   overwrite=overwrite) as w:
    for block in frames:
      w.write(np.asarray(block, dtype=dtype).reshape((-1,) + shape[1:]))
