"""Denoising whole recordings: choose a tile plan, run it on the devices, write frames.

A `Denoiser` holds a model compiled for inference. For each movie it picks a
`tiling.TilePlan` (exact by default where that is not more compute than DeepCAD-RT's
overlap scheme; see `Denoiser.plan`) and an `Engine` runs it: the movie is read one
window of frames at a time (a temporal slab, or a few when several devices share the
work), each window goes to the device once in its own dtype, and the compiled
`predict.predict_step` does everything else there (normalisation, tiles, network,
stitching, dtype conversion). While the device computes window k, the host reads window
k+1 and writes window k-1's frames, so memory holds a few windows, never the movie.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import logging
import os
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepcad_jax.runtime import distributed, parallel, resources
from deepcad_jax.model_io.checkpoint import Model
from deepcad_jax.config import DenoiseConfig
from deepcad_jax.data.movie import (Movie, as_movie, list_movies, open_movie,
                                    refuse_to_overwrite)
from deepcad_jax.data.writers import (PARTIAL_SUFFIX, VOLUME_FORMATS, MovieWriter,
                                     SplitOutputs, check_space, movie_bytes, os_error,
                                     output_format, outputs_together, written_path)
from deepcad_jax.data.spec import (MovieSpec, is_store, part_suffix, split_name,
                                   with_name_suffix)
from deepcad_jax.errors import UserError
from deepcad_jax.model_io.loading import load_model
from deepcad_jax.core.network import uniform_widths
from deepcad_jax.core.normalise import Normalisation
from deepcad_jax.denoising.step import (Channels, StepLayout, TileFn, compile_predict_step,
                                 frame_padding, reflect_index, symmetry_samples,
                                 tile_network)
from deepcad_jax.runtime.progress import Progress
from deepcad_jax.denoising.tiling import (GRID, HALO, TilePlan, choose_exact_tile, exact_plan,
                                overlap_plan)

__all__ = ["DenoiseConfig", "DenoiseStats", "Denoiser", "Engine", "Frames",
           "TemporalSpread", "as_denoiser", "denoise", "denoise_files", "denoise_with",
           "memory_budget", "quantisation_note", "resolve_output_dtype",
           "symmetry_samples", "to_dtype", "whole_movie_forward"]

log = logging.getLogger("deepcad_jax")

# Share of memory a tile plan may use when no --memory-budget is given: of each
# accelerator's memory (what XLA's allocator may hold), or of the machine's RAM on CPUs.
DEVICE_MEMORY_SHARE = 0.8
HOST_MEMORY_SHARE = 0.4
# An integer output gets a note when its rounding noise exceeds this share of the
# denoised movie's temporal variation (RMS; 0.1 in amplitude is 1% in power).
QUANTISATION_NOTE = 0.1


@dataclasses.dataclass
class DenoiseStats:
  """What one denoising pass did (filled in as it runs)."""

  shape: tuple[int, int, int] = (0, 0, 0)
  tile: tuple[int, int, int] = (0, 0, 0)
  tiles: int = 0
  tiling: str = ""            # the plan, in words
  recompute: float = 0.0      # network voxels / movie voxels
  seconds: float = 0.0
  compile_s: float = 0.0
  clipped: int = 0
  rescale_skipped: int = 0    # reference stitching: patches whose sums were not positive
  rounding_sq: float = 0.0    # integer outputs: sum of squared rounding errors
  rounded: int = 0            # voxels that sum is over
  spread: TemporalSpread | None = None  # integer outputs: the float frames' variation

  @property
  def voxels_per_s(self) -> float:
    return float(np.prod(self.shape)) / self.seconds if self.seconds else 0.0

  @property
  def rounding_rms(self) -> float:
    """The quantisation noise an integer output added (RMS, in counts); 0 for floats."""
    return float(np.sqrt(self.rounding_sq / self.rounded)) if self.rounded else 0.0


@dataclasses.dataclass
class Frames:
  """Consecutive output frames of a movie.

  `data` (n, Y, X) is the denoised movie in the output dtype. With uncertainty,
  `extras` (n, Y, X, C) float32 holds the other channels: the standard deviation, then
  each sample (with --save-samples).
  """

  start: int
  data: np.ndarray
  extras: np.ndarray | None = None
  clipped: int = 0
  rounding_sq: float = 0.0  # integer data: sum of squared rounding errors (not clipped)
  moments: np.ndarray | None = None  # integer data: (2, Y, X) sums of x - c, (x - c)^2


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


def _device_dtype(dtype) -> np.dtype:
  """The dtype the device converts to: the output's where that is exact (floats, 8- and
  16-bit integers), else float32 and the host converts."""
  dtype = np.dtype(dtype)
  if dtype.kind == "f" or (dtype.kind in "iu" and dtype.itemsize <= 2):
    return dtype
  if dtype.kind not in "iu":
    raise UserError(f"output dtype {dtype} is not supported; use an integer type "
                    "or float32.")
  return np.dtype(np.float32)


# ------------------------------------------------------------------ memory


def memory_budget(devices: Sequence[jax.Device], override: float | None = None) -> float:
  """Bytes one device may use for inference: `override`, else DEVICE_MEMORY_SHARE of an
  accelerator's memory, else HOST_MEMORY_SHARE of the machine's RAM split over the
  local CPU devices."""
  if override:
    return float(override)
  device = devices[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return DEVICE_MEMORY_SHARE * float(stats["bytes_limit"])
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    ram = 8 * 2**30
  local = max(1, sum(1 for d in devices if d.process_index == jax.process_index()))
  return HOST_MEMORY_SHARE * ram / local


def compiled_bytes(compiled: Any) -> int | None:
  """Device memory an executable needs by XLA's own analysis (temporaries, arguments
  and outputs, less what they share), or None where the backend does not say."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if m is None:
    return None
  return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes)


def bytes_per_voxel(features: float, dtype: str, channels_in: int = 1, samples: int = 1,
                    channels_out: int = 0) -> float:
  """Estimated peak bytes per tile voxel of the network's forward pass (measured with
  XLA's memory analysis: about 17 f bytes natively, 49 f with the CPU's 2-D convolution
  path, in float32), plus the per-sample outputs; the compiled step's own analysis
  checks it (`Engine.prepare`)."""
  per_f = 49.0 if jax.default_backend() == "cpu" else 17.0
  act = per_f * features * (0.6 if dtype == "bfloat16" else 1.0) * (1 + 0.1 * (channels_in - 1))
  return act + 4.0 * (samples + channels_out + 4)


# ------------------------------------------------------------------ engine


