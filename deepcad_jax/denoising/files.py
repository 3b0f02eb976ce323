"""Denoising files: output paths, writers, several processes sharing one movie, reports.

`denoise_files` is what `deepcad-jax denoise` runs: for each input movie it picks the
output's path and format, denoises it with a `Denoiser` and writes the frames (and the
uncertainty outputs) atomically, and reports what it wrote."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from deepcad_jax.runtime import distributed, resources
from deepcad_jax.model_io.checkpoint import Model
from deepcad_jax.config import DenoiseConfig
from deepcad_jax.data.movie import (Movie, list_movies, open_movie,
                                    refuse_to_overwrite)
from deepcad_jax.data.writers import (VOLUME_FORMATS, MovieWriter, SplitOutputs,
                                      movie_bytes, output_format, output_space,
                                      written_path)
from deepcad_jax.runtime.files import (PARTIAL_SUFFIX, check_space, os_error,
                                       outputs_together, write_bytes)
from deepcad_jax.data.spec import (MovieSpec, is_store, part_suffix, split_name,
                                   with_name_suffix)
from deepcad_jax.errors import UserError
from deepcad_jax.denoising.denoiser import INFER_FIX, Denoiser, as_denoiser
from deepcad_jax.denoising import brightness as brightness_lib
from deepcad_jax.denoising.outputs import (DenoiseStats, quantisation_note,
                                           resolve_output_dtype)

log = logging.getLogger("deepcad_jax")


# ------------------------------------------------------------------ files


@dataclasses.dataclass
class FileReport:
  input: str
  output: str
  shape: tuple[int, int, int]
  dtype: str
  tiles: int
  tiling: str
  recompute: float
  seconds: float
  voxels_per_s: float
  clipped: int
  rounding_rms: float = 0.0   # quantisation noise added by an integer output (counts)
  std: str | None = None      # the std movie written beside the output (uncertainty)
  samples: tuple[str, ...] = ()  # the sample movies (save_samples)
  spread_over: str = ""       # what the std spans: "K symmetries x M members"
  warning: str | None = None  # a collapsed or weak model (`quality_warning`)
  brightness: dict | None = None  # the regional correction (`brightness.Correction`)
  brightness_note: str = ""   # it, in words

  def describe(self) -> str:
    """The report's lines for the command line."""
    lines = [f"{self.input} -> {self.output}  {self.shape} {self.dtype}  "
             f"{self.seconds:.2f}s  {self.voxels_per_s:.3g} voxels/s  clipped "
             f"{self.clipped}", f"  tiling: {self.tiling}"]
    if self.brightness_note:
      lines.append(f"  {self.brightness_note}")
    if self.std:
      lines.append(f"  uncertainty (std over {self.spread_over}): {self.std}")
    if self.samples:
      lines.append(f"  samples: {self.samples[0]} .. {self.samples[-1]}")
    if self.warning:
      lines.append(self.warning)
    return "\n".join(lines)


def _output_paths(inputs: list[str], src: str, output: str, together: bool = True
                  ) -> list[str]:
  """Where each input movie goes. Into a folder: the input's name (and format; a raw
  binary gives a TIFF); a recording split into planes and channels: into an HDF5 or
  Zarr output, its slice of one file holding them all (`den.h5[plane=0,channel=1]`,
  when the whole recording is denoised and `together`), else one output each, named
  `*_plane0_ch1` (suite2p: a plane folder each)."""
  src_spec, out_spec = MovieSpec.parse(src), MovieSpec.parse(output)
  together = together and src_spec.plane is None and src_spec.channel is None
  src_folder = os.path.isdir(src_spec.path) and not is_store(src_spec.path) and \
      src_spec.format is None
  out_folder = os.path.isdir(out_spec.path) and not is_store(out_spec.path) and \
      out_spec.is_plain
  if src_folder and os.path.exists(out_spec.path) and not out_folder:
    raise UserError(f"--input {src} is a folder, so --output must be a folder; "
                    f"{output} is a file.")
  outputs = []
  for p in inputs:
    spec = MovieSpec.parse(p)
    if src_folder or out_folder:
      dst = _named_like(spec, out_spec.path)
    else:
      output_format(output)  # one sentence if the format cannot be told
      dst = output
    outputs.append(_part_output(dst, spec, together))
  return outputs


