"""`StreamDenoiser`: frames pushed as they arrive, denoised frames pulled back in order.

It cuts time with the same `tiling.AxisTiling` and (y, x) with the same
`tiling.TilePlan` as offline denoising, and runs each temporal tile through the same
`engine.Engine` and compiled predict step (see `deepcad_jax.stream` for the two tilings).
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Iterator

import numpy as np

from deepcad_jax.runtime import parallel
from deepcad_jax.data.movie import ArrayMovie
from deepcad_jax.errors import UserError
from deepcad_jax.denoising.denoiser import Denoiser
from deepcad_jax.denoising.engine import Window
from deepcad_jax.denoising.step import Channels
from deepcad_jax.denoising.tiling import (GRID, HALO, AxisTiling, TilePlan, ceil_to,
                                          exact_plan, gap, overlap_plan)

log = logging.getLogger("deepcad_jax")

STREAM_TILINGS = ("exact", "overlap")
CORE_FRAMES = 32   # exact streams: frames completed per device call, by default


def check_denoiser(den: Denoiser) -> None:
  """Refuse the `Denoiser` settings a stream cannot honour (it crops its batches)."""
  asked = "blend" if den.blend else "reference_stitching" if den.reference_stitching \
      else None
  if asked:
    raise UserError(f"a stream crops the overlap of its batches and cannot honour "
                    f"{asked}=True; give it a Denoiser without {asked}, or denoise the "
                    "recording offline.")


def _choose_tiling(tiling: str | None, den: Denoiser, batch_frames: int | None,
                   overlap_frames: int | None) -> str:
  """The stream's tiling: as asked, or as the Denoiser (or the batch flags) says."""
  if tiling is None:
    tiling = "overlap" if (batch_frames is not None or overlap_frames is not None or
                           den.tiling == "overlap" or den.explicit_overlap) else "exact"
  if tiling not in STREAM_TILINGS:
    raise UserError(f"stream tiling must be one of {', '.join(STREAM_TILINGS)}; got "
                    f"{tiling!r}.")
  return tiling


