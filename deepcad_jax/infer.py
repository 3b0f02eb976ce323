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
from deepcad_jax.model import UNet3D, network_input, over_members
from deepcad_jax.progress import Progress
from deepcad_jax.tiling import (AxisTile, Patch, axis_plan, blend_weights, gap,
                                padded_patch, patch_plan)

log = logging.getLogger("deepcad_jax")

NetworkFn = Callable[..., jax.Array]  # (B, T, Y, X)[, prior (B, Y, X)] -> (B, T, Y, X[, C])


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
               samples: int = 0, keep_samples: bool = False) -> tuple[NetworkFn, Any]:
  """The jit-compiled patch network (batch sharded over a mesh of `devices`; with
  `spatial > 1`, each patch's Y axis split over that many devices too).

  `run(batch, prior=None)` takes normalised (B, T, Y, X) patches (and, for a model with
  the mean-image prior, their (B, Y, X) prior). An ensemble's members are averaged.
  With `samples` = K >= 1 it predicts each patch under K symmetries of the (y, x) plane
  with every member (K x M samples, each brought back to the patch's orientation) and
  returns (B, T, Y, X, 2): their mean and standard deviation (the latter times the
  model's calibration factor, if it has one), followed by the samples themselves when
  `keep_samples`.
  """
  mesh = parallel.data_mesh(devices, spatial)
  net = UNet3D(features=model.features, dtype=jnp.dtype(dtype))
  params = jax.device_put(model.params, parallel.replicated(mesh))
  data, images = parallel.batch_sharding(mesh), parallel.image_sharding(mesh)
  scale = float(model.config.data.scale)  # DeepCAD-RT's scale_factor
  std_scale = float(model.meta.get("calibration", {}).get("std_scale", 1.0))
  members, impl = model.config.model.ensemble, model.config.model.ensemble_impl

  def predict(params, batch, prior):  # -> (members, B, T, Y, X)
    def one(p):
      x = network_input(batch / scale, None if prior is None else prior / scale)
      return net.apply({"params": p}, x)[..., 0] * scale
    return one(params)[None] if members == 1 else over_members(one, members, impl, params)

  def apply(params, batch, prior):
    outs = symmetry_samples(functools.partial(predict, params), batch, max(1, samples),
                            prior)
    if not samples:
      return outs.mean(0)
    stats = [outs.mean(0), outs.std(0, ddof=1) * std_scale]
    return jnp.stack(stats + (list(outs) if keep_samples else []), axis=-1)

  jitted = jax.jit(apply, in_shardings=(parallel.replicated(mesh), data, images),
                   out_shardings=data)

  def run(batch, prior=None):  # explicit placement: numpy inputs on several processes
    return jitted(params, jax.device_put(batch, data), jax.device_put(prior, images))

  return run, mesh