def output_pairs(input: str, output: str) -> list[tuple[str, str]]:
  """(movie, output) for each movie `denoise_files` denoises from `input` (a movie or a
  folder) into `output`."""
  inputs = list_movies(os.fspath(input))
  return list(zip(inputs, _output_paths(inputs, os.fspath(input), os.fspath(output),
                                        together=jax.process_count() == 1)))


def _named_like(spec: MovieSpec, folder: str) -> str:
  """The output in `folder` for input `spec`: the same name and format."""
  kind = spec.kind
  name = os.path.basename(spec.path.rstrip("/"))
  if kind == "raw":
    return os.path.join(folder, split_name(name)[0] + ".tif")
  path = os.path.join(folder, name)
  return f"{kind}:{path}" if kind == "suite2p" or spec.format else path


def _part_output(dst: str, spec: MovieSpec, together: bool = False) -> str:
  """`dst` for one plane and channel of a split recording: its slice of `dst`
  ('den.h5[plane=0,channel=1]') when `together` and the format holds them all, else
  its own file ('den_plane0_ch1.tif'; a suite2p output: plane folders 'plane0',
  'plane1', ... beside the one named)."""
  if spec.plane is None and spec.channel is None:
    return dst
  out = MovieSpec.parse(dst)
  if together and out.kind in VOLUME_FORMATS:
    return str(out.with_(plane=spec.plane, channel=spec.channel))
  if out.kind == "suite2p":
    name = "".join([f"plane{spec.plane}" if spec.plane is not None else "plane0",
                    f"_ch{spec.channel}" if spec.channel is not None else ""])
    return str(out.with_(path=os.path.join(os.path.dirname(out.path.rstrip("/")), name),
                         format="suite2p"))
  return with_name_suffix(dst, part_suffix(spec, 2, 2))


def _report(movie: Movie, dst: str, den: Denoiser, out_dtype, stats: DenoiseStats,
            seconds: float | None = None,
            correction: brightness_lib.Correction | None = None) -> FileReport:
  seconds = stats.seconds if seconds is None else seconds
  extras = den.extra_outputs(dst)
  members = den.model.config.model.ensemble
  spread = f"{den.symmetries} symmetries" + (f" x {members} members" if members > 1
                                              else "")
  return FileReport(movie.name, dst, movie.shape, str(out_dtype), stats.tiles,
                    stats.tiling, stats.recompute, seconds,
                    float(np.prod(movie.shape)) / seconds if seconds else 0.0,
                    stats.clipped, stats.rounding_rms, extras[0] if extras else None,
                    tuple(extras[1:]), spread if extras else "",
                    quality_warning(movie, dst, den, stats),
                    correction.to_json() if correction else None,
                    correction.describe() if correction else "")


COLLAPSED_SPREAD = 1e-3  # output temporal std / the input's spread below this: collapsed


def quality_warning(movie: Movie, dst: str, den: Denoiser, stats: DenoiseStats
                    ) -> str | None:
  """One line when the output hardly varies in time (a collapsed model) or the model
  was found no better than a simple temporal filter on its held-out frames (the
  verdicts of `analysis.score`, recorded with the model)."""
  if stats.spread is not None and stats.spread.n > 1 and movie.shape[0] > 1:
    out_std = float(np.sqrt(stats.spread.variance()))
    spread = movie.spread()
    if spread > 0 and out_std < COLLAPSED_SPREAD * spread:
      return (f"WARNING: {dst} hardly changes over time (temporal std {out_std:.3g} "
              f"against an intensity spread of {spread:.3g} in {movie.name}): the model "
              f"{den.model.source} has collapsed; train it again with --fresh (another "
              "--seed, or a lower --lr) and check `deepcad-jax score`.")
  verdict = (den.model.meta.holdout_quality or {}).get("verdict")
  if verdict in ("collapsed", "no better than a baseline"):
    return (f"WARNING: {den.model.source} was {verdict} on its held-out frames when it "
            "was trained (see `deepcad-jax score`); the denoised movie may be no better "
            "than a temporal filter of the raw one.")
  return None


