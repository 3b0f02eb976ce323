"""The engine: runs a tile plan over a movie, one window of frames at a time.

While the device computes window k, the host reads window k+1 and writes window k-1's
frames, so memory holds a few windows, never the movie. Each window goes to the device
once in its own dtype; the compiled step (`step.predict_step`) does the rest there."""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import time
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from deepcad_jax.runtime import parallel
from deepcad_jax.data.movie import Movie
from deepcad_jax.errors import UserError
from deepcad_jax.core.normalise import Normalisation
from deepcad_jax.denoising.step import (StepLayout, TileFn, compile_predict_step,
                                        frame_padding, reflect_index)
from deepcad_jax.runtime.progress import Progress
from deepcad_jax.denoising.tiling import TilePlan
from deepcad_jax.denoising.outputs import Converted, DenoiseStats, host_convert

log = logging.getLogger("deepcad_jax")


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


WAIT_POLL_S = 0.05  # how often a wait for the device lets Ctrl-C and SIGTERM through


def _wait(array: Any) -> None:
  """Wait for a device array in short sleeps: Python runs its signal handlers between
  them, so Ctrl-C or SIGTERM stops a run at once instead of after the call (a large tile
  can take tens of seconds)."""
  ready = getattr(array, "is_ready", None)
  if ready is None:
    return
  while not ready():
    time.sleep(WAIT_POLL_S)


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
    tile_fn: the network on normalised tiles (`step.tile_network`, or a stand-in).
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
             put: bool = True, scale: float | None = None) -> dict:
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
      p = Normalisation(np.float32(mean), np.float32(
          self.scale if scale is None else scale)).to_network(
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
             t_norm: np.ndarray | None = None, scale: float | None = None
             ) -> tuple[Window, dict, tuple[int, int]]:
    """Start one call (asynchronously): (window, device outputs, rows to keep).

    Args:
      layout: the step's static layout.
      w: the window.
      window: its raw frames in the movie's dtype (`read_window`).
      consts: the plan's per-movie arrays, on the devices (`consts`).
      mean, per_slab, t_norm: as for `window_arrays`.
      scale: the movie's scale (`normalise`; default the engine's).
      carry: blending's output window carried from the previous call (None for the
        first call, or without blending).
    """
    rep = parallel.replicated(self.mesh)
    arrays, rows = self.window_arrays(layout, w, per_slab, mean, t_norm,
                                      self.scale if scale is None else scale)
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
    _wait(out["frames"])
    data = np.asarray(out["frames"])[r0:r1]
    extras = None if out["extras"] is None else np.asarray(out["extras"])[r0:r1]
    clipped = int(out["clipped"])
    rounding_sq = float(out["rounding_sq"])
    moments = None if out["moments"] is None else np.asarray(out["moments"], np.float64)
    if data.dtype != host_dtype:  # integers wider than 16 bits: converted here
      converted = host_convert(data, host_dtype)
      data, clipped = converted.data, clipped + converted.clipped
      rounding_sq += converted.rounding_sq
      moments = converted.moments if converted.moments is not None else moments
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
          scale: float | None = None, out_dtype: Any = np.float32, channels: int = 0,
          slabs: tuple[int, int] | None = None, stats: DenoiseStats | None = None,
          progress: bool = False) -> Iterator[Frames]:
    """The movie denoised by `plan`, as consecutive `Frames`.

    Args:
      movie: the noisy movie.
      plan: the tile plan for its shape.
      mean: the movie's mean intensity (subtracted before the network, added back).
      scale: the movie's scale (`normalise`; default the engine's, the model's).
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
      yield from fewer.run(movie, plan, mean=mean, prior=prior, scale=scale,
                           out_dtype=out_dtype,
                           channels=channels, slabs=slabs, stats=stats, progress=progress)
      return
    keep = (plan.final_after(a - 1), min(plan.final_after(b - 1), plan.shape[0]))
    windows = self.windows(plan, plan.warmup(a), b, keep)
    layout = self.layout(plan, windows, out_dtype, channels)
    consts = self.consts(plan, prior, mean, scale=scale)
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
      stats.rescale_skipped += int(submitted[1]["rescale_skipped"])
      stats.count(Converted(frames.data, frames.clipped, frames.rounding_sq,
                            frames.moments))
      return frames

    window = self.read_window(movie, plan.padded[0], windows[0].start, layout.window)
    for i, w in enumerate(windows):
      submitted = self.submit(layout, w, window, consts, mean, plan.tiles_per_slab, carry,
                              t_norm, scale)
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