def symmetry_samples(predict: Callable[..., jax.Array], batch: jax.Array, samples: int,
                     prior: jax.Array | None = None) -> jax.Array:
  """`predict(batch, prior)` -> (M, B, T, Y, X) under the first `samples` symmetries of
  the (y, x) plane, each inverted back: (samples * M, B, T, Y, X).

  The symmetry is applied to the batch and its prior alike; an exactly equivariant
  network gives identical samples.
  """
  outs = []
  for s in symmetries_for(batch.shape)[:samples]:
    p = None if prior is None else apply_symmetry(prior, s)
    outs.append(invert_symmetry(predict(apply_symmetry(batch, s), p), s))
  return jnp.concatenate(outs)


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
                   channels: int = 0, prior: np.ndarray | None = None
                   ) -> Iterator[np.ndarray]:
  """Yield the denoised movie (float32, mean added back) as blocks of whole frames.

  `reference` reproduces DeepCAD-RT's stitching (its kept regions and per-patch
  intensity rescale) instead of ours. `slabs=(a, b)` denoises only the frames that
  temporal slabs a..b-1 finish (`slab_ranges` splits a movie between processes).
  `channels`: the network returns that many values per voxel ([mean, std, samples...]);
  the blocks are then (n, Y, X, channels) and the movie's mean is added back to every
  channel but the std (1). `prior`: the (Y, X) mean image given to a model trained with
  the mean-image prior (normalised and tiled as the frames are).
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
  if prior is not None:
    if tuple(prior.shape) != tuple(shape[1:]):
      raise UserError(f"the mean image is {tuple(prior.shape)} but {movie.name} has "
                      f"frames of {shape[1]}x{shape[2]}; give the mean image of this "
                      "recording.")
    prior = _pad_reflect(np.asarray(prior, np.float32) - np.float32(mean), padded[1:])
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
            frames[..., 2:] += np.float32(mean)
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
    if prior is None:
      out = net(batch)  # dispatched asynchronously: the device works while we stitch
    else:
      images = np.zeros((batch_size,) + tuple(eff[1:]), np.float32)
      images[:len(group)] = np.stack([prior[y0:y0 + eff[1], x0:x0 + eff[2]]
                                      for _, y0, x0 in (p.start for p, _ in group)])
      out = net(batch, images)
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
  """A model ready to denoise: compiled once per patch shape, reused for every movie.

  `uncertainty` = K: predict under K test-time symmetries (with every member of an
  ensemble): the output is their mean, with their std beside it; `save_samples` keeps
  every sample too. A model trained with the mean-image prior gets each movie's
  temporal mean image (or the one given to `blocks`).
  """

  model: Model
  patch: tuple[int, int, int] | None = None
  overlap: float | None = None
  batch_size: int = 0
  dtype: str = "float32"
  blend: bool = False
  devices: Any = None
  reference_stitching: bool = False
  spatial: int = 1
  uncertainty: int = 0
  save_samples: bool = False

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
    members = self.model.config.model.ensemble
    lowest = 1 if members > 1 else 2
    if self.uncertainty and not lowest <= self.uncertainty <= n_sym:
      raise UserError(f"--uncertainty takes {lowest} to {n_sym} samples for a "
                      f"{self.patch[1]}x{self.patch[2]} patch (the symmetries of the "
                      f"{'square' if n_sym == 8 else 'rectangle'}"
                      f"{', times the ' + str(members) + ' members' if members > 1 else ''}"
                      f"); got {self.uncertainty}.")
    if self.save_samples and not self.uncertainty:
      raise UserError("--save-samples keeps the samples of --uncertainty K; add it.")
    self.samples = self.uncertainty * members
    self.net, mesh = network_fn(self.model, self.dtype, self.devices, self.spatial,
                                self.uncertainty, self.save_samples)
    n_dev = parallel.device_count(mesh)
    self.batch_size = self.batch_size or n_dev
    if self.batch_size % n_dev:
      raise UserError(f"batch size {self.batch_size} is not a multiple of the {n_dev} "
                      "devices; use a multiple.")
    parallel.check_spatial(self.patch[1], self.spatial)

  @property
  def channels(self) -> int:
    """Values per voxel of `blocks`: 0 (plain frames), 2 (mean, std) or 2 + samples."""
    if not self.uncertainty:
      return 0
    return 2 + (self.samples if self.save_samples else 0)

  def extra_outputs(self, output: str) -> list[str]:
    """The files written beside `output`, one per channel after the first."""
    if not self.channels:
      return []
    return [std_path(output)] + [sample_path(output, i) for i in range(self.channels - 2)]

  def prior_for(self, movie: Movie, prior: np.ndarray | None = None) -> np.ndarray | None:
    """The mean image a mean-prior model is given: `prior`, or the movie's own."""
    if not self.model.config.model.mean_prior:
      return None
    return movie.mean_image() if prior is None else np.asarray(prior, np.float32)

  def blocks(self, movie: Movie, stats: DenoiseStats | None = None, mean=None,
             progress: bool = False, prior: np.ndarray | None = None,
             slabs: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """Denoised float32 blocks of frames, in order ((n, Y, X, channels) with
    uncertainty)."""
    return denoise_blocks(movie, self.net, self.patch, self.overlap, self.batch_size,
                          blend=self.blend, reference=self.reference_stitching, mean=mean,
                          stats=stats, progress=progress, channels=self.channels,
                          prior=self.prior_for(movie, prior), slabs=slabs)


def denoise(movie: Any, model: Model | str, *, patch: Sequence[int] | None = None,
            overlap: float | None = None, batch_size: int = 0, dtype: str = "float32",
            blend: bool = False, output_dtype: Any = None, devices=None,
            reference_stitching: bool = False, uncertainty: int = 0,
            save_samples: bool = False, progress: bool = False
            ) -> np.ndarray | tuple[np.ndarray, ...]:
  """Denoise a (T, Y, X) movie (array, path or Movie) with a trained model.

  `model` is a `Model`, a model directory or a `Denoiser`. Defaults come from the model:
  its training patch and overlap. The result has the input's shape and, unless
  `output_dtype` is given ('float32' for the raw network output), the input's dtype
  (rounded, clipped). `reference_stitching` reproduces DeepCAD-RT's output (see
  README). With `uncertainty` = K the result is (mean, std) over K test-time symmetries
  (times the ensemble's members); std is float32; `save_samples` adds a third item,
  the float32 samples (S, T, Y, X).
  """
  movie = as_movie(movie)
  den = model if isinstance(model, Denoiser) else Denoiser(
      model, patch, overlap, batch_size, dtype, blend, devices, reference_stitching,
      uncertainty=uncertainty, save_samples=save_samples)
  out_dtype = np.dtype(output_dtype or movie.dtype)
  out = np.empty(movie.shape, out_dtype)
  extra = np.empty((den.channels - 1,) + movie.shape, np.float32) if den.channels else None
  t = 0
  for block in den.blocks(movie, progress=progress):
    if extra is not None:
      extra[:, t:t + len(block)] = np.moveaxis(block[..., 1:], -1, 0)
      block = block[..., 0]
    out[t:t + len(block)], _ = to_dtype(block, out_dtype)
    t += len(block)
  if extra is None:
    return out
  return (out, extra[0]) if len(extra) == 1 else (out, extra[0], extra[1:])


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
  """Denoise one movie into `dst` (and its std and samples beside it), written as it
  is produced."""
  stats = DenoiseStats()
  clipped = [0]
  log.info("Denoising %s %s -> %s", movie.name, movie.shape, dst)
  _write_outputs(dst, den.extra_outputs(dst), den.blocks(movie, stats, progress=progress),
                 movie.shape, out_dtype, clipped)
  return FileReport(movie.name, dst, movie.shape, str(out_dtype), stats.patches,
                    stats.seconds, stats.voxels_per_s, clipped[0])


def _write_outputs(dst: str, extras: Sequence[str], blocks: Iterator[np.ndarray], shape,
                   out_dtype, clipped: list[int]) -> None:
  """`dst` from channel 0 of the blocks (in `out_dtype`), and each later channel as a
  float32 TIFF at the matching path of `extras` (the std, the samples)."""
  write_movie(dst, _converted(blocks, out_dtype, extras, clipped), shape, out_dtype)
  for path in extras:
    _write_raw_as_tiff(_partial(path), path, shape)


def _partial(path: str) -> str:
  """The float32 raw file an extra output collects in before it becomes a TIFF."""
  return f"{path}.raw-partial"


def _converted(blocks: Iterator[np.ndarray], out_dtype, extras: Sequence[str],
               clipped: list[int]) -> Iterator[np.ndarray]:
  """The mean channel in `out_dtype` (rounded, clipped; the count added to clipped[0]);
  channel i >= 1 goes, float32, to the raw file `_partial(extras[i - 1])` as it passes."""
  with contextlib.ExitStack() as stack:
    files = [stack.enter_context(open(_partial(p), "wb")) for p in extras]
    for block in blocks:
      if files:
        for i, f in enumerate(files, 1):
          f.write(np.ascontiguousarray(block[..., i], np.float32).tobytes())
        block = block[..., 0]
      block, n = to_dtype(block, out_dtype)
      clipped[0] += n
      yield block


def std_path(output: str) -> str:
  """Where the uncertainty (std) movie of `output` goes: beside it, `*_std.tif`."""
  stem, ext = os.path.splitext(output)
  return f"{stem}_std{ext}"


def sample_path(output: str, i: int) -> str:
  """Where sample `i` of `output` goes with --save-samples: `*_sample00.tif`, ..."""
  stem, ext = os.path.splitext(output)
  return f"{stem}_sample{i:02d}{ext}"


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
  slabs into a part file; process 0 assembles `dst` (and its std and samples) from the
  parts."""
  p, n_proc = jax.process_index(), jax.process_count()
  a, b = slab_ranges(movie.shape, den.patch, den.overlap, n_proc)[p]
  channels = den.channels
  stats = DenoiseStats()
  t0 = time.perf_counter()
  with open(f"{dst}.part{p}", "wb") as f:
    if b > a:
      for block in den.blocks(movie, stats, progress=progress, slabs=(a, b)):
        f.write(np.ascontiguousarray(block, np.float32).tobytes())
  distributed.barrier(f"parts-{dst}")
  report = None
  if p == 0:
    clipped = [0]
    frame_shape = movie.shape[1:] + ((channels,) if channels else ())

    def parts():  # every process's frames, in order, 64 at a time
      for q in range(n_proc):
        data = np.memmap(f"{dst}.part{q}", np.float32, "r") if os.path.getsize(
            f"{dst}.part{q}") else np.zeros(0, np.float32)
        frames = data.reshape((-1,) + frame_shape)
        for t in range(0, len(frames), 64):
          yield np.asarray(frames[t:t + 64])
        del data, frames

    _write_outputs(dst, den.extra_outputs(dst), parts(), movie.shape, out_dtype, clipped)
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
  reference_stitching, spatial, uncertainty, save_samples; with uncertainty the std
  movie is written beside each output as `*_std.tif`, and with save_samples each
  sample as `*_sample00.tif`, ...). On several processes (`jax.distributed`), the files
  of a folder are split between them, and a single movie's temporal slabs are; each
  process uses its own devices.
  """
  inputs = list_movies(os.fspath(input))
  outputs = _output_paths(inputs, os.fspath(input), os.fspath(output))
  n_proc = jax.process_count()
  if n_proc > 1:
    kwargs.setdefault("devices", jax.local_devices())
  den = Denoiser(model, **kwargs)
  for src, dst in zip(inputs, outputs):
    if os.path.exists(dst) and os.path.samefile(src, dst):
      raise UserError(f"--output {dst} is the input file; choose another output.")
    refuse_to_overwrite([dst] + den.extra_outputs(dst), overwrite)
  movies = [open_movie(p) for p in inputs]
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