def _write_one(movie: Movie, dst: str, den: Denoiser, out_dtype, progress: bool,
               overwrite: bool = False, outputs: SplitOutputs | None = None,
               brightness: str = "regional") -> FileReport:
  """Denoise one movie into `dst` (and its std and samples beside it), written as it
  is produced; the files appear together once all are complete (a plane's slice of a
  file: once every plane is, `outputs`). With the regional brightness correction the
  float32 frames wait in a temporary file beside `dst` until the correction is
  fitted, then are written corrected."""
  stats = DenoiseStats()
  correction = None
  log.info("Denoising %s %s -> %s", movie.name, movie.shape, dst)
  spill = _spill_path(dst) if brightness == "regional" else None
  with _movie_writers(dst, den.extra_outputs(dst), movie, out_dtype, overwrite,
                      outputs, spill, den.channels) as writers:
    if spill is None:
      frames = den.frames(movie, out_dtype=out_dtype, stats=stats, progress=progress)
      _write_frames(((f.data, f.extras) for f in frames), writers)
    else:
      try:
        store = _open_spill(spill, movie.shape, den.channels)
        correction = brightness_lib.fit(movie, den.blocks(movie, stats, progress=progress),
                                        den.model.config, store)
        _write_frames(brightness_lib.correct(brightness_lib.chunks(store), correction,
                                             out_dtype, stats), writers)
        del store
      except OSError as e:
        raise os_error(e, spill) from None
      finally:
        with contextlib.suppress(OSError):
          os.remove(spill)
  note = quantisation_note(dst, out_dtype, stats)
  if note:
    log.warning("%s", note)
  return _report(movie, dst, den, out_dtype, stats, correction=correction)


def _spill_path(dst: str) -> str:
  """Where the float32 frames of `dst` wait for the brightness correction: a temporary
  file beside it (on its disk, whose space is checked)."""
  folder, name = os.path.split(os.path.abspath(MovieSpec.parse(dst).path.rstrip("/")))
  return os.path.join(folder, f".{name}.float32{PARTIAL_SUFFIX}")


def _open_spill(path: str, shape: Sequence[int], channels: int) -> np.ndarray:
  return np.lib.format.open_memmap(path, "w+", np.float32, tuple(shape) + (
      (channels,) if channels else ()))


@contextlib.contextmanager
def _movie_writers(dst: str, extras: Sequence[str], movie: Movie, out_dtype,
                   overwrite: bool, outputs: SplitOutputs | None = None,
                   spill: str | None = None, channels: int = 0
                   ) -> Iterator[list[MovieWriter]]:
  """Writers for `dst` and its extra (float32) outputs, with the input's metadata, after
  checking their disk has room (and for the `spill` file of float32 frames with
  `channels`); committed together when the block succeeds, all removed if it fails."""
  shape = movie.shape
  needed = [output_space(dst, shape, out_dtype)] + [
      output_space(p, shape, np.float32) for p in extras]
  if spill:
    needed.append((spill, movie_bytes(shape, np.float32) * max(1, channels)))
  check_space(needed)
  metadata = movie.metadata
  outputs = outputs if outputs is not None else SplitOutputs()
  with outputs_together() as writers:
    for path, dtype in [(dst, out_dtype)] + [(p, np.float32) for p in extras]:
      writers.append(outputs.writer(path, shape[1:], dtype, frames=shape[0],
                                    metadata=metadata, overwrite=overwrite,
                                    recording=movie.recording))
    yield writers