@dataclasses.dataclass
class Window:
  """One call of the predict step: a window of frames and the slabs cut from it."""

  start: int                                   # first frame (padded coordinates)
  slabs: list[tuple[int, np.ndarray, np.ndarray | None]]  # (start in window, T weights,
                                                          # T full-region mask)
  emit: tuple[int, int]                        # frames it completes [lo, hi)
  keep: tuple[int, int]                        # of those, the frames to hand back
  next_start: int | None = None                # the next window's start (blending)


class Engine:
  """Runs tile plans through the compiled predict step on a mesh of devices.

  Args:
    tile_fn: the network on normalised tiles (`predict.tile_network`, or a stand-in).
    params: its parameters (host arrays; put on the devices once, replicated).
    mesh: the devices (`parallel.data_mesh`).
    batch_size: tiles per network call; a multiple of the mesh's data axis (0: one per
      device).
    scale: the model's intensity scale (`normalise.Normalisation`; the mean is given
      per movie).
  """

  def __init__(self, tile_fn: TileFn, params: Any, mesh: jax.sharding.Mesh,
               batch_size: int = 0, scale: float = 1.0):
    self.tile_fn = tile_fn
    self.scale = float(scale)
    self.mesh = mesh
    self.default_batch = not batch_size
    self.batch_size = parallel.batch_for(mesh, batch_size)
    self.host_params = params
    self.params = jax.device_put(params, parallel.replicated(mesh))
    self._steps: dict[StepLayout, Any] = {}
    self._compiled: dict[tuple, Any] = {}
    self._fewer: dict[int, Engine] = {}
    self.compile_s = 0.0

  def with_params(self, params: Any) -> Engine:
    """This engine on other parameters of the same shapes; it shares the compiled
    steps (parameters are an argument of each step)."""
    other = copy.copy(self)
    other.host_params = params
    other.params = jax.device_put(params, parallel.replicated(self.mesh))
    other._fewer = {n: e.with_params(params) for n, e in self._fewer.items()}
    return other

  def for_tiles(self, tiles: int) -> Engine:
    """This engine, or one over fewer of its devices when a plan has fewer tiles than
    devices (rather than computing empty tiles); only with the default batch and a
    data-only mesh."""
    n = parallel.device_count(self.mesh)
    if not self.default_batch or tiles >= n or parallel.SPACE in self.mesh.axis_names:
      return self
    if tiles not in self._fewer:
      devices = list(self.mesh.devices.flat)[:tiles]
      self._fewer[tiles] = Engine(self.tile_fn, self.host_params,
                                  parallel.data_mesh(devices), scale=self.scale)
    return self._fewer[tiles]

  # -- windows ------------------------------------------------------------------

  def windows(self, plan: TilePlan, first: int, last: int, keep: tuple[int, int]
              ) -> list[Window]:
    """Windows over slabs [first, last) of `plan`: enough slabs per window that every
    device has a tile (one slab when a slab has as many tiles as the batch)."""
    per = max(1, -(-self.batch_size // plan.tiles_per_slab))
    out = []
    for a in range(first, last, per):
      ks = list(range(a, min(last, a + per)))
      start = plan.slabs[ks[0]].start
      slabs = [(plan.slabs[k].start - start, plan.t_weights(k),
                plan.t_full(k) if plan.mode == "reference" else None) for k in ks]
      out.append(Window(start, slabs, (plan.final_after(ks[0] - 1),
                                       plan.final_after(ks[-1])), keep))
    for w, nxt in zip(out, out[1:]):
      w.next_start = nxt.start
    return out

  def layout(self, plan: TilePlan, windows: Sequence[Window], out_dtype, channels: int,
             emit: int | None = None) -> StepLayout:
    """The static layout that fits every window (`emit`: frames returned per call,
    default the most any window completes)."""
    length = max(w.slabs[-1][0] + plan.tile[0] for w in windows)
    if emit is None:
      emit = max(w.emit[1] - w.emit[0] for w in windows)
    per = max(len(w.slabs) for w in windows) * plan.tiles_per_slab
    tiles = -(-per // self.batch_size) * self.batch_size
    return StepLayout(length, tuple(plan.shape[1:]), tuple(plan.padded[1:]), plan.tile,
                      tiles, self.batch_size, min(length, emit), channels, plan.blend,
                      plan.mode == "reference", _device_dtype(out_dtype).name)

  def consts(self, plan: TilePlan, prior: np.ndarray | None, mean: float,
             put: bool = True) -> dict:
    """The per-movie arrays of a plan (and its normalised, padded mean image), on the
    devices (`put`)."""
    c = {"yx_starts": np.array([[ty.start, tx.start] for ty, tx in plan.yx_tiles],
                               np.int32),
         "yx_weight": plan.yx_weights(), **frame_padding(plan.shape[1:], plan.padded[1:])}
    if plan.mode == "reference":
      c["yx_full"] = plan.yx_full()
    if plan.blend:
      c["yx_norm"] = plan.yx_norm()
    if prior is not None:
      p = Normalisation(np.float32(mean), np.float32(self.scale)).to_network(
          np.asarray(prior))
      c["prior"] = p[c["pad_y"]][:, c["pad_x"]]
    return jax.device_put(c, parallel.replicated(self.mesh)) if put else c

  @staticmethod
  def window_arrays(layout: StepLayout, w: Window, per_slab: int, mean: float,
                    t_norm: np.ndarray | None = None, scale: float = 1.0
                    ) -> tuple[dict, tuple[int, int]]:
    """The per-call arrays of window `w`, and the rows of its output to keep.

    Args:
      layout: the step's static layout (`Engine.layout`).
      w: the window.
      per_slab: tiles per temporal slab (`TilePlan.tiles_per_slab`).
      mean: the movie's mean intensity (subtracted before the network).
      t_norm: blending's per-frame normalisation (`TilePlan.t_norm`); needed when
        `layout.blend`.
      scale: the model's intensity scale.

    Returns:
      (the arrays, the rows [r0, r1) of the call's emitted frames to keep).
    """
    n, lt = layout.tiles, layout.tile[0]
    t_starts = np.zeros(n, np.int32)
    yx_index = np.zeros(n, np.int32)
    t_weight = np.zeros((n, lt), np.float32)
    t_full = np.zeros((n, lt), np.float32) if layout.reference else None
    i = 0
    for start, weights, full in w.slabs:
      for j in range(per_slab):
        t_starts[i], yx_index[i], t_weight[i] = start, j, weights
        if t_full is not None:
          t_full[i] = full
        i += 1
    lo, hi = w.emit
    emit_start = lo - w.start
    first = max(0, min(emit_start, layout.window - layout.emit))
    a, b = max(lo, w.keep[0]), min(hi, w.keep[1])
    r0 = emit_start - first + max(0, a - lo)
    rows = (r0, max(r0, emit_start - first + (b - lo)))
    arrays = {"mean": np.float32(mean), "scale": np.float32(scale), "t_starts": t_starts, "yx_index": yx_index,
              "t_weight": t_weight, "emit_start": np.int32(first),
              "shift": np.int32(0 if w.next_start is None else w.next_start - w.start),
              "valid": np.array(rows, np.int32)}
    if t_full is not None:
      arrays["t_full"] = t_full
    if layout.blend:
      norm = np.ones(layout.emit, np.float32)
      seg = t_norm[w.start + first:w.start + first + layout.emit]
      norm[:len(seg)] = seg
      arrays["t_norm"] = norm
    return arrays, rows

  @staticmethod
  def read_window(movie: Movie, padded_t: int, start: int, length: int) -> np.ndarray:
    """Frames [start, start + length) of the movie padded (reflected) to `padded_t`
    frames, in the movie's dtype (frames past the padded end repeat its last one; no
    tile reads them)."""
    t = movie.shape[0]
    index = reflect_index(np.minimum(np.arange(start, start + length), padded_t - 1), t)
    lo, hi = int(index.min()), int(index.max()) + 1
    frames = movie.read(lo, hi)
    if hi - lo == length and np.all(np.diff(index) == 1):
      return np.ascontiguousarray(frames)
    return np.ascontiguousarray(frames[index - lo])

  # -- running ------------------------------------------------------------------

  def compile(self, layout: StepLayout, args: tuple) -> Any:
    """The step for `layout`, compiled ahead of time for `args`' shapes (cached; the
    seconds spent are added to `compile_s` and logged)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    key = (layout, tree) + tuple((a.shape, str(a.dtype)) for a in leaves)
    if key not in self._compiled:
      if layout not in self._steps:
        self._steps[layout] = compile_predict_step(
            layout, self.tile_fn, self.mesh, parallel.batch_sharding(self.mesh))
      t0 = time.perf_counter()
      self._compiled[key] = self._steps[layout].lower(self.params, *args).compile()
      seconds = time.perf_counter() - t0
      self.compile_s += seconds
      log.info("compiled the predict step for %d tile(s) of %s per call in %.1f s",
               layout.tiles, "x".join(map(str, layout.tile)), seconds)
    return self._compiled[key]

  def submit(self, layout: StepLayout, w: Window, window: np.ndarray, consts: Any,
             mean: float, per_slab: int, carry: Any = None,
             t_norm: np.ndarray | None = None) -> tuple[Window, dict, tuple[int, int]]:
    """Start one call (asynchronously): (window, device outputs, rows to keep).

    Args:
      layout: the step's static layout.
      w: the window.
      window: its raw frames in the movie's dtype (`read_window`).
      consts: the plan's per-movie arrays, on the devices (`consts`).
      mean, per_slab, t_norm: as for `window_arrays`.
      carry: blending's output window carried from the previous call (None for the
        first call, or without blending).
    """
    rep = parallel.replicated(self.mesh)
    arrays, rows = self.window_arrays(layout, w, per_slab, mean, t_norm, self.scale)
    args = (carry, jax.device_put(window, rep), jax.device_put(arrays, rep), consts)
    out = self.compile(layout, args)(self.params, *args)
    for name in ("frames", "extras"):
      if out[name] is not None:
        out[name].copy_to_host_async()
    return w, out, rows

  @staticmethod
  def fetch(submitted: tuple[Window, dict, tuple[int, int]], host_dtype) -> Frames:
    """The frames of a submitted call (waits for the device)."""
    w, out, (r0, r1) = submitted
    data = np.asarray(out["frames"])[r0:r1]
    extras = None if out["extras"] is None else np.asarray(out["extras"])[r0:r1]
    clipped = int(out["clipped"])
    rounding_sq = float(out["rounding_sq"])
    moments = None if out["moments"] is None else np.asarray(out["moments"], np.float64)
    if data.dtype != host_dtype:  # integers wider than 16 bits: converted here
      if np.dtype(host_dtype).kind in "iu":
        info = np.iinfo(host_dtype)
        x = data.astype(np.float64)
        inside = (x >= info.min - 0.5) & (x <= info.max + 0.5)
        rounding_sq += float(np.sum(np.where(inside, np.rint(x) - x, 0.0) ** 2))
        moments = np.stack([x.sum(0), (x * x).sum(0)])
      data, n = to_dtype(data, host_dtype)
      clipped += n
    return Frames(max(w.emit[0], w.keep[0]), data, extras, clipped, rounding_sq, moments)

  def prepare(self, plan: TilePlan, movie_dtype: Any, *, out_dtype: Any = np.float32,
              channels: int = 0, prior: bool = False,
              slabs: tuple[int, int] | None = None) -> tuple[Engine, Any]:
    """Compile the step that `run` will use for `plan` (ahead of time, cached) and
    return (the engine that runs it, the executable), so that its memory can be checked
    before any frame is read.

    Args:
      plan: the tile plan.
      movie_dtype: the movie's dtype (the window is sent in it).
      out_dtype, channels, slabs: as for `run`.
      prior: whether a mean image is given (a mean-prior model).
    """
    a, b = slabs or (0, len(plan.slabs))
    engine = self.for_tiles((b - plan.warmup(a)) * plan.tiles_per_slab)
    keep = (plan.final_after(a - 1), min(plan.final_after(b - 1), plan.shape[0]))
    windows = engine.windows(plan, plan.warmup(a), b, keep)
    layout = engine.layout(plan, windows, out_dtype, channels)
    return engine, engine.compile_for(layout, plan, windows[0], movie_dtype, prior)

  def compile_for(self, layout: StepLayout, plan: TilePlan, w: Window, movie_dtype: Any,
                  prior: bool = False) -> Any:
    """The step for `layout` compiled from the shapes of window `w` alone (no data)."""
    rep = parallel.replicated(self.mesh)

    def abstract(x):
      x = np.asarray(x)
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)

    carry = None
    if layout.blend:
      carry = jax.ShapeDtypeStruct((layout.window,) + layout.padded_frame + (
          (layout.channels,) if layout.channels else ()), np.float32, sharding=rep)
    window = jax.ShapeDtypeStruct((layout.window,) + tuple(plan.shape[1:]),
                                  np.dtype(movie_dtype), sharding=rep)
    arrays, _ = self.window_arrays(layout, w, plan.tiles_per_slab, 0.0,
                                   plan.t_norm() if layout.blend else None)
    consts = self.consts(plan, np.zeros(plan.shape[1:], np.float32) if prior else None,
                         0.0, put=False)
    args = (carry, window, jax.tree_util.tree_map(abstract, arrays),
            jax.tree_util.tree_map(abstract, consts))
    return self.compile(layout, args)

  def run(self, movie: Movie, plan: TilePlan, *, mean: float, prior: np.ndarray | None = None,
          out_dtype: Any = np.float32, channels: int = 0,
          slabs: tuple[int, int] | None = None, stats: DenoiseStats | None = None,
          progress: bool = False) -> Iterator[Frames]:
    """The movie denoised by `plan`, as consecutive `Frames`.

    Args:
      movie: the noisy movie.
      plan: the tile plan for its shape.
      mean: the movie's mean intensity (subtracted before the network, added back).
      prior: the (Y, X) mean image a mean-prior model is given (None otherwise).
      out_dtype: the frames' dtype (rounded and clipped, never wrapped).
      channels: values per output voxel (`Denoiser.channels`; 0: plain frames).
      slabs: only the plan's slabs [a, b) (`TilePlan.split` shares a movie between
        processes; default all).
      stats: a `DenoiseStats` filled in as it runs.
      progress: print a progress line.
    """
    stats = stats if stats is not None else DenoiseStats()
    a, b = slabs or (0, len(plan.slabs))
    if b <= a:
      return
    fewer = self.for_tiles((b - plan.warmup(a)) * plan.tiles_per_slab)
    if fewer is not self:
      yield from fewer.run(movie, plan, mean=mean, prior=prior, out_dtype=out_dtype,
                           channels=channels, slabs=slabs, stats=stats, progress=progress)
      return
    keep = (plan.final_after(a - 1), min(plan.final_after(b - 1), plan.shape[0]))
    windows = self.windows(plan, plan.warmup(a), b, keep)
    layout = self.layout(plan, windows, out_dtype, channels)
    consts = self.consts(plan, prior, mean)
    t_norm = plan.t_norm() if plan.blend else None
    stats.shape, stats.tile, stats.tiles = plan.shape, plan.tile, plan.tile_count
    stats.tiling, stats.recompute = plan.describe(), plan.recompute
    host_dtype = np.dtype(out_dtype)
    total = sum(len(w.slabs) for w in windows) * plan.tiles_per_slab
    bar = Progress(total, "tiles" if plan.mode == "exact" else "patches", enabled=progress)
    tile_voxels = int(np.prod(plan.tile))
    t_start = time.perf_counter()
    compile_before = self.compile_s
    carry = None
    if plan.blend:
      shape = (layout.window,) + layout.padded_frame + ((channels,) if channels else ())
      carry = jax.device_put(np.zeros(shape, np.float32), parallel.replicated(self.mesh))
    pending: collections.deque = collections.deque()
    done = 0

    def collect(submitted) -> Frames:
      nonlocal done
      frames = self.fetch(submitted, host_dtype)
      done += len(submitted[0].slabs) * plan.tiles_per_slab
      elapsed = time.perf_counter() - t_start - (self.compile_s - compile_before)
      bar.exclude(self.compile_s - compile_before)  # no compile time in the ETA
      bar.update(done, force=done == total, **{
          "movie voxels/s": f"{done * tile_voxels / plan.recompute / max(elapsed, 1e-9):.3g}"})
      stats.clipped += frames.clipped
      stats.rescale_skipped += int(submitted[1]["rescale_skipped"])
      if host_dtype.kind in "iu":
        stats.rounding_sq += frames.rounding_sq
        stats.rounded += frames.data.size - frames.clipped
        if frames.moments is not None:
          if stats.spread is None:
            stats.spread = TemporalSpread(frames.data.shape[1:])
          stats.spread.add_sums(len(frames.data), *frames.moments)
      return frames

    window = self.read_window(movie, plan.padded[0], windows[0].start, layout.window)
    for i, w in enumerate(windows):
      submitted = self.submit(layout, w, window, consts, mean, plan.tiles_per_slab, carry,
                              t_norm)
      carry = submitted[1]["carry"]
      pending.append(submitted)
      if i + 1 < len(windows):  # read the next window while the device works
        window = self.read_window(movie, plan.padded[0], windows[i + 1].start,
                                  layout.window)
      while len(pending) > (1 if i + 1 < len(windows) else 0):
        frames = collect(pending.popleft())
        if len(frames.data):
          yield frames
    stats.seconds = time.perf_counter() - t_start
    stats.compile_s = self.compile_s - compile_before
    if stats.rescale_skipped:
      log.warning("reference rescale skipped for %d patches whose sums were not positive.",
                  stats.rescale_skipped)


# ------------------------------------------------------------------ the denoiser


def resolve_model(model: Model | str | os.PathLike) -> Model:
  if isinstance(model, Model):
    return model
  if isinstance(model, Denoiser):
    raise UserError("a Denoiser was given where a model is expected; pass it as the "
                    "model argument of denoise() instead.")
  return load_model(os.fspath(model))


def _settings(name: str, doc: str) -> property:
  """A read-only view of one `DenoiseConfig` field on the `Denoiser`."""
  return property(lambda self: getattr(self.config, name), doc=doc)


class Denoiser:
  """A model ready to denoise: an immutable handle, compiled once per tile layout and
  reused for every movie.

  Args:
    model: a `Model`, a model directory or a DeepCAD-RT .pth.
    config: how to run it (`config.DenoiseConfig`: tiling, tile, memory budget, batch
      size, dtype, uncertainty symmetries...; default: the model's own settings).
    devices: the devices to use (default: all).
    network: a stand-in for the model's network on tiles (tests, benchmarks).
    **options: `DenoiseConfig` fields that replace `config`'s, e.g.
      `Denoiser(model, tiling="exact", symmetries=4)`.

  The overlap scheme's patch and overlap default to the model's inference or training
  patch and overlap; the exact tile to the largest the memory budget holds (a share of
  an accelerator's memory, DEVICE_MEMORY_SHARE, or of RAM on CPUs, HOST_MEMORY_SHARE).
  `with_params` gives a handle on other parameters of the same network that reuses what
  is compiled.
  """

  def __init__(self, model: Model | str | os.PathLike, config: DenoiseConfig | None = None,
               *, devices: Sequence[jax.Device] | None = None,
               network: TileFn | None = None, **options: Any):
    config = DenoiseConfig() if config is None else config
    if not isinstance(config, DenoiseConfig):
      raise TypeError(f"Denoiser's second argument is a DenoiseConfig, not "
                      f"{type(config).__name__}; give settings by name (patch=...).")
    if options:
      unknown = sorted(set(options) - {f.name for f in dataclasses.fields(DenoiseConfig)})
      if unknown:
        renamed = " (uncertainty is now symmetries)" if "uncertainty" in unknown else ""
        raise TypeError(f"Denoiser got unknown option(s) {', '.join(unknown)}{renamed}; "
                        "its options are DenoiseConfig's fields.")
      config = dataclasses.replace(config, **options)
    model = resolve_model(model)
    config.check_model(model.config.model)
    put = functools.partial(object.__setattr__, self)
    put("model", model)
    put("config", config)
    put("patch", tuple(config.patch or model.config.infer.patch or model.patch))
    put("overlap", model.overlap if config.overlap is None else config.overlap)
    put("mesh", parallel.data_mesh(devices, config.spatial))
    if network is None:
      network = tile_network(
          model.features, config.dtype, members=model.config.model.ensemble,
          ensemble_impl=model.config.model.ensemble_impl, symmetries=config.symmetries,
          keep_samples=config.save_samples, widths=model.config.model.widths,
          std_scale=float((model.meta.calibration or {}).get("std_scale", 1.0)))
    put("network", network)
    put("engine", Engine(network, model.params, self.mesh, config.batch_size,
                         scale=float(model.config.data.scale)))
    if config.tiling == "overlap" or config.reference_stitching:
      parallel.check_spatial(self.patch[1], config.spatial)
    put("_plans", {})  # (shape, dtypes) -> TilePlan; plans do not depend on parameters

  def __setattr__(self, name: str, value: Any) -> None:
    raise AttributeError(f"a Denoiser is immutable (setting {name!r}); build another, or "
                         "use with_params() for other parameters of the same network.")

  def with_params(self, params: Any) -> Denoiser:
    """This denoiser on other parameters of the same network (e.g. a later training
    step): a new handle that reuses the compiled steps and the tile plans."""
    other = copy.copy(self)
    object.__setattr__(other, "model", self.model.with_params(params))
    object.__setattr__(other, "engine", self.engine.with_params(params))
    return other

  dtype = _settings("dtype", "Compute dtype.")
  tiling = _settings("tiling", "'auto', 'exact' or 'overlap'.")
  tile = _settings("tile", "Exact tiling's largest tile, or None (from the budget).")
  memory_budget = _settings("memory_budget", "Bytes per device for exact tiles, or None.")
  blend = _settings("blend", "Blend the overlap scheme's patches.")
  reference_stitching = _settings("reference_stitching", "DeepCAD-RT's stitching.")
  spatial = _settings("spatial", "Devices splitting each tile's Y axis.")
  symmetries = _settings("symmetries", "K test-time symmetries for uncertainty (0: off).")
  save_samples = _settings("save_samples", "Keep every sample beside mean and std.")

  @property
  def batch_size(self) -> int:
    """Tiles per network call (resolved: a multiple of the devices)."""
    return self.engine.batch_size

  @property
  def explicit_overlap(self) -> bool:
    """Whether the overlap scheme's patch or overlap was asked for."""
    return self.config.overlap_scheme_asked

  @property
  def samples(self) -> int:
    """Samples per voxel with uncertainty: K symmetries x M ensemble members."""
    return self.symmetries * self.model.config.model.ensemble

  @property
  def channels(self) -> int:
    """Values per output voxel: 0 (plain frames), 2 (mean, std) or 2 + samples."""
    if not self.symmetries:
      return 0
    return 2 + (self.samples if self.save_samples else 0)

  def extra_outputs(self, output: str) -> list[str]:
    """The files written beside `output`, one per channel after the first."""
    if not self.channels:
      return []
    return [std_path(output)] + [sample_path(output, i) for i in range(self.channels - 2)]

  # -- plans --------------------------------------------------------------------

  def overlap_plan(self, shape: Sequence[int]) -> TilePlan:
    return overlap_plan(shape, self.patch, self.overlap, self.reference_stitching,
                        self.blend)

  def exact_plan(self, shape: Sequence[int], budget_scale: float = 1.0) -> TilePlan:
    return exact_plan(shape, self.exact_tile(shape, budget_scale), HALO, GRID * self.spatial)

  def exact_tile(self, shape: Sequence[int], budget_scale: float = 1.0
                 ) -> tuple[int, int, int]:
    """Exact tiling's largest tile (T, Y, X) for a movie of `shape`: `tile`, or the
    largest that `budget_scale` times the memory budget holds."""
    if self.tile is not None:
      return self.tile
    return choose_exact_tile(shape, self._voxel_budget() * budget_scale, HALO,
                             GRID * self.spatial, self._window_cost(shape))

  def _voxel_budget(self) -> float:
    """Tile voxels one device call may hold within the memory budget."""
    budget = memory_budget(list(self.mesh.devices.flat), self.memory_budget)
    params = sum(np.asarray(p).nbytes for p in jax.tree_util.tree_leaves(
        self.model.params))
    n_data = parallel.device_count(self.mesh)
    per_device_tiles = max(1, self.batch_size // n_data) / self.spatial
    bpv = self._bytes_per_voxel()
    return max(0.0, budget - 2 * params) / (bpv * per_device_tiles)

  def _bytes_per_voxel(self) -> float:
    cfg = self.model.config.model
    widths = cfg.widths or uniform_widths(self.model.features, cfg.in_channels)
    width = max(widths[0], widths[1], widths[-1], widths[-2])  # full resolution
    return bytes_per_voxel(width, self.dtype, cfg.in_channels, max(1, self.samples),
                           self.channels)

  def _window_cost(self, shape: Sequence[int]):
    """Voxel-equivalents of the buffers that scale with the window, not the tile: the
    raw and normalised window and the output window."""
    bpv = self._bytes_per_voxel()
    padded = [-(-n // GRID) * GRID for n in shape]
    per_frame = padded[1] * padded[2] * (16 + 8 * max(1, self.channels))

    def cost(tile):
      return tile[0] * per_frame / bpv
    return cost

  def plan(self, shape: Sequence[int], movie_dtype: Any = np.float32,
           out_dtype: Any = np.float32) -> TilePlan:
    """The tile plan for a movie of `shape` (see `tiling` and the class docstring).

    Exact tiles sized from the memory budget are checked against XLA's analysis of the
    compiled step (compiled here for `movie_dtype` and `out_dtype`, the run reuses it)
    and shrunk until they fit.
    """
    shape = tuple(int(n) for n in shape)
    key = (shape, np.dtype(movie_dtype).name, np.dtype(out_dtype).name)
    if key in self._plans:
      return self._plans[key]
    overlap = None
    if self.reference_stitching or self.tiling == "overlap" or (
        self.tiling == "auto" and (self.blend or self.explicit_overlap)):
      plan = self.overlap_plan(shape)
    else:
      overlap = self.overlap_plan(shape) if self.tiling == "auto" else None
      try:
        plan = self._fitted_exact_plan(shape, movie_dtype, out_dtype)
      except UserError as e:
        if overlap is None:
          raise
        log.info("overlap tiling for %s: %s", "x".join(map(str, shape)), e)
        plan = overlap
      if overlap is not None and plan.network_voxels > overlap.network_voxels:
        log.info("overlap tiling for %s: exact tiling would put %.2fx the movie through "
                 "the network within the memory budget, the overlap scheme %.2fx "
                 "(--tiling exact forces it; --memory-budget raises the budget).",
                 "x".join(map(str, shape)), plan.recompute, overlap.recompute)
        plan = overlap
    parallel.check_spatial(plan.tile[1], self.spatial)
    self._plans[key] = plan
    return plan

  def _fitted_exact_plan(self, shape, movie_dtype, out_dtype) -> TilePlan:
    """The exact plan; with tiles from the budget, shrunk until the compiled step fits."""
    scale = 1.0
    for _ in range(4):
      plan = self.exact_plan(shape, scale)
      if self.tile is not None:
        return plan
      _, compiled = self.engine.prepare(plan, movie_dtype, out_dtype=out_dtype,
                                        channels=self.channels,
                                        prior=self.model.config.model.mean_prior)
      need = compiled_bytes(compiled)
      budget = memory_budget(list(self.mesh.devices.flat), self.memory_budget)
      if need is None or need <= budget:
        return plan
      log.info("exact tiles of %s need %.2f GB per device by XLA's analysis, over the "
               "%.2f GB budget; using smaller tiles.", "x".join(map(str, plan.tile)),
               need / 1e9, budget / 1e9)
      scale *= 0.9 * budget / need
    raise UserError(f"exact tiles for a {'x'.join(map(str, shape))} movie do not fit the "
                    f"memory budget of {budget / 1e9:.2f} GB per device; raise "
                    "--memory-budget or use --tiling overlap.")

  def prior_for(self, movie: Movie, prior: np.ndarray | None = None) -> np.ndarray | None:
    """The mean image a mean-prior model is given: `prior`, or the movie's own."""
    if not self.model.config.model.mean_prior:
      return None
    image = movie.mean_image() if prior is None else np.asarray(prior, np.float32)
    if tuple(image.shape) != tuple(movie.shape[1:]):
      raise UserError(f"the mean image is {tuple(image.shape)} but {movie.name} has "
                      f"frames of {movie.shape[1]}x{movie.shape[2]}; give the mean image "
                      "of this recording.")
    return image

  # -- running ------------------------------------------------------------------

  def frames(self, movie: Movie, *, out_dtype: Any = np.float32,
             stats: DenoiseStats | None = None, mean: float | None = None,
             progress: bool = False, prior: np.ndarray | None = None,
             slabs: tuple[int, int] | None = None) -> Iterator[Frames]:
    """The denoised movie as consecutive `Frames` in `out_dtype` (rounded, clipped).

    Args:
      movie: the noisy movie (a `Movie`, array or path).
      out_dtype: the frames' dtype.
      stats: a `DenoiseStats` filled in as it runs.
      mean: the movie's mean intensity (default: computed from the movie).
      progress: print a progress line.
      prior: the mean image for a mean-prior model (default: the movie's own).
      slabs: only the plan's slabs [a, b) (default all; see `Engine.run`).
    """
    movie = as_movie(movie)
    mean = movie.mean() if mean is None else float(mean)
    plan = self.plan(movie.shape, movie.dtype, out_dtype)
    return self.engine.run(movie, plan, mean=mean, prior=self.prior_for(movie, prior),
                           out_dtype=out_dtype, channels=self.channels, slabs=slabs,
                           stats=stats, progress=progress)

  def blocks(self, movie: Movie, stats: DenoiseStats | None = None, mean=None,
             progress: bool = False, prior: np.ndarray | None = None,
             slabs: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """Denoised float32 blocks of frames, in order ((n, Y, X, channels) with
    uncertainty: [mean, std, samples...]).

    Args:
      movie, stats, mean, progress, prior, slabs: as for `frames`.
    """
    for f in self.frames(movie, stats=stats, mean=mean, progress=progress, prior=prior,
                         slabs=slabs):
      yield f.data if f.extras is None else Channels.join(f.data, f.extras)


INFER_FIX = ("lower --memory-budget or --batch-size, give a smaller --tile, or use "
             "--tiling overlap with a smaller --patch")


def as_denoiser(model: Model | str | os.PathLike | Denoiser,
                config: DenoiseConfig | None = None, devices=None, **options: Any
                ) -> Denoiser:
  """`model` as a `Denoiser`: built with `config`, `options` (DenoiseConfig fields)
  and `devices`, or the Denoiser given, which already holds its settings (then giving
  settings again is refused rather than half-used)."""
  if not isinstance(model, Denoiser):
    return Denoiser(model, config, devices=devices, **options)
  if options or devices is not None or config is not None:
    given = sorted(options) + (["devices"] if devices is not None else []) + (
        ["config"] if config is not None else [])
    raise UserError(f"a Denoiser already holds its settings; give {', '.join(given)} "
                    "when building it, not again here.")
  return model


@resources.device_memory("denoising", INFER_FIX)
def denoise(movie: Any, model: Model | str | Denoiser, config: DenoiseConfig | None = None,
            *, output_dtype: Any = None, devices: Sequence[jax.Device] | None = None,
            progress: bool = False, **options: Any) -> np.ndarray | tuple[np.ndarray, ...]:
  """Denoise a (T, Y, X) movie (array, path or Movie) with a trained model.

  Args:
    movie: the noisy movie.
    model: a `Model`, a model directory, a DeepCAD-RT .pth or a `Denoiser` (which holds
      its own settings; then give no config or options).
    config: how to run the model (`config.DenoiseConfig`; default: the model's own).
    output_dtype: None (float32, the network's precision), 'input' (the input's dtype,
      rounded and clipped on the device) or a dtype.
    devices: the devices to use (default: all).
    progress: print a progress line.
    **options: `DenoiseConfig` fields that replace `config`'s: tiling, tile,
      memory_budget, batch_size, dtype, symmetries, save_samples, patch, overlap, blend,
      reference_stitching, spatial.

  Returns:
    The denoised movie in the input's shape; with `symmetries` = K, (mean, std) over K
    test-time symmetries (times the ensemble's members), std float32; `save_samples`
    adds a third item, the float32 samples (S, T, Y, X).
  """
  movie = as_movie(movie)
  den = as_denoiser(model, config, devices, **options)
  out_dtype = resolve_output_dtype(output_dtype, movie.dtype)
  out = np.empty(movie.shape, out_dtype)
  extra = np.empty((den.channels - 1,) + movie.shape, np.float32) if den.channels else None
  for f in den.frames(movie, out_dtype=out_dtype, progress=progress):
    out[f.start:f.start + len(f.data)] = f.data
    if extra is not None:
      extra[:, f.start:f.start + len(f.data)] = np.moveaxis(f.extras, -1, 0)
  if extra is None:
    return out
  return (out, extra[0]) if len(extra) == 1 else (out, extra[0], extra[1:])


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

  def describe(self) -> str:
    """The report's lines for the command line."""
    lines = [f"{self.input} -> {self.output}  {self.shape} {self.dtype}  "
             f"{self.seconds:.2f}s  {self.voxels_per_s:.3g} voxels/s  clipped "
             f"{self.clipped}", f"  tiling: {self.tiling}"]
    if self.std:
      lines.append(f"  uncertainty (std over {self.spread_over}): {self.std}")
    if self.samples:
      lines.append(f"  samples: {self.samples[0]} .. {self.samples[-1]}")
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
            seconds: float | None = None) -> FileReport:
  seconds = stats.seconds if seconds is None else seconds
  extras = den.extra_outputs(dst)
  members = den.model.config.model.ensemble
  spread = f"{den.symmetries} symmetries" + (f" x {members} members" if members > 1
                                              else "")
  return FileReport(movie.name, dst, movie.shape, str(out_dtype), stats.tiles,
                    stats.tiling, stats.recompute, seconds,
                    float(np.prod(movie.shape)) / seconds if seconds else 0.0,
                    stats.clipped, stats.rounding_rms, extras[0] if extras else None,
                    tuple(extras[1:]), spread if extras else "")


class TemporalSpread:
  """How much a movie varies in time: each pixel's temporal variance, from per-pixel
  sums accumulated block by block (`add_sums`, as the device returns them, or `add`:
  frames, over a strided grid of at most `max_pixels` pixels), averaged over pixels."""

  def __init__(self, frame_shape: Sequence[int], max_pixels: int = 2**16):
    self.step = max(1, int(np.ceil(np.sqrt(frame_shape[0] * frame_shape[1] /
                                           max_pixels))))
    self.n = 0
    self.sum: np.ndarray | None = None
    self.sum_sq: np.ndarray | None = None

  def add_sums(self, n: int, total: np.ndarray, total_sq: np.ndarray) -> None:
    """n frames' per-pixel sums of x - c and (x - c)^2 (any constant c)."""
    if self.sum is None:
      self.sum, self.sum_sq = np.zeros(total.shape), np.zeros(total.shape)
    self.sum += total
    self.sum_sq += total_sq
    self.n += int(n)

  def add(self, block: np.ndarray) -> None:
    b = np.asarray(block[:, ::self.step, ::self.step], np.float64)
    self.add_sums(len(b), b.sum(0), (b * b).sum(0))

  def variance(self) -> float:
    """The mean over pixels of each pixel's temporal variance."""
    if not self.n:
      return 0.0
    mean = self.sum / self.n
    return float(np.mean(np.maximum(self.sum_sq / self.n - mean * mean, 0.0)))


def quantisation_note(dst: str, out_dtype, stats: DenoiseStats) -> str | None:
  """One line when rounding to an integer `out_dtype` added more than
  QUANTISATION_NOTE of the denoised movie's temporal variation (RMS over pixels of
  each pixel's temporal std, before rounding; both measured)."""
  q = stats.rounding_rms
  if not q or stats.spread is None:
    return None
  signal = float(np.sqrt(stats.spread.variance()))
  if q <= QUANTISATION_NOTE * signal:
    return None
  share = f"{100 * q / signal:.0f}%" if signal else "more than all"
  return (f"rounding {dst} to {np.dtype(out_dtype).name} added {q:.2f} counts RMS of "
          f"quantisation noise, {share} of the denoised movie's temporal variation "
          f"({signal:.2f} counts RMS); the default --output-dtype float32 keeps the "
          "network's precision.")


def resolve_output_dtype(requested: Any, input_dtype: Any) -> np.dtype:
  """The output dtype: float32 by default (what the network computes), the input's
  dtype for 'input', else the one named (a float or integer type)."""
  if requested is None:
    return np.dtype(np.float32)
  if isinstance(requested, str) and requested.strip().lower() == "input":
    return np.dtype(input_dtype)
  try:
    dtype = np.dtype(requested)
  except TypeError:
    dtype = None
  if dtype is None or dtype.kind not in "fiu":
    raise UserError(f"--output-dtype takes float32 (the default), input (the input's "
                    f"type), uint16, int16 or another integer type; got {requested!r}.")
  return dtype


def _write_one(movie: Movie, dst: str, den: Denoiser, out_dtype, progress: bool,
               overwrite: bool = False, outputs: SplitOutputs | None = None
               ) -> FileReport:
  """Denoise one movie into `dst` (and its std and samples beside it), written as it
  is produced; the files appear together once all are complete (a plane's slice of a
  file: once every plane is, `outputs`)."""
  stats = DenoiseStats()
  log.info("Denoising %s %s -> %s", movie.name, movie.shape, dst)
  with _movie_writers(dst, den.extra_outputs(dst), movie, out_dtype, overwrite,
                      outputs) as writers:
    _write_frames(den.frames(movie, out_dtype=out_dtype, stats=stats, progress=progress),
                  writers)
  note = quantisation_note(dst, out_dtype, stats)
  if note:
    log.warning("%s", note)
  return _report(movie, dst, den, out_dtype, stats)


@contextlib.contextmanager
def _movie_writers(dst: str, extras: Sequence[str], movie: Movie, out_dtype,
                   overwrite: bool, outputs: SplitOutputs | None = None
                   ) -> Iterator[list[MovieWriter]]:
  """Writers for `dst` and its extra (float32) outputs, with the input's metadata, after
  checking their disk has room; committed together when the block succeeds, all
  removed if it fails."""
  shape = movie.shape
  check_space([(dst, movie_bytes(shape, out_dtype))] +
              [(p, movie_bytes(shape, np.float32)) for p in extras])
  metadata = movie.metadata
  outputs = outputs if outputs is not None else SplitOutputs()
  with outputs_together() as writers:
    for path, dtype in [(dst, out_dtype)] + [(p, np.float32) for p in extras]:
      writers.append(outputs.writer(path, shape[1:], dtype, frames=shape[0],
                                    metadata=metadata, overwrite=overwrite,
                                    recording=movie.recording))
    yield writers


def _write_frames(frames: Iterator[Frames], writers: Sequence[MovieWriter]) -> None:
  """Each block's data to writers[0], extra channel i (float32) to writers[1 + i]."""
  for f in frames:
    writers[0].write(f.data)
    for i, w in enumerate(writers[1:]):
      w.write(f.extras[..., i])


def std_path(output: str) -> str:
  """Where the uncertainty (std) movie of `output` goes: beside it, `*_std.tif` (in
  the output's format)."""
  return with_name_suffix(output, "_std")


def sample_path(output: str, i: int) -> str:
  """Where sample `i` of `output` goes with --save-samples: `*_sample00.tif`, ..."""
  return with_name_suffix(output, f"_sample{i:02d}")


def _part_path(dst: str, p: int) -> str:
  """Process p's share of a shared movie: a temporary file beside `dst`."""
  folder, name = os.path.split(os.path.abspath(dst))
  return os.path.join(folder, f".{name}.part{p}{PARTIAL_SUFFIX}")


def _write_shared(movie: Movie, dst: str, den: Denoiser, out_dtype, progress: bool,
                  overwrite: bool = False) -> FileReport | None:
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

    def parts():  # every process's frames, in order, 64 at a time
      for q in range(n_proc):
        data = np.memmap(_part_path(dst, q), np.float32, "r") if os.path.getsize(
            _part_path(dst, q)) else np.zeros(0, np.float32)
        frames = data.reshape((-1,) + frame_shape)
        for t in range(0, len(frames), 64):
          block = np.asarray(frames[t:t + 64])
          main, clipped = to_dtype(Channels.mean(block) if channels else block, out_dtype)
          stats.clipped += clipped
          yield Frames(0, main, Channels.extras(block) if channels else None, clipped)
        del data, frames

    stats.clipped = 0
    try:
      with _movie_writers(dst, den.extra_outputs(dst), movie, out_dtype,
                          overwrite) as writers:
        _write_frames(parts(), writers)
    finally:
      for q in range(n_proc):
        with contextlib.suppress(OSError):
          os.remove(_part_path(dst, q))
    report = _report(movie, dst, den, out_dtype, stats, time.perf_counter() - t0)
  distributed.barrier(f"assembled-{dst}")
  return report


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
                  **options: Any) -> list[FileReport]:
  """Denoise a TIFF file or a folder of them, writing each output as it is produced.

  Each output carries the input's metadata and appears only once complete
  (`data.output`). An input is never written over; for a folder, outputs already
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
    **options: `DenoiseConfig` fields, as for `denoise`.

  Returns:
    One `FileReport` per movie this process denoised (none for skipped outputs).
  """
  input, output = os.fspath(input), os.fspath(output)
  inputs = list_movies(input)
  outputs = _output_paths(inputs, input, output, together=jax.process_count() == 1)
  folder = os.path.isdir(input) and not is_store(input)
  n_proc = jax.process_count()
  if n_proc > 1 and devices is None and not isinstance(model, Denoiser):
    devices = jax.local_devices()
  den = as_denoiser(model, config, devices, **options)
  movies = [open_movie(p) for p in inputs]
  todo = []
  for src, movie, dst in zip(inputs, movies, outputs):
    src_path = MovieSpec.parse(src).path
    dst_path = written_path(dst, movie.shape[1:], movie.shape[0])
    if os.path.exists(dst_path) and os.path.samefile(src_path, dst_path):
      raise UserError(f"--output {dst} is the input file; choose another output.")
    out_dtype = resolve_output_dtype(output_dtype, movie.dtype)
    paths = [dst] + den.extra_outputs(dst)
    if folder and not overwrite and any(os.path.lexists(MovieSpec.parse(p).path)
                                        for p in paths):
      why = _complete_output(paths, movie, out_dtype)
      if why is None:
        log.info("skipping %s: %s is already complete (--overwrite redoes it).", src, dst)
        continue
      existing = next(p for p in paths if os.path.lexists(MovieSpec.parse(p).path))
      raise UserError(f"{existing} already exists but is not a complete output of {src} "
                      f"({why}); add --overwrite to redo it, or remove it.")
    refuse_to_overwrite(paths, overwrite)
    todo.append((movie, dst, out_dtype))
  if folder:
    if not todo:
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
    for i, (movie, dst, out_dtype) in enumerate(todo):
      try:
        if shared:
          report = _write_shared(movie, dst, den, out_dtype, progress, overwrite)
        elif i % n_proc == jax.process_index():
          report = _write_one(movie, dst, den, out_dtype, progress, overwrite,
                              split)
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
      if report.clipped:
        log.warning("%d voxels (%.3g%%) of %s were outside the %s range and were clipped.",
                    report.clipped, 100 * report.clipped / np.prod(movie.shape), dst,
                    out_dtype)
      reports.append(report)
  distributed.barrier("denoise-done")
  return reports


def denoise_with(movie: Any, tile_fn: TileFn, plan: TilePlan, *, params: Any = None,
                 mean: float | None = None, batch_size: int = 0, devices=None,
                 channels: int = 0, out_dtype: Any = np.float32) -> np.ndarray:
  """Any network on normalised tiles (`tile_fn(params, tiles, prior)`) applied to a
  movie with `plan`: the inference engine without a model (tests, research on tiling).

  Args:
    movie: the movie (array, path or `Movie`).
    tile_fn: the network on normalised tiles (`predict.TileFn`).
    plan: the tile plan for the movie's shape.
    params: `tile_fn`'s parameters.
    mean: the movie's mean intensity (default: computed from the movie).
    batch_size: tiles per call (0: one per device).
    devices: the devices to use (default: all).
    channels: values per output voxel that `tile_fn` gives (0: plain frames).
    out_dtype: the output's dtype.

  Returns:
    The denoised movie in `out_dtype` (float32 by default), (T, Y, X), or
    (T, Y, X, channels) with `channels`.
  """
  movie = as_movie(movie)
  mean = movie.mean() if mean is None else float(mean)
  engine = Engine(tile_fn, params, parallel.data_mesh(devices), batch_size)
  parts = [f.data if f.extras is None else Channels.join(f.data, f.extras)
           for f in engine.run(movie, plan, mean=mean, channels=channels,
                               out_dtype=out_dtype)]
  return np.concatenate(parts)


def whole_movie_forward(movie: np.ndarray, den: Denoiser, mean: float | None = None,
                        prior: np.ndarray | None = None) -> np.ndarray:
  """The denoiser's network applied once to the whole movie, padded (reflected) to a
  multiple of 8 on every axis and cropped back: what exact tiling must reproduce.
  float32, mean added back; for tests and the seam measurement (needs the whole movie
  in memory)."""
  movie = np.asarray(movie, np.float32)
  norm = Normalisation(np.float32(movie.mean() if mean is None else mean),
                       np.float32(den.engine.scale))
  shape = movie.shape
  padded = tuple(-(-n // GRID) * GRID for n in shape)
  idx = [reflect_index(np.arange(p), n) for p, n in zip(padded, shape)]
  x = norm.to_network(movie)[idx[0]][:, idx[1]][:, :, idx[2]]
  p = None
  image = den.prior_for(as_movie(movie), prior)
  if image is not None:
    p = norm.to_network(image)[idx[1]][:, idx[2]][None]
  out = jax.jit(den.network)(den.engine.params, jnp.asarray(x[None]),
                             None if p is None else jnp.asarray(p))
  out = np.asarray(out)[0, :shape[0], :shape[1], :shape[2]]
  if out.ndim == 3:
    return norm.from_network(out)
  return Channels.join(norm.from_network(Channels.mean(out)), np.concatenate(
      [norm.spread_from_network(Channels.std(out))[..., None],
       norm.from_network(Channels.samples(out))], axis=-1))
