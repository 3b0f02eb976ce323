"""Tiled, batched, sharded inference over whole recordings, in bounded memory.

The movie is processed in temporal slabs (one row of patches in T at a time): a slab is
read (memory map or page range), normalised and padded; its patches go through one
jit-compiled network call per fixed-shape batch, sharded over all devices; the host
stitches batch i-1 while the device runs batch i; finished frames are yielded as soon as
no later patch can touch them. Peak host memory is a few slabs, not the movie.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepcad_jax import distributed, parallel
from deepcad_jax.augment import apply_symmetry, invert_symmetry, symmetries_for
from deepcad_jax.checkpoint import Model, load_model
from deepcad_jax.data.movie import (Movie, as_movie, list_movies, open_movie,
                                    refuse_to_overwrite, write_movie)
from deepcad_jax.errors import UserError
from deepcad_jax.model import UNet3D
from deepcad_jax.progress import Progress
from deepcad_jax.tiling import (AxisTile, Patch, axis_plan, blend_weights, gap,
                                padded_patch, patch_plan)

log = logging.getLogger("deepcad_jax")

NetworkFn = Callable[[jax.Array], jax.Array]  # (B, T, Y, X) -> (B, T, Y, X)


@dataclasses.dataclass
class DenoiseStats:
  """What one denoising pass did (filled in as it runs)."""

  shape: tuple[int, int, int] = (0, 0, 0)
  patch: tuple[int, int, int] = (0, 0, 0)
  patches: int = 0
  seconds: float = 0.0

  @property
  def voxels_per_s(self) -> float:
    return float(np.prod(self.shape)) / self.seconds if self.seconds else 0.0


def resolve_model(model: Model | str | os.PathLike) -> Model:
  if isinstance(model, Model):
    return model
  return load_model(os.fspath(model))


def network_fn(model: Model, dtype: str = "float32", devices=None, spatial: int = 1,
               samples: int = 0) -> tuple[NetworkFn, Any]:
  """The jit-compiled patch network (batch sharded over a mesh of `devices`; with
  `spatial > 1`, each patch's Y axis split over that many devices too).

  With `samples` = K >= 2 it predicts each patch under K symmetries of the (y, x) plane
  (each inverted back) and returns (B, T, Y, X, 2): their mean and standard deviation
  (the latter times the model's calibration factor, if it has one).
  """
  mesh = parallel.data_mesh(devices, spatial)
  net = UNet3D(features=model.features, dtype=jnp.dtype(dtype))
  params = jax.device_put(model.params, parallel.replicated(mesh))
  data = parallel.batch_sharding(mesh)
  scale = float(model.config.data.scale)  # DeepCAD-RT's scale_factor
  std_scale = float(model.meta.get("calibration", {}).get("std_scale", 1.0))

  def predict(params, batch):
    return net.apply({"params": params}, (batch / scale)[..., None])[..., 0] * scale

  @functools.partial(jax.jit, in_shardings=(parallel.replicated(mesh), data),
                     out_shardings=data)
  def apply(params, batch):
    if not samples:
      return predict(params, batch)
    out = symmetry_samples(functools.partial(predict, params), batch, samples)
    return out.at[..., 1].multiply(std_scale)

  def run(batch):  # explicit placement: required for numpy inputs on several processes
    return apply(params, jax.device_put(batch, data))

  return run, mesh


def symmetry_samples(predict: Callable[[jax.Array], jax.Array], batch: jax.Array,
                     samples: int) -> jax.Array:
  """Mean and std of `predict` over the first `samples` symmetries of the (y, x) plane.

  Each symmetry is applied to the (B, T, Y, X) batch and inverted on the prediction, so
  an exactly equivariant network gives std 0. Returns (B, T, Y, X, 2): [mean, std].
  """
  syms = symmetries_for(batch.shape)[:samples]
  outs = jnp.stack([invert_symmetry(predict(apply_symmetry(batch, s)), s) for s in syms])
  return jnp.stack([outs.mean(0), outs.std(0, ddof=1)], axis=-1)


def _pad_reflect(block: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  pads = [(0, s - n) for n, s in zip(block.shape, shape)]
  if not any(p for _, p in pads):
    return block
  mode = "reflect" if all(n > 1 or p == 0 for n, (_, p) in zip(block.shape, pads)) \
      else "edge"
  return np.pad(block, pads, mode=mode)


class _Stitcher:
  """Accumulates patch outputs for the current and the next temporal slab."""

  def __init__(self, shape, patch, overlap, blend, reference=False, mean=0.0, channels=0):
    self.T, self.Y, self.X = shape
    self.patch = patch
    self.blend = blend
    self.reference = reference  # reference kept regions and per-patch rescale
    self.mean = np.float32(mean)
    self.rescale_skipped = 0
    self.t_tiles = axis_plan(self.T, patch[0], overlap, reference)
    self.yx_tiles = [axis_plan(n, p, overlap, reference) for n, p in
                     zip(shape[1:], patch[1:])]
    self.overlap_lengths = [p - gap(p, overlap) for p in patch]
    self.base = 0           # movie frame at buffer index 0
    self.emitted = 0        # frames already yielded
    extra = (channels,) if channels else ()
    self.acc = np.zeros((patch[0],) + tuple(shape[1:]) + extra, np.float32)
    self.wsum = np.zeros((patch[0],) + tuple(shape[1:]), np.float32) if blend else None

  def _weights(self, tiles: Sequence[AxisTile]) -> np.ndarray:
    w = [blend_weights(p, t, n, g) for p, t, n, g in
         zip(self.patch, tiles, (self.T, self.Y, self.X), self.overlap_lengths)]
    return w[0][:, None, None] * w[1][None, :, None] * w[2][None, None, :]

  def add(self, p: Patch, out: np.ndarray, inp: np.ndarray) -> None:
    t0, y0, x0 = p.start
    if self.blend:
      tiles = [self.t_tiles[p.index[0]], self.yx_tiles[0][p.index[1]],
               self.yx_tiles[1][p.index[2]]]
      w = self._weights(tiles)
      wo = w[..., None] if out.ndim == 4 else w
      tt = min(self.patch[0], self.T - t0)
      yy, xx = min(self.patch[1], self.Y - y0), min(self.patch[2], self.X - x0)
      sl = (slice(t0 - self.base, t0 - self.base + tt), slice(y0, y0 + yy),
            slice(x0, x0 + xx))
      self.acc[sl] += (wo * out)[:tt, :yy, :xx]
      self.wsum[sl] += w[:tt, :yy, :xx]
    else:
      (ta, tb), (ya, yb), (xa, xb) = p.keep
      local = (slice(ta - t0, tb - t0), slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
      kept = out[local]
      if self.reference:
        full = tuple(slice(lo - s, hi - s) for (lo, hi), s in zip(p.full, p.start))
        kept = (kept + self.mean) * self._rescale(out[full], inp[full]) - self.mean
      self.acc[ta - self.base:tb - self.base, ya:yb, xa:xb] = kept

  def _rescale(self, out: np.ndarray, raw: np.ndarray) -> np.float32:
    """The reference's intensity factor sqrt(sum(raw) / sum(out)) over a patch's kept
    region, both with the mean added back (1, and counted, where it is not positive)."""
    ratio = (np.sum(raw + self.mean, dtype=np.float64) /
             np.sum(out + self.mean, dtype=np.float64))
    if not np.isfinite(ratio) or ratio <= 0:
      self.rescale_skipped += 1
      return np.float32(1)
    return np.float32(np.sqrt(ratio))

  def start_at(self, k: int) -> None:
    """Begin at temporal slab `k` (a process's share of a movie)."""
    tile = self.t_tiles[k]
    self.base = tile.start
    self.emitted = tile.start if self.blend else tile.keep_lo

  def finish_slab(self, k: int) -> tuple[int, np.ndarray]:
    """(first frame, frames) that no later slab touches, once slab `k` is complete."""
    last = k == len(self.t_tiles) - 1
    until = self.T if last else (self.t_tiles[k + 1].start if self.blend
                                 else self.t_tiles[k].keep_hi)
    first = self.emitted
    a, b = first - self.base, until - self.base
    if self.blend:
      w = self.wsum[a:b]
      frames = self.acc[a:b] / (w[..., None] if self.acc.ndim == 4 else w)
    else:
      frames = self.acc[a:b].copy()
    self.emitted = until
    if not last:  # move the buffer to the next slab's start
      shift = self.t_tiles[k + 1].start - self.base
      for buf in (self.acc, self.wsum) if self.blend else (self.acc,):
        buf[:buf.shape[0] - shift] = buf[shift:].copy()
        buf[buf.shape[0] - shift:] = 0
      self.base += shift
    return first, frames


def _batches(items: Iterator, size: int) -> Iterator[list]:
  group = []
  for item in items:
    group.append(item)
    if len(group) == size:
      yield group
      group = []
  if group:
    yield group


def denoise_blocks(movie: Movie, net: NetworkFn, patch: Sequence[int], overlap: float,
                   batch_size: int, *, blend: bool = False, reference: bool = False,
                   mean: float | None = None, stats: DenoiseStats | None = None,
                   progress: bool = False, slabs: tuple[int, int] | None = None,
                   channels: int = 0) -> Iterator[np.ndarray]:
  """Yield the denoised movie (float32, mean added back) as blocks of whole frames.

  `reference` reproduces DeepCAD-RT's stitching (its kept regions and per-patch
  intensity rescale) instead of ours. `slabs=(a, b)` denoises only the frames that
  temporal slabs a..b-1 finish (`slab_ranges` splits a movie between processes).
  `channels`: the network returns that many values per voxel (e.g. mean and std); the
  blocks are then (n, Y, X, channels) and the mean is added to channel 0 only.
  """
  if blend and reference:
    raise UserError("--blend and --reference-stitching exclude each other; pick one.")
  stats = stats if stats is not None else DenoiseStats()
  shape = movie.shape
  eff, padded = padded_patch(shape, patch)
  mean = movie.mean() if mean is None else float(mean)
  plan = patch_plan(padded, eff, overlap, reference)
  if channels and reference:
    raise UserError("--reference-stitching and --uncertainty exclude each other.")
  stitch = _Stitcher(padded, eff, overlap, blend, reference, mean, channels)
  per_slab = len(plan) // len(stitch.t_tiles)
  a, b = slabs or (0, len(stitch.t_tiles))
  first = a - 1 if blend and a > 0 else a  # blending needs the slab before as a halo
  if first > 0:
    stitch.start_at(first)
  plan = plan[first * per_slab:b * per_slab]
  stats.shape, stats.patch, stats.patches = shape, tuple(eff), len(plan)
  bar = Progress(len(plan), "patches", enabled=progress)
  t_start = time.perf_counter()

  def patches() -> Iterator[tuple[Patch, np.ndarray]]:
    for k in range(first, b):
      tile = stitch.t_tiles[k]
      t1 = min(tile.start + eff[0], shape[0])
      slab = movie.read(tile.start, t1).astype(np.float32) - np.float32(mean)
      slab = _pad_reflect(slab, (eff[0],) + padded[1:])
      for p in plan[(k - first) * per_slab:(k - first + 1) * per_slab]:
        _, y0, x0 = p.start
        yield p, slab[:, y0:y0 + eff[1], x0:x0 + eff[2]]

  done = 0

  def absorb(group, out) -> Iterator[np.ndarray]:
    nonlocal done
    out = np.asarray(out)
    for i, (p, inp) in enumerate(group):
      stitch.add(p, out[i], inp)
      done += 1
      if done % per_slab == 0:
        k = first + done // per_slab - 1
        t0, frames = stitch.finish_slab(k)
        frames = frames[:max(0, shape[0] - t0), :shape[1], :shape[2]]
        if len(frames) and k >= a:  # a halo slab's frames belong to another process
          if channels:
            frames[..., 0] += np.float32(mean)
            yield frames
          else:
            yield frames + np.float32(mean)
    elapsed = time.perf_counter() - t_start
    bar.update(done, force=done == len(plan),
               **{"voxels/s": f"{done * int(np.prod(eff)) / max(elapsed, 1e-9):.3g}"})

  pending = None
  for group in _batches(patches(), batch_size):
    batch = np.zeros((batch_size,) + tuple(eff), np.float32)
    batch[:len(group)] = np.stack([d for _, d in group])
    out = net(batch)  # dispatched asynchronously: the device works while we stitch
    if pending is not None:
      yield from absorb(*pending)
    pending = (group, out)
  if pending is not None:
    yield from absorb(*pending)
  stats.seconds = time.perf_counter() - t_start
  if stitch.rescale_skipped:
    log.warning("reference rescale skipped for %d patches whose sums were not positive.",
                stitch.rescale_skipped)


def to_dtype(block: np.ndarray, dtype) -> tuple[np.ndarray, int]:
  """Round and clip float data into `dtype` (integers); returns (array, voxels clipped)."""
  dtype = np.dtype(dtype)
  if dtype.kind == "f":
    return block.astype(dtype), 0
  if dtype.kind not in "iu":
    raise UserError(f"output dtype {dtype} is not supported; use an integer type "
                    "or float32.")
  info = np.iinfo(dtype)
  rounded = np.rint(block)
  clipped = int(np.count_nonzero((rounded < info.min) | (rounded > info.max)))
  return np.clip(rounded, info.min, info.max).astype(dtype), clipped


@dataclasses.dataclass
class Denoiser:
  """A model ready to denoise: compiled once per patch shape, reused for every movie."""

  model: Model
  patch: tuple[int, int, int] | None = None
  overlap: float | None = None
  batch_size: int = 0
  dtype: str = "float32"
  blend: bool = False
  devices: Any = None
  reference_stitching: bool = False
  spatial: int = 1
  uncertainty: int = 0  # K >= 2: mean and std over K test-time symmetries

  def __post_init__(self):
    self.model = resolve_model(self.model)
    self.patch = tuple(self.patch or self.model.config.infer.patch or self.model.patch)
    if len(self.patch) != 3 or min(self.patch) < 8:
      raise UserError(f"patch must be three sizes of at least 8 (T,Y,X); got {self.patch}.")
    self.overlap = self.model.overlap if self.overlap is None else float(self.overlap)
    if not 0 <= self.overlap < 1:
      raise UserError(f"overlap must be in [0, 1); got {self.overlap}.")
    if self.dtype not in ("float32", "bfloat16"):
      raise UserError(f"compute dtype must be float32 or bfloat16; got {self.dtype!r}.")
    n_sym = len(symmetries_for(self.patch))
    if self.uncertainty and not 2 <= self.uncertainty <= n_sym:
      raise UserError(f"--uncertainty takes 2 to {n_sym} samples for a "
                      f"{self.patch[1]}x{self.patch[2]} patch (the symmetries of the "
                      f"{'square' if n_sym == 8 else 'rectangle'}); got {self.uncertainty}.")
    self.net, mesh = network_fn(self.model, self.dtype, self.devices, self.spatial,
                                self.uncertainty)
    n_dev = parallel.device_count(mesh)
    self.batch_size = self.batch_size or n_dev
    if self.batch_size % n_dev:
      raise UserError(f"batch size {self.batch_size} is not a multiple of the {n_dev} "
                      "devices; use a multiple.")
    parallel.check_spatial(self.patch[1], self.spatial)

  def blocks(self, movie: Movie, stats: DenoiseStats | None = None, mean=None,
             progress: bool = False) -> Iterator[np.ndarray]:
    """Denoised float32 blocks of frames, in order."""
    return denoise_blocks(movie, self.net, self.patch, self.overlap, self.batch_size,
                          blend=self.blend, reference=self.reference_stitching, mean=mean,
                          stats=stats, progress=progress,
                          channels=2 if self.uncertainty else 0)


def denoise(movie: Any, model: Model | str, *, patch: Sequence[int] | None = None,
            overlap: float | None = None, batch_size: int = 0, dtype: str = "float32",
            blend: bool = False, output_dtype: Any = None, devices=None,
            reference_stitching: bool = False, uncertainty: int = 0,
            progress: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Denoise a (T, Y, X) movie (array, path or Movie) with a trained model.

  `model` is a `Model` or a model directory. Defaults come from the model: its training
  patch and overlap. The result has the input's shape and, unless `output_dtype` is
  given ('float32' for the raw network output), the input's dtype (rounded, clipped).
  `reference_stitching` reproduces DeepCAD-RT's output (see README). With
  `uncertainty` = K >= 2 the result is (mean, std) over K test-time symmetries; std is
  float32.
  """
  movie = as_movie(movie)
  den = model if isinstance(model, Denoiser) else Denoiser(
      model, patch, overlap, batch_size, dtype, blend, devices, reference_stitching,
      uncertainty=uncertainty)
  out_dtype = np.dtype(output_dtype or movie.dtype)
  out = np.empty(movie.shape, out_dtype)
  std = np.empty(movie.shape, np.float32) if den.uncertainty else None
  t = 0
  for block in den.blocks(movie, progress=progress):
    if std is not None:
      std[t:t + len(block)] = block[..., 1]
      block = block[..., 0]
    out[t:t + len(block)], _ = to_dtype(block, out_dtype)
    t += len(block)
  return (out, std) if std is not None else out


@dataclasses.dataclass
class FileReport:
  input: str
  output: str
  shape: tuple[int, int, int]
  dtype: str
  patches: int
  seconds: float
  voxels_per_s: float
  clipped: int


def _output_paths(inputs: list[str], src: str, output: str) -> list[str]:
  if os.path.isdir(src):
    if os.path.exists(output) and not os.path.isdir(output):
      raise UserError(f"--input {src} is a folder, so --output must be a folder; "
                      f"{output} is a file.")
    return [os.path.join(output, os.path.basename(p)) for p in inputs]
  if os.path.isdir(output):
    return [os.path.join(output, os.path.basename(src))]
  if not output.lower().endswith((".tif", ".tiff")):
    raise UserError(f"--output {output} must end in .tif or .tiff (or be a folder).")
  return [output]


def _write_one(movie: Movie, dst: str, den: Denoiser, out_dtype, progress: bool
               ) -> FileReport:
  """Denoise one movie into `dst`, written as it is produced."""
  stats = DenoiseStats()
  clipped = [0]
  std_raw = f"{dst}.std.partial" if den.uncertainty else None
  log.info("Denoising %s %s -> %s", movie.name, movie.shape, dst)
  write_movie(dst, _converted(den.blocks(movie, stats, progress=progress), out_dtype,
                              std_raw, clipped), movie.shape, out_dtype)
  if std_raw:
    _write_raw_as_tiff(std_raw, std_path(dst), movie.shape)
  return FileReport(movie.name, dst, movie.shape, str(out_dtype), stats.patches,
                    stats.seconds, stats.voxels_per_s, clipped[0])


def _converted(blocks: Iterator[np.ndarray], out_dtype, std_raw: str | None,
               clipped: list[int]) -> Iterator[np.ndarray]:
  """The mean channel in `out_dtype` (rounded, clipped; the count added to clipped[0]);
  with `std_raw`, the std channel goes to that float32 raw file as it passes."""
  with open(std_raw, "wb") if std_raw else contextlib.nullcontext() as std_file:
    for block in blocks:
      if std_file is not None:
        std_file.write(np.ascontiguousarray(block[..., 1], np.float32).tobytes())
        block = block[..., 0]
      block, n = to_dtype(block, out_dtype)
      clipped[0] += n
      yield block


def std_path(output: str) -> str:
  """Where the uncertainty (std) movie of `output` goes: beside it, `*_std.tif`."""
  stem, ext = os.path.splitext(output)
  return f"{stem}_std{ext}"


def _write_raw_as_tiff(raw: str, dst: str, shape) -> None:
  """A float32 raw file of (T, Y, X) frames as a TIFF (in bounded memory); removes raw."""
  data = np.memmap(raw, np.float32, "r", shape=tuple(shape)) if np.prod(shape) else \
      np.zeros(shape, np.float32)
  step = max(1, (64 * 2**20) // max(1, shape[1] * shape[2] * 4))
  write_movie(dst, (np.asarray(data[t:t + step]) for t in range(0, shape[0], step)),
              shape, np.float32)
  del data
  os.remove(raw)


def _write_shared(movie: Movie, dst: str, den: Denoiser, out_dtype, progress: bool
                  ) -> FileReport | None:
  """One movie denoised by every process: each does a contiguous range of temporal
  slabs into a part file; process 0 assembles `dst` (and its std movie) from the parts."""
  p, n_proc = jax.process_index(), jax.process_count()
  a, b = slab_ranges(movie.shape, den.patch, den.overlap, n_proc)[p]
  channels = 2 if den.uncertainty else 0
  stats = DenoiseStats()
  t0 = time.perf_counter()
  with open(f"{dst}.part{p}", "wb") as f:
    if b > a:
      for block in denoise_blocks(movie, den.net, den.patch, den.overlap, den.batch_size,
                                  blend=den.blend, reference=den.reference_stitching,
                                  stats=stats, progress=progress, slabs=(a, b),
                                  channels=channels):
        f.write(np.ascontiguousarray(block, np.float32).tobytes())
  distributed.barrier(f"parts-{dst}")
  report = None
  if p == 0:
    clipped = [0]
    frame_shape = movie.shape[1:] + ((channels,) if channels else ())
    std_raw = f"{dst}.std.partial" if channels else None

    def parts():  # every process's frames, in order, 64 at a time
      for q in range(n_proc):
        data = np.memmap(f"{dst}.part{q}", np.float32, "r") if os.path.getsize(
            f"{dst}.part{q}") else np.zeros(0, np.float32)
        frames = data.reshape((-1,) + frame_shape)
        for t in range(0, len(frames), 64):
          yield np.asarray(frames[t:t + 64])
        del data, frames

    write_movie(dst, _converted(parts(), out_dtype, std_raw, clipped), movie.shape,
                out_dtype)
    if std_raw:
      _write_raw_as_tiff(std_raw, std_path(dst), movie.shape)
    for q in range(n_proc):
      os.remove(f"{dst}.part{q}")
    seconds = time.perf_counter() - t0
    report = FileReport(movie.name, dst, movie.shape, str(out_dtype), stats.patches,
                        seconds, float(np.prod(movie.shape)) / seconds, clipped[0])
  distributed.barrier(f"assembled-{dst}")
  return report


def denoise_files(input: str, output: str, model: Model | str, *, overwrite: bool = False,
                  output_dtype: Any = None, progress: bool = True, **kwargs
                  ) -> list[FileReport]:
  """Denoise a TIFF file or a folder of them, writing each output as it is produced.

  Refuses to overwrite an existing output unless `overwrite`, and never writes over
  an input. `kwargs` go to `Denoiser` (patch, overlap, batch_size, dtype, blend, devices,
  reference_stitching, spatial, uncertainty; with uncertainty the std movie is written
  beside each output as `*_std.tif`). On several processes (`jax.distributed`), the files of a folder
  are split between them, and a single movie's temporal slabs are; each process uses
  its own devices.
  """
  inputs = list_movies(os.fspath(input))
  outputs = _output_paths(inputs, os.fspath(input), os.fspath(output))
  for src, dst in zip(inputs, outputs):
    if os.path.exists(dst) and os.path.samefile(src, dst):
      raise UserError(f"--output {dst} is the input file; choose another output.")
    refuse_to_overwrite((dst, std_path(dst)) if kwargs.get("uncertainty") else (dst,),
                        overwrite)
  movies = [open_movie(p) for p in inputs]
  n_proc = jax.process_count()
  if n_proc > 1:
    kwargs.setdefault("devices", jax.local_devices())
  den = Denoiser(model, **kwargs)
  if os.path.isdir(input):
    os.makedirs(output, exist_ok=True)
  distributed.barrier("denoise-checked")  # every process has checked before any writes
  reports = []
  shared = n_proc > 1 and len(movies) == 1
  for i, (movie, dst) in enumerate(zip(movies, outputs)):
    out_dtype = np.dtype(output_dtype or movie.dtype)
    if shared:
      report = _write_shared(movie, dst, den, out_dtype, progress)
    elif i % n_proc == jax.process_index():
      report = _write_one(movie, dst, den, out_dtype, progress)
    else:
      continue
    if report is None:
      continue
    if report.clipped:
      log.warning("%d voxels (%.3g%%) of %s were outside the %s range and were clipped.",
                  report.clipped, 100 * report.clipped / np.prod(movie.shape), dst,
                  out_dtype)
    reports.append(report)
  distributed.barrier("denoise-done")
  return reports


def slab_ranges(movie_shape: Sequence[int], patch: Sequence[int], overlap: float,
                parts: int) -> list[tuple[int, int]]:
  """Split a movie's temporal slabs into `parts` contiguous ranges (some may be empty)."""
  eff, padded = padded_patch(movie_shape, patch)
  n = len(axis_plan(padded[0], eff[0], overlap))
  bounds = [round(i * n / parts) for i in range(parts + 1)]
  return list(zip(bounds[:-1], bounds[1:]))