def _write_frames(blocks: Iterator[tuple[np.ndarray, np.ndarray | None]],
                  writers: Sequence[MovieWriter]) -> None:
  """Each block's frames to writers[0], extra channel i (float32) to writers[1 + i]."""
  for data, extras in blocks:
    writers[0].write(data)
    for i, w in enumerate(writers[1:]):
      w.write(extras[..., i])


def _part_path(dst: str, p: int) -> str:
  """Process p's share of a shared movie: a temporary file beside `dst`."""
  folder, name = os.path.split(os.path.abspath(dst))
  return os.path.join(folder, f".{name}.part{p}{PARTIAL_SUFFIX}")


def _write_shared(movie: Movie, dst: str, den: Denoiser, out_dtype, progress: bool,
                  overwrite: bool = False, brightness: str = "regional"
                  ) -> FileReport | None:
  """One movie denoised by every process: each does a contiguous range of temporal
  slabs into a part file; process 0 assembles `dst` (and its std and samples) from the
  parts."""
  p, n_proc = jax.process_index(), jax.process_count()
  plan = den.plan(movie.shape, movie.dtype)
  a, b = plan.split(n_proc)[p]
  channels = den.channels
  stats = DenoiseStats()
  t0 = time.perf_counter()
  part = _part_path(dst, p)
  try:
    check_space([(part, movie_bytes(movie.shape, np.float32) * max(1, channels) //
                  n_proc)])
    with open(part, "wb") as f:
      if b > a:
        for block in den.blocks(movie, stats, progress=progress, slabs=(a, b)):
          f.write(np.ascontiguousarray(block, np.float32).tobytes())
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(part)
    raise os_error(e, dst) from None
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(part)
    raise
  distributed.barrier(f"parts-{dst}")
  report = None
  if p == 0:
    frame_shape = movie.shape[1:] + ((channels,) if channels else ())

    def parts():  # every process's float32 frames, in order, 64 at a time
      for q in range(n_proc):
        data = np.memmap(_part_path(dst, q), np.float32, "r") if os.path.getsize(
            _part_path(dst, q)) else np.zeros(0, np.float32)
        yield from brightness_lib.chunks(data.reshape((-1,) + frame_shape))
        del data

    correction = None
    try:
      if brightness == "regional":  # the parts hold the float32 frames: fit, then write
        correction = brightness_lib.fit(movie, parts(), den.model.config)
      with _movie_writers(dst, den.extra_outputs(dst), movie, out_dtype,
                          overwrite) as writers:
        _write_frames(brightness_lib.correct(parts(), correction, out_dtype, stats),
                      writers)
    finally:
      for q in range(n_proc):
        with contextlib.suppress(OSError):
          os.remove(_part_path(dst, q))
    report = _report(movie, dst, den, out_dtype, stats, time.perf_counter() - t0,
                     correction)
  distributed.barrier(f"assembled-{dst}")
  return report


# What a folder run's output was made from, recorded beside it: a rerun skips an output
# only if it was made from the same input (and model), not merely of the same name.
MADE_FROM = ".{}.made-from.json"


def made_from_path(dst: str) -> str:
  """The provenance record of output `dst`: `.NAME.made-from.json` beside it."""
  folder, name = os.path.split(MovieSpec.parse(dst).path.rstrip("/"))
  return os.path.join(folder, MADE_FROM.format(name))


def _made_from(src: str, den: Denoiser) -> dict:
  """The input file (its real path, size and modification time) and the model."""
  path = os.path.realpath(MovieSpec.parse(src).path)
  st = os.stat(path)
  return {"input": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
          "model": os.path.realpath(den.model.source) if os.path.exists(
              den.model.source) else den.model.source, "step": den.model.meta.step}