def _overlap_time(batch_frames: int, overlap_frames: int | None, overlap: float
                  ) -> tuple[AxisTiling, int]:
  """(temporal tiling, lookahead) of the overlap scheme's batches."""
  b = int(batch_frames)
  o = int(overlap_frames if overlap_frames is not None else b - gap(b, overlap))
  if b < 2 or not 0 <= o < b:
    raise UserError(f"need batch_frames >= 2 and 0 <= overlap_frames < batch_frames; "
                    f"got {b} and {o}.")
  return AxisTiling(b, b - o, o // 2), b - (b - o) - o // 2


def _exact_time(core_frames: int | None, lookahead: int | None
                ) -> tuple[AxisTiling, int]:
  """(temporal tiling, lookahead) of exact tiles completing `core_frames` each."""
  core = int(core_frames or CORE_FRAMES)
  ahead = HALO if lookahead is None else int(lookahead)
  if core < GRID or core % GRID:
    raise UserError(f"core_frames must be a positive multiple of {GRID}; got {core}.")
  if not 0 <= ahead <= HALO or ahead % GRID:
    raise UserError(f"lookahead must be a multiple of {GRID} from 0 to {HALO} (the "
                    f"halo that makes the stream exact); got {ahead}.")
  return AxisTiling(HALO + core + ahead, core, HALO), ahead


class StreamDenoiser:
  """Denoise frames pushed one at a time or in blocks; pull them back in order.

  Args:
    model: a `Model`, model directory, .pth, or a `Denoiser` (whose network, devices,
      batch size, dtype, memory budget, exact tile and uncertainty are used; blend and
      reference stitching are refused).
    batch_frames, overlap_frames: the overlap scheme's temporal batches (giving either
      selects it unless `tiling` says otherwise); default the model's patch T and
      overlap.
    tiling: 'exact' (default) or 'overlap'.
    core_frames: exact streams: frames completed per call (a multiple of 8).
    lookahead: exact streams: future frames of context (a multiple of 8, at most the
      halo, 48); below the halo the output is no longer exact.
    patch_yx, overlap, batch_size, dtype, devices: the Denoiser's, when a model is given.
    mean: 'model' (the training mean stored with the model; the default), 'running'
      (the mean of the frames seen so far, frozen per call), or a number (or its text).
    mean_image: for a model trained with the mean-image prior, the (Y, X) image to give
      it (the same result as offline `denoise` with that image); default the per-pixel
      mean of the frames seen so far, frozen per call.
  """

  def __init__(self, model: Any, batch_frames: int | None = None,
               overlap_frames: int | None = None, *, tiling: str | None = None,
               core_frames: int | None = None, lookahead: int | None = None,
               patch_yx: tuple[int, int] | None = None, overlap: float | None = None,
               batch_size: int = 0, dtype: str = "float32", mean: str | float = "model",
               devices=None, mean_image: np.ndarray | None = None):
    den = model if isinstance(model, Denoiser) else Denoiser(
        model, devices=devices, overlap=overlap, batch_size=batch_size, dtype=dtype)
    check_denoiser(den)
    self.den = den
    self.tiling = _choose_tiling(tiling, den, batch_frames, overlap_frames)
    pt, py, px = den.patch
    self.patch_yx = tuple(patch_yx or (py, px))
    if self.tiling == "overlap":
      self.time, self.lookahead = _overlap_time(batch_frames or pt, overlap_frames,
                                                den.overlap)
    else:
      self.time, self.lookahead = _exact_time(core_frames, lookahead)
    if isinstance(mean, str) and mean not in ("model", "running"):
      try:
        mean = float(mean)
      except ValueError:
        mean = float("nan")
      if not np.isfinite(mean):
        raise UserError(f"mean must be 'model', 'running' or a finite number; got "
                        f"{mean!r}.")
    if mean == "model" and den.model.mean is None:
      raise UserError(f"{den.model.source} stores no training mean (an imported .pth); "
                      "use mean='running' or give a number.")
    self.mean_mode = mean
    self.mean_image = None if mean_image is None else np.asarray(mean_image, np.float32)
    self.uses_prior = den.model.config.model.mean_prior
    self._sum = 0.0
    self._count = 0
    self._pixel_sum: np.ndarray | None = None  # per-pixel sums, for a running mean image
    self.frames: list[np.ndarray] = []  # received frames later tiles may still read
    self.base = 0                       # stream index of frames[0]
    self.received = 0
    self.emitted = 0
    self.next_tile = 0                  # index of the next regular temporal tile
    self.ready: collections.deque[np.ndarray] = collections.deque()
    self.closed = False
    self.frame_shape: tuple[int, int] | None = None
    self.batches = 0
    self._plans: dict[int, TilePlan] = {}
    self._consts: dict[tuple, Any] = {}

  @property
  def exact(self) -> bool:
    """Whether every frame equals one forward pass over the whole recording."""
    return self.tiling == "exact" and self.lookahead >= HALO

  @property
  def B(self) -> int:
    """Frames per temporal tile."""
    return self.time.tile

  @property
  def overlap_frames(self) -> int:
    """Frames shared by consecutive temporal tiles."""
    return self.time.tile - self.time.core

  def latency_frames(self) -> tuple[int, int]:
    """(fewest, most) frames a frame waits for before its tile can run, once the
    stream is past its first `startup_frames` (those wait for the whole first tile)."""
    return self.lookahead, self.time.core + self.lookahead

  @property
  def startup_frames(self) -> int:
    """Frames the first tile completes: they wait until it is full (up to its length)."""
    return self.time.regular(0).keep_hi

  def extra_outputs(self, output: str) -> list[str]:
    """The files written beside `output` with uncertainty (std, samples), as offline."""
    return self.den.extra_outputs(output)

  def describe(self) -> str:
    if self.tiling == "overlap":
      return (f"overlap batches of {self.B} frames overlapping by {self.overlap_frames}")
    what = "exact" if self.exact else f"approximate (lookahead {self.lookahead} < halo {HALO})"
    return (f"{what}: tiles of {self.B} frames completing {self.time.core} each "
            f"(halo {HALO}, lookahead {self.lookahead})")

  # -- input ------------------------------------------------------------------

  def push(self, frames: np.ndarray) -> None:
    """Add one frame (Y, X) or a block (n, Y, X); denoises every tile completed."""
    if self.closed:
      raise UserError("this stream is closed; start a new StreamDenoiser.")
    frames = np.asarray(frames)
    if frames.ndim == 2:
      frames = frames[None]
    if frames.ndim != 3:
      raise UserError(f"push() takes a frame (Y, X) or frames (n, Y, X); got shape "
                      f"{frames.shape}.")
    if self.frame_shape is None:
      self.frame_shape = tuple(frames.shape[1:])
    elif tuple(frames.shape[1:]) != self.frame_shape:
      raise UserError(f"frame shape changed from {self.frame_shape} to {frames.shape[1:]}.")
    for f in frames:
      self.frames.append(f)
      self._sum += float(f.sum(dtype=np.float64))
      self._count += f.size
    if self.uses_prior and self.mean_image is None:
      block = frames.sum(0, dtype=np.float64)
      self._pixel_sum = block if self._pixel_sum is None else self._pixel_sum + block
    self.received += len(frames)
    while self.time.regular(self.next_tile).start + self.B <= self.received:
      tile = self.time.regular(self.next_tile)
      self._process(tile, padded=None)
      self.next_tile += 1

  def close(self) -> None:
    """The stream ended: denoise the tail so every pushed frame comes out."""
    if self.closed:
      return
    self.closed = True
    n = self.received
    if n == 0 or self.emitted >= n:
      return
    # Pad as offline denoising pads a movie of n frames.
    if self.tiling == "exact" or n < self.B:
      padded = ceil_to(n)
    else:
      padded = n
    self._process(self.time.last(self.next_tile, padded), padded)

  def _mean(self) -> float:
    if self.mean_mode == "model":
      return float(self.den.model.mean)
    if self.mean_mode == "running":
      return self._sum / max(1, self._count)
    return float(self.mean_mode)

  def _prior(self) -> np.ndarray | None:
    if not self.uses_prior:
      return None
    if self.mean_image is not None:
      return self.mean_image
    return (self._pixel_sum / self.received).astype(np.float32)

  def frame_plan(self, tile_t: int) -> TilePlan:
    """The (y, x) tiling of this stream's frames, for temporal tiles of `tile_t` frames
    (the same as offline denoising chooses)."""
    if tile_t not in self._plans:
      shape = (tile_t,) + tuple(self.frame_shape)
      if self.tiling == "overlap":
        plan = overlap_plan(shape, (tile_t,) + self.patch_yx, self.den.overlap)
      else:
        tile = self.den.exact_tile(shape)
        plan = exact_plan(shape, (tile_t,) + tuple(tile[1:]), HALO, GRID * self.den.spatial)
      parallel.check_spatial(plan.tile[1], self.den.spatial)  # as offline plans are
      self._plans[tile_t] = plan
    return self._plans[tile_t]

  def prepare(self, frame_shape: tuple[int, int], dtype: Any = np.float32) -> None:
    """Compile the step for regular tiles of (Y, X) = `frame_shape` frames of `dtype`
    now, before frames arrive; otherwise the first tile waits for the compilation
    (`run_pipeline` calls this when the source knows its frame shape)."""
    if self.frame_shape is None:
      self.frame_shape = tuple(int(n) for n in frame_shape)
    tile = self.time.regular(0)
    engine, layout, plan, w = self._call(tile, None, keep=(0, tile.keep_hi))
    engine.compile_for(layout, plan, w, dtype, self.uses_prior)

  def _call(self, tile, padded: int | None, keep: tuple[int, int]):
    """(engine, layout, frame plan, window) of one call for temporal tile `tile`."""
    length = self.B if padded is None or padded >= self.B else padded
    plan = self.frame_plan(length)
    engine = self.den.engine.for_tiles(plan.tiles_per_slab)
    weights = np.zeros(length, np.float32)
    weights[max(0, keep[0] - tile.start):keep[1] - tile.start] = 1
    w = Window(tile.start, [(0, weights, None)], keep, keep)
    # Frames per call: a regular tile completes at most halo + core, the end-aligned
    # last one at most its length - halo, or all of it when it is the only one.
    emit = length if tile.start == 0 and padded is not None else max(
        length - self.time.halo, self.time.core + self.time.halo)
    layout = engine.layout(plan, [w], np.float32, self.den.channels, emit=emit)
    return engine, layout, plan, w

  def _process(self, tile, padded: int | None) -> None:
    """Denoise the temporal tile `tile` (stream coordinates); `padded`: the stream's
    padded length, for the last tile."""
    keep = (self.emitted, min(tile.keep_hi, self.received))
    engine, layout, plan, w = self._call(tile, padded, keep)
    hi = self.received if padded is not None else tile.start + layout.window
    window = engine.read_window(_Buffered(self, hi), padded or hi, tile.start,
                                layout.window)
    mean = self._mean()
    prior = self._prior()
    key = (layout.window, id(engine))
    if prior is not None or key not in self._consts:  # the same for every tile otherwise
      self._consts[key] = engine.consts(plan, prior, mean)
    consts = self._consts[key]
    frames = engine.fetch(engine.submit(layout, w, window, consts, mean,
                                        plan.tiles_per_slab), np.float32)
    self.batches += 1
    out = frames.data if frames.extras is None else Channels.join(frames.data,
                                                                  frames.extras)
    self._emit(out)
    # Later tiles start at or after this one (the end-aligned last one too).
    drop = tile.start - self.base
    if padded is None and drop > 0:
      del self.frames[:drop]
      self.base += drop

  def _emit(self, frames: np.ndarray) -> None:
    if len(frames):
      self.ready.append(frames)
      self.emitted += len(frames)

  # -- output -----------------------------------------------------------------

  def pull(self) -> np.ndarray:
    """Denoised frames available now, in order (possibly none): (n, Y, X) float32, or
    (n, Y, X, channels) with uncertainty: [mean, std, samples...]."""
    if not self.ready:
      channels = (self.den.channels,) if self.den.channels else ()
      return np.zeros((0,) + tuple(self.frame_shape or (0, 0)) + channels, np.float32)
    out = np.concatenate(list(self.ready))
    self.ready.clear()
    return out

  def __iter__(self) -> Iterator[np.ndarray]:
    while self.ready:
      yield from self.ready.popleft()


class _Buffered(ArrayMovie):
  """The frames a stream still holds, read in stream coordinates (up to `end`)."""

  def __init__(self, stream: StreamDenoiser, end: int):
    self.stream, self.name = stream, "<stream>"
    self.shape = (end,) + tuple(stream.frame_shape)
    self.dtype = np.dtype(stream.frames[0].dtype) if stream.frames else np.dtype(np.float32)

  def read(self, t0: int, t1: int) -> np.ndarray:
    s = self.stream
    if t0 < s.base:
      raise RuntimeError(f"stream frame {t0} was already released (kept from {s.base}).")
    return np.stack(s.frames[t0 - s.base:t1 - s.base])
