"""Live denoising of a frame stream, as DeepCAD-RT's real-time mode, on any JAX device.

`StreamDenoiser` takes frames as they arrive (`push`) and hands back denoised frames in
order (`pull`). It cuts time with the same `tiling.AxisTiling` and (y, x) with the same
`tiling.TilePlan` as offline denoising, and runs each temporal tile through the same
`infer.Engine` and compiled predict step. Every pushed frame comes out exactly once.

- exact (default): tiles of `halo + core_frames + lookahead` frames every `core_frames`
  frames, each keeping its `core_frames` (the first keeps its halo too), and at the end
  one tile aligned to the end of the stream padded to a multiple of 8. With
  `lookahead` = the halo (48 frames, the default) every frame equals one forward pass
  over the whole recording, so the stream equals offline `denoise` exactly; a frame
  leaves `core_frames + lookahead` frames after it arrived at the latest, plus compute.
  A shorter `lookahead` (a multiple of 8) lowers that latency and gives up exactness
  near the end of each core (measured in the README).
- overlap: DeepCAD-RT's batches of `batch_frames` every `batch_frames - overlap_frames`
  frames, the centre kept, tiled in (y, x) with the model's patch and overlap; equal to
  offline `denoise` with the overlap scheme.

`run_pipeline` runs the paper's three stages in parallel threads joined by bounded
queues: acquisition (a `FrameSource`), processing (the device), and output (writing raw
and denoised TIFFs, previews). When the processing stage cannot keep up, the acquisition
queue fills and the `policy` decides, visibly: 'block' (back-pressure: acquisition
waits, frames are late but none is lost) or 'drop' (frames that find the queue full are
dropped, counted and reported; the raw movie keeps them, the denoised one does not).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import struct
import threading
import time
import zlib
from typing import Any, Iterator

import numpy as np
import tifffile

from deepcad_jax import resources
from deepcad_jax.data.metadata import MovieMetadata, read_metadata
from deepcad_jax.data.movie import ArrayMovie, TIFF_SUFFIXES, open_movie, read_frames
from deepcad_jax.data.output import (BIGTIFF_BYTES, MovieWriter, check_space, movie_bytes,
                                     output_format, write_bytes)
from deepcad_jax.data.spec import with_name_suffix
from deepcad_jax.errors import UserError
from deepcad_jax.infer import (DenoiseStats, Denoiser, TemporalSpread, Window,
                               quantisation_note, resolve_output_dtype, to_dtype)
from deepcad_jax.tiling import (GRID, HALO, AxisTiling, TilePlan, ceil_to,
                                choose_exact_tile, exact_plan, gap, overlap_axis,
                                overlap_plan)

log = logging.getLogger("deepcad_jax")

STREAM_TILINGS = ("exact", "overlap")
CORE_FRAMES = 32   # exact streams: frames completed per device call, by default


class StreamDenoiser:
  """Denoise frames pushed one at a time or in blocks; pull them back in order.

  Args:
    model: a `Model`, model directory, .pth, or a `Denoiser` (whose network, devices,
      batch size, dtype and memory budget are used).
    batch_frames, overlap_frames: the overlap scheme's temporal batches (giving either
      selects it unless `tiling` says otherwise); default the model's patch T and
      overlap.
    tiling: 'exact' (default) or 'overlap'.
    core_frames: exact streams: frames completed per call (a multiple of 8).
    lookahead: exact streams: future frames of context (a multiple of 8, at most the
      halo, 48); below the halo the output is no longer exact.
    patch_yx, overlap, batch_size, dtype, devices: the Denoiser's, when a model is given.
    mean: 'model' (the training mean stored with the model; the default), 'running'
      (the mean of the frames seen so far, frozen per call), or a number.
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
        model, None, overlap, batch_size, dtype, devices=devices)
    self.den = den
    if tiling is None:  # as the Denoiser would tile a movie, or as the flags ask
      tiling = "overlap" if (batch_frames is not None or overlap_frames is not None or
                             den.tiling == "overlap" or den.explicit_overlap) else "exact"
    if tiling not in STREAM_TILINGS:
      raise UserError(f"stream tiling must be one of {', '.join(STREAM_TILINGS)}; got "
                      f"{tiling!r}.")
    self.tiling = tiling
    pt, py, px = den.patch
    self.patch_yx = tuple(patch_yx or (py, px))
    if tiling == "overlap":
      b = int(batch_frames or pt)
      o = int(overlap_frames if overlap_frames is not None else b - gap(b, den.overlap))
      if b < 2 or not 0 <= o < b:
        raise UserError(f"need batch_frames >= 2 and 0 <= overlap_frames < batch_frames; "
                        f"got {b} and {o}.")
      self.time = AxisTiling(b, b - o, o // 2)
      self.lookahead = b - (b - o) - o // 2
    else:
      core = int(core_frames or CORE_FRAMES)
      ahead = HALO if lookahead is None else int(lookahead)
      if core < GRID or core % GRID:
        raise UserError(f"core_frames must be a positive multiple of {GRID}; got {core}.")
      if not 0 <= ahead <= HALO or ahead % GRID:
        raise UserError(f"lookahead must be a multiple of {GRID} from 0 to {HALO} (the "
                        f"halo that makes the stream exact); got {ahead}.")
      self.time = AxisTiling(HALO + core + ahead, core, HALO)
      self.lookahead = ahead
    if isinstance(mean, str) and mean not in ("model", "running"):
      raise UserError(f"mean must be 'model', 'running' or a number; got {mean!r}.")
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
        den = self.den
        tile = den.tile or choose_exact_tile(shape, den._voxel_budget(), HALO,
                                             GRID * den.spatial, den._window_cost(shape))
        plan = exact_plan(shape, (tile_t,) + tuple(tile[1:]), HALO, GRID * den.spatial)
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
    out = frames.data if frames.extras is None else np.concatenate(
        [frames.data[..., None], frames.extras], axis=-1)
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
    """Denoised frames available now, in order (possibly none): (n, Y, X) float32."""
    if not self.ready:
      shape = self.frame_shape or (0, 0)
      return np.zeros((0,) + tuple(shape), np.float32)
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


# ------------------------------------------------------------------ sources


class FrameSource:
  """Frames as a microscope delivers them: yields (frame, arrival time)."""

  def frames(self, stop: threading.Event) -> Iterator[np.ndarray]:
    raise NotImplementedError


class ReplaySource(FrameSource):
  """Replays a TIFF movie at `rate` frames/s (0: as fast as possible)."""

  def __init__(self, path: str, rate: float = 30.0):
    self.movie = open_movie(path)
    self.rate = float(rate)
    self.name = path
    self.dtype = self.movie.dtype
    self.frame_shape = self.movie.shape[1:]
    self.length = self.movie.shape[0]
    self.metadata = self.movie.metadata

  def frames(self, stop):
    t0 = time.perf_counter()
    chunk = 64
    for c0 in range(0, self.movie.shape[0], chunk):
      block = self.movie.read(c0, min(self.movie.shape[0], c0 + chunk))
      for i, frame in enumerate(block):
        if stop.is_set():
          return
        if self.rate > 0:
          due = t0 + (c0 + i) / self.rate
          delay = due - time.perf_counter()
          if delay > 0:
            time.sleep(delay)
        yield frame


class FolderSource(FrameSource):
  """Watches a folder where an acquisition program drops TIFF files (one or more frames
  each), taking them in name order once complete (size stable between two looks). The
  stream ends when a file named STOP appears, or after `idle_timeout` s with nothing new."""

  def __init__(self, folder: str, idle_timeout: float = 10.0, poll: float = 0.05):
    if not os.path.isdir(folder):
      raise UserError(f"{folder} is not a folder to watch.")
    self.folder, self.idle_timeout, self.poll = folder, idle_timeout, poll
    self.name = folder
    self.metadata: MovieMetadata | None = None  # the first file's, once read

  def frames(self, stop):
    seen: set[str] = set()
    sizes: dict[str, int] = {}
    last_new = time.perf_counter()
    while not stop.is_set():
      names = sorted(os.listdir(self.folder))
      fresh = [n for n in names if n.lower().endswith(TIFF_SUFFIXES) and n not in seen]
      progressed = False
      for name in fresh:
        path = os.path.join(self.folder, name)
        size = os.path.getsize(path)
        if sizes.get(name) != size:  # still being written, or first look
          sizes[name] = size
          break
        seen.add(name)
        progressed = True
        data = read_frames(path)  # checked: a damaged file is one sentence
        if self.metadata is None:
          with tifffile.TiffFile(path) as tif:
            self.metadata = read_metadata(tif)
        for frame in data:
          yield frame
      if progressed:
        last_new = time.perf_counter()
        continue
      if "STOP" in names and not fresh:
        return
      if time.perf_counter() - last_new > self.idle_timeout:
        log.info("no new file in %s for %.0f s; ending the stream.", self.folder,
                 self.idle_timeout)
        return
      time.sleep(self.poll)


# ------------------------------------------------------------------ pipeline


class _DenoisedWriter:
  """The denoised stream's file: frames converted to the output dtype here (rounded and
  clipped, the rounding error measured) and appended as they come."""

  def __init__(self, writer: MovieWriter):
    self.writer, self.dtype = writer, writer.dtype
    self.clipped = 0
    self.stats = DenoiseStats()

  def write(self, frames: np.ndarray) -> None:
    frames = np.asarray(frames, np.float32)
    if self.dtype.kind in "iu":
      info = np.iinfo(self.dtype)
      inside = (frames >= info.min - 0.5) & (frames <= info.max + 0.5)
      error = np.where(inside, np.rint(frames) - frames, 0.0)
      self.stats.rounding_sq += float(np.sum(error * error, dtype=np.float64))
      self.stats.rounded += int(np.count_nonzero(inside))
      if self.stats.spread is None:
        self.stats.spread = TemporalSpread(frames.shape[1:])
      self.stats.spread.add(frames)
    frames, clipped = to_dtype(frames, self.dtype)  # rounded and clipped
    self.clipped += clipped
    self.writer.write(frames)

  def note(self) -> str | None:
    """The quantisation note of an integer output (see infer)."""
    return quantisation_note(self.writer.path, self.dtype, self.stats)


@dataclasses.dataclass
class StreamReport:
  frames_in: int = 0
  frames_out: int = 0
  dropped: int = 0
  seconds: float = 0.0
  rate_hz: float = 0.0
  frame_shape: tuple[int, int] = (0, 0)
  latency_median_s: float = float("nan")
  latency_p99_s: float = float("nan")
  startup_frames: int = 0                       # frames completed by the first tile
  steady_latency_median_s: float = float("nan")  # over the frames after those
  steady_latency_p99_s: float = float("nan")
  kept_up: bool = False
  raw: str = ""                  # the files written ("" where the stream got no frame)
  denoised: str = ""
  previews: list[str] = dataclasses.field(default_factory=list)
  clipped: int = 0
  error: str | None = None

  @property
  def frames_per_s(self) -> float:
    return self.frames_out / self.seconds if self.seconds else 0.0

  @property
  def voxels_per_s(self) -> float:
    return self.frames_per_s * self.frame_shape[0] * self.frame_shape[1]


_END = object()


def raw_path(output: str) -> str:
  """Where the raw frames of a stream written to `output` go: beside it, `*_raw`, in
  the output's format (`*_raw.tif` for a TIFF)."""
  return with_name_suffix(output, "_raw")


def write_png(path: str, image: np.ndarray) -> None:
  """A grayscale 8-bit PNG (no dependencies): the image scaled to its 0.5-99.5% range;
  written atomically."""
  lo, hi = np.percentile(image, [0.5, 99.5]) if image.size else (0, 1)
  img = np.clip((image - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
  raw = b"".join(b"\x00" + row.tobytes() for row in img)

  def chunk(tag, data):
    return (struct.pack(">I", len(data)) + tag + data +
            struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

  write_bytes(path, b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
      ">IIBBBBB", img.shape[1], img.shape[0], 8, 0, 0, 0, 0)) +
      chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


@resources.device_memory("the stream", "lower --batch-size or --core-frames")
def run_pipeline(source: FrameSource, stream: StreamDenoiser, output: str, *,
                 rate: float = 0.0, policy: str = "block", queue_frames: int = 256,
                 raw_output: str | None = None, output_dtype: Any = "float32",
                 preview_every_s: float = 0.0, preview_dir: str | None = None,
                 on_output=None, on_idle=None, progress: bool = True,
                 overwrite: bool = False) -> StreamReport:
  """Acquisition, processing and output in three threads joined by bounded queues.

  Writes the raw frames to `raw_output` (default: beside `output`, `*_raw.tif`) and the
  denoised frames to `output` (float32, or `output_dtype`: 'input' for the source's
  type) as they come, with the source's metadata, under temporary names that become
  the final ones when the stream ends; every `preview_every_s` seconds a PNG of the
  latest raw and denoised frames side by side; `on_output(raw, denoised)` (e.g. a live
  view) is called from the output stage for every block, and `on_idle()` from this
  (the main) thread about every 0.1 s, where GUI toolkits must draw. A stage that fails
  stops the others (a failing source ends the stream: the frames acquired until then
  are still denoised); the frames written until then are still given their final names
  (a stream that got no frame leaves no file), and the error is raised after that (a
  failing source as a `UserError` naming it). Existing outputs are refused unless
  `overwrite`.
  """
  if policy not in ("block", "drop"):
    raise UserError(f"policy must be 'block' or 'drop'; got {policy!r}.")
  for path in (output, raw_output):
    if path:
      output_format(path)  # one sentence if the name says no format it writes
  raw_output = raw_output or raw_path(output)
  source_dtype = np.dtype(getattr(source, "dtype", np.float32))
  out_dtype = resolve_output_dtype(output_dtype, source_dtype)
  length = getattr(source, "length", None)
  frame_shape = getattr(source, "frame_shape", None)
  big = None
  if length is not None and frame_shape is not None:
    shape = (length,) + tuple(frame_shape)
    check_space([(raw_output, movie_bytes(shape, source_dtype)),
                 (output, movie_bytes(shape, out_dtype))])
    big = max(movie_bytes(shape, source_dtype), movie_bytes(shape, out_dtype)) > \
        BIGTIFF_BYTES
  acquired: queue.Queue = queue.Queue(maxsize=queue_frames)
  denoised: queue.Queue = queue.Queue(maxsize=max(4, queue_frames // 8))
  stop = threading.Event()
  errors: list[BaseException] = []
  report = StreamReport(rate_hz=rate)
  arrival: dict[int, float] = {}
  if getattr(source, "frame_shape", None) and stream.received == 0:
    log.info("compiling for %s frames before the stream starts",
             "x".join(map(str, source.frame_shape)))
    stream.prepare(source.frame_shape, getattr(source, "dtype", np.float32))
  big = True if big is None else big  # a stream of unknown length: BigTIFF
  raw_file = MovieWriter(raw_output, frame_shape, source_dtype, overwrite=overwrite,
                         bigtiff=big)  # locked now; the files appear when the stream ends
  try:
    den_file = MovieWriter(output, frame_shape, out_dtype, overwrite=overwrite, bigtiff=big)
  except BaseException:
    raw_file.abort()
    raise
  den_writer = _DenoisedWriter(den_file)
  latencies: list[float] = []
  acquisition_s = [0.0]
  arrived = [0]  # frames the source delivered
  t_start = time.perf_counter()

  def put(q, item):
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def acquisition():
    index = 0
    frames = source.frames(stop)
    try:
      while True:
        try:
          frame = next(frames)
        except StopIteration:
          break
        except Exception as e:  # noqa: BLE001 - the source failed: the stream ends here
          if not isinstance(e, UserError):
            e = UserError(f"{getattr(source, 'name', 'the source')} could not be read "
                          f"after {index} frame(s) ({type(e).__name__}: {e}); the stream "
                          "ended there: check the source (a truncated or damaged file?).")
          errors.append(e)
          break
        now = time.perf_counter()
        arrived[0] += 1
        if index == 0:  # a folder source knows its metadata once it read a file
          raw_file.metadata = den_file.metadata = getattr(source, "metadata", None)
        raw_file.write(frame[None])
        if policy == "drop":
          try:
            acquired.put_nowait((index, now, frame))
          except queue.Full:
            report.dropped += 1
            index += 1
            continue
        elif not put(acquired, (index, now, frame)):
          return
        index += 1
    except BaseException as e:  # noqa: BLE001 - reported to the caller
      errors.append(e)  # the frames acquired so far are still denoised and written
    finally:
      report.frames_in = index
      acquisition_s[0] = time.perf_counter() - t_start
      put(acquired, _END)

  def processing():
    order = 0  # position in the denoised stream (dropped frames are skipped)
    pending_raw: collections.deque = collections.deque()  # raw frames awaiting output
    try:
      while not stop.is_set():
        try:
          item = acquired.get(timeout=0.1)
        except queue.Empty:
          continue
        if item is _END:
          stream.close()
        else:
          _, t, frame = item
          arrival[order] = t
          order += 1
          pending_raw.append(frame)
          stream.push(frame)
        out = stream.pull()
        if len(out):
          raw = np.stack([pending_raw.popleft() for _ in range(len(out))])
          if not put(denoised, (out, raw)):
            return
        if item is _END:
          break
    except BaseException as e:  # noqa: BLE001
      errors.append(e)
      stop.set()
    finally:
      put(denoised, _END)

  def output_stage():
    done = 0
    last_preview = time.perf_counter()
    try:
      while True:
        try:
          item = denoised.get(timeout=0.1)
        except queue.Empty:
          if stop.is_set():
            return
          continue
        if item is _END:
          return
        out, raw = item
        den_writer.write(out)
        if on_output is not None:
          on_output(raw, out)
        now = time.perf_counter()
        for _ in range(len(out)):
          latencies.append(now - arrival.pop(done, now))
          done += 1
        report.frames_out = done
        if preview_every_s and now - last_preview >= preview_every_s:
          last_preview = now
          folder = preview_dir or os.path.dirname(os.path.abspath(output))
          path = os.path.join(folder, f"preview_{done:07d}.png")
          write_png(path, np.concatenate([raw[-1], out[-1]], axis=1))  # raw | denoised
          report.previews.append(path)
        if progress and done // 100 != (done - len(out)) // 100:
          log.info("stream: %d frames denoised, %.1f frames/s, latency %.3f s", done,
                   done / max(1e-9, now - t_start), latencies[-1])
    except BaseException as e:  # noqa: BLE001
      errors.append(e)
      stop.set()

  threads = [threading.Thread(target=f, name=n, daemon=True) for f, n in
             ((acquisition, "acquisition"), (processing, "processing"),
              (output_stage, "output"))]
  for t in threads:
    t.start()
  try:
    for t in threads:
      while t.is_alive():
        t.join(0.1)
        if on_idle is not None:
          on_idle()
  except BaseException as e:  # Ctrl-C, or SIGTERM (errors.Terminated) from the CLI
    stop.set()
    for t in threads:
      t.join(5)
    errors.append(e)
  finally:
    for name, w in (("raw", raw_file), ("denoised", den_file)):
      try:  # what came is kept under the final name; nothing if no frame came
        if w.commit():
          setattr(report, name, w.path)
      except BaseException as e:  # noqa: BLE001 - the first error is raised below
        errors.append(e)
  report.clipped = den_writer.clipped
  note = den_writer.note()
  if note:
    log.warning("%s", note)
  report.seconds = time.perf_counter() - t_start
  report.frame_shape = tuple(stream.frame_shape or (0, 0))
  if latencies:
    report.latency_median_s = float(np.median(latencies))
    report.latency_p99_s = float(np.percentile(latencies, 99))
    report.startup_frames = stream.startup_frames
    steady = latencies[stream.startup_frames:]
    if steady:
      report.steady_latency_median_s = float(np.median(steady))
      report.steady_latency_p99_s = float(np.percentile(steady, 99))
  # The source's own pace: back-pressure that slowed acquisition shows here (the time
  # after the last frame arrived, the last tile and the writing, does not count).
  achieved = max(0, report.frames_in - 1) / acquisition_s[0] if acquisition_s[0] else 0.0
  report.kept_up = (report.dropped == 0 and (rate <= 0 or achieved >= 0.98 * rate)
                    and report.frames_out == report.frames_in)
  if errors and isinstance(errors[0], KeyboardInterrupt):
    log.warning("stream stopped; %d denoised frames were written to %s and stay readable.",
                report.frames_out, output)
    raise errors[0]
  if errors:
    report.error = f"{type(errors[0]).__name__}: {errors[0]}"
    kept = " and ".join(p for p in (report.denoised, report.raw) if p)
    log.error("the stream stopped (%s); %s.", report.error,
              f"{report.frames_out} denoised frame(s) were kept in {kept}" if kept else
              "no frame came, so no file was written" if not arrived[0] else
              "no file was kept")
    raise errors[0]
  return report


def display_available() -> bool:
  """Whether a window can be shown (a display on Linux; always on macOS and Windows)."""
  import sys
  return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or \
      sys.platform in ("darwin", "win32")


class LiveView:
  """The latest raw and denoised frames side by side in a matplotlib window.

  `update` (any thread) keeps the latest pair; `draw` (the main thread, via
  `run_pipeline(on_idle=...)`) shows it.
  """

  def __init__(self):
    try:
      import matplotlib.pyplot as plt
    except ImportError:
      raise UserError("the live view needs matplotlib (pip install matplotlib); without "
                      "it, use the preview images (--preview-every).") from None
    self.plt = plt
    self.latest = None
    self.images = None
    self.fig, self.axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, title in zip(self.axes, ("raw", "denoised")):
      ax.set_title(title)
      ax.axis("off")
    plt.ion()
    plt.show()

  def update(self, raw: np.ndarray, denoised: np.ndarray) -> None:
    self.latest = (raw[-1], denoised[-1])

  def draw(self) -> None:
    if self.latest is None:
      return
    frames, self.latest = self.latest, None
    if self.images is None:
      lo, hi = np.percentile(frames[0], [0.5, 99.5])
      self.images = [ax.imshow(f, cmap="gray", vmin=lo, vmax=hi)
                     for ax, f in zip(self.axes, frames)]
    else:
      for im, f in zip(self.images, frames):
        im.set_data(f)
    self.plt.pause(0.001)