def _other_origin(dst: str, src: str, den: Denoiser) -> str | None:
  """Why `dst` was not made from `src` with this model (None: it was)."""
  try:
    with open(made_from_path(dst)) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return "nothing records what it was made from"
  now = _made_from(src, den)
  if not isinstance(record, dict) or record.get("input") != now["input"]:
    return f"it was made from {record.get('input') if isinstance(record, dict) else '?'}"
  if (record.get("size"), record.get("mtime_ns")) != (now["size"], now["mtime_ns"]):
    return f"{src} has changed since"
  if (record.get("model"), record.get("step")) != (now["model"], now["step"]):
    return (f"it was made with the model {record.get('model')} (step "
            f"{record.get('step')})")
  return None


def _record_made_from(dst: str, src: str, den: Denoiser) -> None:
  write_bytes(made_from_path(dst), json.dumps(_made_from(src, den), indent=1).encode())


def _refuse_shared_outputs(inputs: Sequence[str], outputs: Sequence[str]) -> None:
  """Two inputs of one run never go to the same output (a.raw and a.tif both give
  a.tif)."""
  seen: dict[str, str] = {}
  for src, dst in zip(inputs, outputs):
    if dst in seen:
      raise UserError(f"{seen[dst]} and {src} would both be written to {dst}; rename "
                      "one of them, or denoise them into separate folders.")
    seen[dst] = src


def _complete_output(paths: Sequence[str], movie: Movie, out_dtype) -> str | None:
  """Why the existing outputs `paths` of `movie` are not a complete earlier result
  (None: they are: all there, readable, of its shape and the dtypes asked for)."""
  for i, path in enumerate(paths):
    if not os.path.lexists(MovieSpec.parse(path).path):
      return f"{path} is missing"
    try:
      out = open_movie(path)
    except UserError:
      return f"{path} is not a readable movie"
    want = np.dtype(out_dtype if i == 0 else np.float32)
    if out.shape != movie.shape or out.dtype != want:
      return (f"{path} is {'x'.join(map(str, out.shape))} {out.dtype}, not "
              f"{'x'.join(map(str, movie.shape))} {want.name}")
  return None


