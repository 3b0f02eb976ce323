"""Calibrated uncertainty written to files: `*_std.tif`, `*_uncertainty.json` and the
samples, for a recording of any length (in segments when it does not fit in memory),
and the command line's one-line report."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from deepcad_jax.analysis import noise as noise_lib
from deepcad_jax.analysis.uncertainty.bootstrap import (MIN_FRAMES, Settings, Uncertainty,
                                                        check_frames,
                                                        calibrate_arrays, open_recording)
from deepcad_jax.data.movie import as_movie
from deepcad_jax.data.spec import MovieSpec, part_suffix, with_name_suffix
from deepcad_jax.data.writers import MovieWriter
from deepcad_jax.denoising import brightness as brightness_lib
from deepcad_jax.denoising.outputs import sample_path, std_path
from deepcad_jax.errors import UserError
from deepcad_jax.runtime import resources
from deepcad_jax.runtime.files import AtomicFile, format_bytes, outputs_together

log = logging.getLogger("deepcad_jax")

# Of the host's available memory, what one segment's arrays may take: the network's
# tiles take from the rest (the engine sizes them to the memory left).
SEGMENT_MEMORY_SHARE = 0.5


def segment_spans(frames: int, frame_bytes: float, margin: int, available: int | None,
                  minimum: int, segment_frames: int | None = None
                  ) -> list[tuple[int, int]] | None:
  """[a, b) spans of about equal length that cover `frames`: one when the whole
  recording fits in SEGMENT_MEMORY_SHARE of the `available` bytes (or `segment_frames`
  asks for no fewer frames), else the fewest whose frames and `margin` frames either side
  fit; None when such a span would be shorter than `minimum` frames."""
  if segment_frames is not None:
    length = min(max(1, int(segment_frames)), frames)
  elif available is None or frames * frame_bytes <= SEGMENT_MEMORY_SHARE * available:
    length = frames
  else:
    length = min(frames, int(SEGMENT_MEMORY_SHARE * available // frame_bytes) - 2 * margin)
  if length < frames and length < minimum:
    return None
  count = -(-frames // length)
  bounds = np.linspace(0, frames, count + 1).round().astype(int)
  return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def planned_outputs(movie: Any, output: str, *, draws: int, keep_samples: bool
                    ) -> list[str]:
  """The files `write_calibrated_uncertainty` writes beside `output` for `movie`
  (`*_std.tif`, `*_uncertainty.json`, the samples); a movie too short for the held-out
  check is refused here in one sentence, so the CLI asks before it denoises."""
  check_frames(as_movie(movie, "the raw movie"), "calibrated uncertainty", MIN_FRAMES,
               "for its held-out check", "leave --uncertainty out for this movie")
  return uncertainty_paths(output, draws if keep_samples else 0)


def uncertainty_paths(output: str, samples: int) -> list[str]:
  """`*_std`, `*_uncertainty.json` and `samples` sample names beside `output` (of
  `uncertainty_base(output)`)."""
  base = uncertainty_base(output)
  return ([std_path(base), record_path(base)]
          + [sample_path(base, i) for i in range(samples)])


def uncertainty_base(output: str) -> str:
  """The name the uncertainty files of `output` are made from: `output` itself, or for
  one plane or channel of a shared HDF5, Zarr or NWB file (`den.h5[plane=0]`) a name
  of its own (`den_plane0.h5`), since each is written whole, one movie at a time."""
  spec = MovieSpec.parse(output)
  if spec.plane is None and spec.channel is None:
    return output
  return with_name_suffix(str(spec.with_(plane=None, channel=None)), part_suffix(spec, 2, 2))


def _exists(path: str) -> bool:
  return os.path.lexists(MovieSpec.parse(path).path)


def unfinished(pairs: list[tuple[str, str]], draws: int, keep_samples: bool
               ) -> list[tuple[str, str]]:
  """The (movie, denoised output) pairs whose output is there but none of whose
  uncertainty files are: a folder run stopped between the two (`denoise` skips the
  complete outputs, so its rerun does only the uncertainty of these)."""
  return [(src, dst) for src, dst in pairs if _exists(dst) and not any(
      _exists(p) for p in planned_outputs(src, dst, draws=draws, keep_samples=keep_samples))]


def write_calibrated_uncertainty(movie: Any, model: Any, estimate: Any, output: str, *,
                                 overwrite: bool = False, segment_frames: int | None = None,
                                 **options: Any) -> tuple[list[str], dict]:
  """The calibrated uncertainty of a recording of any length, written beside `output`
  as `write_uncertainty` writes it; returns (paths, record).

  A recording whose working set (`Settings.bytes_per_voxel`) fits in the host's memory
  is done whole, exactly as `calibrated_uncertainty`. A longer one is done in segments
  of equal length, each read with half a network patch of frames either side (context
  for the network; those frames are not written), with its own noise model, draws,
  bias probes and held-out check; the record lists them (`segments`). A segment
  shorter than the brightness correction's cross-validation needs (4 patches) corrects
  each draw by one offset, which widens the std a little where the estimate's regional
  correction does better.

  Args:
    movie: the raw recording (path, array or `Movie`).
    model: a `Model`, model directory or `Denoiser` (without uncertainty symmetries).
    estimate: its denoised movie (path, array or `Movie`), as `denoise` wrote it.
    output: the denoised movie's path: the outputs go beside it.
    overwrite: replace earlier outputs.
    segment_frames: frames per segment (default: as many as the memory allows).
    **options: `calibrated_uncertainty`'s settings (draws, seed, scale_mode,
      keep_samples, holdout_every, bins, box, bias_probes, brightness, progress).
  """
  settings = Settings(**options).check()
  den, mv, mean, nscale = open_recording(model, movie, "calibrated uncertainty",
                                         MIN_FRAMES, "for its held-out check")
  est = as_movie(estimate, "the denoised movie")
  if tuple(est.shape) != tuple(mv.shape):
    raise UserError(f"the denoised movie is {tuple(est.shape)} but {mv.name} is "
                    f"{tuple(mv.shape)}; give the denoised version of this recording.")
  frames, frame_shape = int(mv.shape[0]), tuple(int(v) for v in mv.shape[1:])
  margin = brightness_lib.patch_frames(den.model.config) // 2
  frame_bytes = float(np.prod(frame_shape)) * settings.bytes_per_voxel()
  available = resources.host_available_bytes()
  spans = segment_spans(frames, frame_bytes, margin, available, MIN_FRAMES,
                        segment_frames)
  if spans is None:
    need = (MIN_FRAMES + 2 * margin) * frame_bytes / SEGMENT_MEMORY_SHARE
    raise UserError(f"calibrated uncertainty of {mv.name} {tuple(mv.shape)} needs at least "
                    f"{format_bytes(need)} for segments of {MIN_FRAMES} frames (and "
                    f"{margin} more either side); this machine has "
                    f"{format_bytes(available)}; use a machine with more memory, fewer "
                    f"--bias-probes, or leave --save-samples out.")
  paths = planned_outputs(mv, output, draws=settings.draws,
                          keep_samples=settings.keep_samples)
  parts = []
  with outputs_together() as files:
    std_writer = MovieWriter(paths[0], frame_shape, np.float32, frames=frames,
                             overwrite=overwrite)
    files.append(std_writer)
    sample_writers = []
    for path in paths[2:]:
      sample_writers.append(MovieWriter(path, frame_shape, np.float32, frames=frames,
                                        overwrite=overwrite))
      files.append(sample_writers[-1])
    for i, (a, b) in enumerate(spans):
      lo, hi = (a, b) if len(spans) == 1 else (max(0, a - margin), min(frames, b + margin))
      if len(spans) > 1 and settings.progress:
        log.info("segment %d/%d: frames %d:%d (read %d:%d)", i + 1, len(spans), a, b,
                 lo, hi)
      raw = mv.read(lo, hi).astype(np.float32)
      nm = noise_lib.fit_movie(raw, name=mv.name)
      result = calibrate_arrays(den, raw, est.read(lo, hi), nm, mean, nscale, settings)
      keep = slice(a - lo, b - lo)
      std_writer.write(result.std[keep])
      for w, sample in zip(sample_writers, [] if result.samples is None else
                           result.samples):
        w.write(sample[keep])
      parts.append(((a, b), (lo, hi), result.record))
    record = merge_records(parts, frames)
    record.update(std=paths[0], samples_files=paths[2:])
    files.append(AtomicFile(paths[1], overwrite=overwrite))
    json.dump(record, files[-1].text(), indent=1)
  return paths, record


def merge_records(parts: list[tuple[tuple[int, int], tuple[int, int], dict]], frames: int
                  ) -> dict:
  """One record for the segments ((written frames), (read frames), record): a single
  segment's own record, or the settings, the segments' checks and the totals."""
  if len(parts) == 1:
    return dict(parts[0][2])
  first = parts[0][2]
  record = {k: first[k] for k in ("method", "draws", "seed", "scale_mode", "brightness",
                                   "heldout_every", "check_box", "bias_probes", "samples")}
  record["segments"] = [
      {"frames": list(span), "read": list(read),
       **{k: r[k] for k in ("verdict", "check", "heldout_scale", "scale", "noise_model",
                            "bias_split", "mean_std")}}
      for span, read, r in parts]
  consistent = sum(r["verdict"]["verdict"].startswith("consistent") for _, _, r in parts)
  record["verdict"] = {"verdict": f"{consistent} of {len(parts)} segments consistent "
                                  "with the bootstrap", "segments": len(parts)}
  read = sum(hi - lo for _, (lo, hi), _ in parts)
  record["network_passes_per_voxel"] = round(
      first["network_passes_per_voxel"] * read / frames, 2)
  record["mean_std"] = float(sum(r["mean_std"] * (b - a) for (a, b), _, r in parts)
                             / frames)
  record["shape"] = [frames] + first["shape"][1:]
  return record


def record_path(output: str) -> str:
  """Where the record of `output`'s calibrated uncertainty goes: `*_uncertainty.json`
  beside it."""
  path = with_name_suffix(output, "_uncertainty")
  stem = path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path
  return stem + ".json"


def write_uncertainty(result: Uncertainty, output: str, *, overwrite: bool = False
                      ) -> list[str]:
  """`*_std.tif` (float32), `*_uncertainty.json` and, with samples, `*_sample00.tif`...
  beside `output`, all together once complete; returns their paths."""
  samples = [] if result.samples is None else result.samples
  paths = uncertainty_paths(output, len(samples))
  with outputs_together() as files:
    for path, movie in zip(paths[:1] + paths[2:], [result.std, *samples]):
      files.append(MovieWriter(path, movie.shape[1:], np.float32, frames=len(movie),
                               overwrite=overwrite))
      files[-1].write(movie)
    record = dict(result.record, std=paths[0], samples_files=paths[2:])
    files.append(AtomicFile(paths[1], overwrite=overwrite))
    json.dump(record, files[-1].text(), indent=1)
  return paths


def describe(record: dict, paths: list[str]) -> str:
  """One line for the command line."""
  if "segments" in record:
    scale = f"{len(record['segments'])} segments of about " + str(
        round(record["shape"][0] / len(record["segments"]))) + " frames"
  elif record["scale_mode"] == "bins":
    scale = "scales by activity bin " + ", ".join(f"{r['scale']:.3g}" for r in record["check"])
  else:
    scale = f"scale {record['scale']:.3g}"
  parts = record.get("segments") or [record]
  probes = record.get("bias_probes") or 0
  bias = ""
  if probes:
    bias_sq = np.mean([p["bias_split"]["bias_sq"] for p in parts])
    mean_sq = np.mean([p["bias_split"]["mean_deviation_sq"] for p in parts])
    bias = (f"; bias told apart in {probes} probe pass{'es' if probes > 1 else ''}: "
            f"bias^2 {bias_sq:.3g} of mean deviation^2 {mean_sq:.3g}")
  where = "held-out check" if "segments" in record else "held-out check over all pixels"
  return (f"  calibrated uncertainty ({record['draws']} bootstrap draws{bias}; {where}: "
          f"{record['verdict']['verdict']}; {scale}; "
          f"{record['network_passes_per_voxel']} network passes per voxel): {paths[0]}, "
          f"{paths[1]}" + (f", {len(paths) - 2} samples" if len(paths) > 2 else ""))