@resources.device_memory("denoising", INFER_FIX)
def denoise_files(input: str, output: str, model: Model | str | Denoiser,
                  config: DenoiseConfig | None = None, *,
                  overwrite: bool = False, output_dtype: Any = None,
                  progress: bool = True, devices: Sequence[jax.Device] | None = None,
                  brightness: str = "regional",
                  also_writes: Callable[[Movie, str], Sequence[str]] | None = None,
                  **options: Any) -> list[FileReport]:
  """Denoise a TIFF file or a folder of them, writing each output as it is produced.

  Each output carries the input's metadata and appears only once complete
  (`runtime.files`). An input is never written over; for a folder, outputs already
  complete from an earlier run are skipped (a rerun after a failure finishes the rest),
  and a missing output folder is created. With `symmetries` the std movie is written
  beside each output as `*_std.tif`, and with `save_samples` each sample as
  `*_sample00.tif`, ... On several processes (`jax.distributed`), the files of a folder
  are split between them, and a single movie's temporal slabs are; each process uses
  its own devices.

  Args:
    input: a movie (TIFF, HDF5, NWB, Zarr...) or a folder of them.
    output: the output file, or folder for a folder input.
    model: as for `denoise` (a `Model`, model directory, .pth or `Denoiser`).
    config: as for `denoise`.
    overwrite: replace existing outputs (else they are refused; in a folder, complete
      ones are skipped).
    output_dtype: None (float32, the network's precision), 'input' (the input's
      dtype) or a dtype.
    progress: print a progress line.
    devices: the devices to use (default: all; on several processes, the local ones).
    brightness: as for `denoise` ('regional': each region keeps the raw movie's mean;
      'model': the network's output as it is).
    also_writes: for a caller that writes more beside each output afterwards (the
      calibrated uncertainty): called with each movie and its output before anything
      is denoised; it returns those further paths (refused like the outputs when they
      exist, unless `overwrite`) and may refuse the movie with a `UserError`. In a
      folder, a complete output none of whose further paths exist is skipped and
      logged as such (the caller writes them).
    **options: `DenoiseConfig` fields, as for `denoise`.

  Returns:
    One `FileReport` per movie this process denoised (none for skipped outputs).
  """
  input, output = os.fspath(input), os.fspath(output)
  brightness_lib.check_mode(brightness)
  inputs, outputs = map(list, zip(*output_pairs(input, output)))
  _refuse_shared_outputs(inputs, outputs)
  folder = os.path.isdir(input) and not is_store(input)
  n_proc = jax.process_count()
  if n_proc > 1 and devices is None and not isinstance(model, Denoiser):
    devices = jax.local_devices()
  den = as_denoiser(model, config, devices, **options)
  movies = [open_movie(p) for p in inputs]
  todo, pending = [], 0
  for src, movie, dst in zip(inputs, movies, outputs):
    src_path = MovieSpec.parse(src).path
    dst_path = written_path(dst, movie.shape[1:], movie.shape[0])
    if os.path.exists(dst_path) and os.path.samefile(src_path, dst_path):
      raise UserError(f"--output {dst} is the input file; choose another output.")
    out_dtype = resolve_output_dtype(output_dtype, movie.dtype)
    paths = [dst] + den.extra_outputs(dst)
    if folder and not overwrite and any(os.path.lexists(MovieSpec.parse(p).path)
                                        for p in paths):
      why = _complete_output(paths, movie, out_dtype) or _other_origin(dst, src, den)
      if why is None:
        beside = also_writes(movie, dst) if also_writes is not None else []
        if beside and not any(os.path.lexists(MovieSpec.parse(p).path) for p in beside):
          pending += 1  # the caller writes them
          log.info("skipping %s: %s is already complete (what goes beside it is not).",
                   src, dst)
        else:
          log.info("skipping %s: %s is already complete (--overwrite redoes it).", src,
                   dst)
        continue
      existing = next(p for p in paths if os.path.lexists(MovieSpec.parse(p).path))
      raise UserError(f"{existing} already exists but is not a complete output of {src} "
                      f"({why}); add --overwrite to redo it, or remove it.")
    refuse_to_overwrite(paths, overwrite)
    if also_writes is not None:
      refuse_to_overwrite(also_writes(movie, dst), overwrite)
    todo.append((src, movie, dst, out_dtype))
  if folder:
    if not todo and not pending:
      log.info("every output in %s is already complete; nothing to do (--overwrite "
               "redoes them).", output)
    try:
      os.makedirs(output, exist_ok=True)
    except OSError as e:
      raise os_error(e, output) from None
  distributed.barrier("denoise-checked")  # every process has checked before any writes
  reports = []
  shared = n_proc > 1 and len(todo) == 1
  with SplitOutputs() as split:  # a file of every plane appears with the last one
    for i, (src, movie, dst, out_dtype) in enumerate(todo):
      try:
        if shared:
          report = _write_shared(movie, dst, den, out_dtype, progress, overwrite,
                                 brightness)
        elif i % n_proc == jax.process_index():
          report = _write_one(movie, dst, den, out_dtype, progress, overwrite,
                              split, brightness)
        else:
          continue
      except UserError:
        if folder and i:
          log.info("%d of the %d movies of %s were denoised before this error; run the "
                   "same command again to do the rest (finished outputs are skipped).", i,
                   len(todo), input)
        raise
      if report is None:
        continue
      if folder:
        _record_made_from(dst, src, den)
      if report.clipped:
        log.warning("%d voxels (%.3g%%) of %s were outside the %s range and were clipped.",
                    report.clipped, 100 * report.clipped / np.prod(movie.shape), dst,
                    out_dtype)
      reports.append(report)
  distributed.barrier("denoise-done")
  return reports
