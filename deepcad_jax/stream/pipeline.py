"""The live stream's three stages (acquisition, processing, output) in parallel threads
joined by bounded queues."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np

from deepcad_jax.runtime import resources
from deepcad_jax.data.writers import output_format
from deepcad_jax.errors import UserError
from deepcad_jax.denoising.outputs import resolve_output_dtype
from deepcad_jax.denoising.step import Channels
from deepcad_jax.stream.denoiser import StreamDenoiser
from deepcad_jax.stream.files import StreamFiles, raw_path
from deepcad_jax.stream.sources import FrameSource
from deepcad_jax.stream.view import write_preview

log = logging.getLogger("deepcad_jax")

POLICIES = ("block", "drop")


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
  extras: list[str] = dataclasses.field(default_factory=list)  # std, samples
  previews: list[str] = dataclasses.field(default_factory=list)
  clipped: int = 0
  error: str | None = None
  output_dtype: str = ""
  tiling: str = ""                              # the stream's tiling, described
  wait_frames: tuple[int, int] = (0, 0)         # later frames a frame waits for

  @property
  def frames_per_s(self) -> float:
    return self.frames_out / self.seconds if self.seconds else 0.0

  @property
  def voxels_per_s(self) -> float:
    return self.frames_per_s * self.frame_shape[0] * self.frame_shape[1]

  def describe(self) -> str:
    """The report's lines for the command line."""
    rate, (lo, hi) = self.rate_hz, self.wait_frames
    kept = ("n/a (replayed as fast as possible; the sustained rate is the most it keeps "
            "up with)" if not rate else ("yes" if self.kept_up else "no"))
    lines = [
        f"frames: {self.frames_in} in, {self.frames_out} denoised, {self.dropped} dropped "
        f"({self.frame_shape[0]}x{self.frame_shape[1]})",
        f"sustained: {self.frames_per_s:.1f} frames/s = {self.voxels_per_s:.3g} voxels/s "
        f"over {self.seconds:.1f} s" + (f" (source rate {rate:g} Hz)" if rate else ""),
        f"latency (arrival to denoised output): median {self.latency_median_s:.3f} s, "
        f"99th percentile {self.latency_p99_s:.3f} s; after the first "
        f"{self.startup_frames} frames (which wait for the first tile): median "
        f"{self.steady_latency_median_s:.3f} s, 99th percentile "
        f"{self.steady_latency_p99_s:.3f} s",
        f"kept up: {kept}; {self.clipped} voxels clipped to {self.output_dtype}",
        f"tiling: {self.tiling}; a frame waits for {lo} to {hi} later frames"
        + (f" ({lo / rate:.2f} to {hi / rate:.2f} s at {rate:g} Hz) plus compute"
           if rate else " plus compute"),
        f"raw: {self.raw}", f"denoised: {self.denoised}"]
    if self.extras:
      lines.append(f"std and samples: {', '.join(self.extras)}")
    if self.previews:
      lines.append(f"previews: {len(self.previews)} PNG(s), last {self.previews[-1]}")
    return "\n".join(lines)


_END = object()  # the last item of a queue


class Pipeline:
  """Acquisition, processing and output of one stream, each a thread (`acquire`,
  `process`, `output`), joined by bounded queues; see `run_pipeline` for the arguments.

  A stage that fails records its error and stops the others; `run` raises the first
  error once every file that received frames has its final name.
  """

  def __init__(self, source: FrameSource, stream: StreamDenoiser, output: str, *,
               rate: float = 0.0, policy: str = "block", queue_frames: int = 256,
               raw_output: str | None = None, output_dtype: Any = "float32",
               preview_every_s: float = 0.0, preview_dir: str | None = None,
               on_output: Callable | None = None, progress: bool = True,
               overwrite: bool = False):
    if policy not in POLICIES:
      raise UserError(f"policy must be 'block' or 'drop'; got {policy!r}.")
    for path in (output, raw_output):
      if path:
        output_format(path)  # one sentence if the name says no format it writes
    self.source, self.stream, self.path = source, stream, output
    self.policy, self.rate, self.progress = policy, rate, progress
    self.on_output, self.overwrite = on_output, overwrite
    self.preview_every_s = preview_every_s
    self.preview_dir = preview_dir or os.path.dirname(os.path.abspath(output))
    source_dtype = np.dtype(getattr(source, "dtype", np.float32))
    out_dtype = resolve_output_dtype(output_dtype, source_dtype)
    self.files = StreamFiles(output, raw_output or raw_path(output),
                             getattr(source, "frame_shape", None),
                             getattr(source, "length", None), source_dtype, out_dtype,
                             stream.extra_outputs(output))
    self.acquired: queue.Queue = queue.Queue(maxsize=queue_frames)
    self.denoised: queue.Queue = queue.Queue(maxsize=max(4, queue_frames // 8))
    self.stop = threading.Event()
    self.errors: list[BaseException] = []
    self.report = StreamReport(rate_hz=rate, output_dtype=np.dtype(out_dtype).name,
                               tiling=stream.describe(), wait_frames=stream.latency_frames())
    self.arrival: dict[int, float] = {}  # position in the denoised stream -> arrival
    self.latencies: list[float] = []
    self.arrived = 0                     # frames the source delivered
    self.acquisition_s = 0.0
    self.t_start = self.last_preview = 0.0

  def run(self, on_idle: Callable | None = None) -> StreamReport:
    """Compile, run the three stages until the stream ends, and report."""
    self.compile_ahead()
    self.files.open(self.overwrite)  # locked now; the files appear when the stream ends
    self.t_start = self.last_preview = time.perf_counter()
    self._run_stages(on_idle)
    self._measure()
    self._raise_errors()
    return self.report

  def compile_ahead(self) -> None:
    """Compile for the source's frame shape, when it is known, before frames arrive."""
    shape = getattr(self.source, "frame_shape", None)
    if shape and self.stream.received == 0:
      log.info("compiling for %s frames before the stream starts",
               "x".join(map(str, shape)))
      self.stream.prepare(shape, getattr(self.source, "dtype", np.float32))

  # -- the stages ---------------------------------------------------------------

  def acquire(self) -> None:
    """Stage 1: the source's frames to the raw file and the processing queue."""
    index = 0
    try:
      for frame in self._source_frames():
        now = time.perf_counter()
        self.arrived += 1
        if index == 0:  # a folder source knows its metadata once it read a file
          self.files.set_metadata(getattr(self.source, "metadata", None))
        self.files.write_raw(frame[None])
        if not self._enqueue((index, now, frame)):
          return
        index += 1
    except BaseException as e:  # noqa: BLE001 - reported to the caller
      self.errors.append(e)  # the frames acquired so far are still denoised and written
    finally:
      self.report.frames_in = index
      self.acquisition_s = time.perf_counter() - self.t_start
      self._put(self.acquired, _END)

  def process(self) -> None:
    """Stage 2: acquired frames through the stream; the denoised blocks, with their raw
    frames, to the output queue."""
    order = 0  # position in the denoised stream (dropped frames are skipped)
    pending_raw: collections.deque = collections.deque()  # raw frames awaiting output
    try:
      while not self.stop.is_set():
        try:
          item = self.acquired.get(timeout=0.1)
        except queue.Empty:
          continue
        if item is _END:
          self.stream.close()
        else:
          _, t, frame = item
          self.arrival[order] = t
          order += 1
          pending_raw.append(frame)
          self.stream.push(frame)
        out = self.stream.pull()
        if len(out):
          raw = np.stack([pending_raw.popleft() for _ in range(len(out))])
          if not self._put(self.denoised, (out, raw)):
            return
        if item is _END:
          break
    except BaseException as e:  # noqa: BLE001
      self.errors.append(e)
      self.stop.set()
    finally:
      self._put(self.denoised, _END)

  def output(self) -> None:
    """Stage 3: denoised blocks to the file, `on_output`, the previews and the log."""
    try:
      while True:
        try:
          item = self.denoised.get(timeout=0.1)
        except queue.Empty:
          if self.stop.is_set():
            return
          continue
        if item is _END:
          return
        self._deliver(*item)
    except BaseException as e:  # noqa: BLE001
      self.errors.append(e)
      self.stop.set()

  # -- helpers of the stages ----------------------------------------------------

  def _put(self, q: queue.Queue, item: Any) -> bool:
    """Put `item` on `q`, waiting while it is full; False if the pipeline stopped."""
    while not self.stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _source_frames(self) -> Iterator[np.ndarray]:
    """The source's frames; a source that fails ends them, its error kept (as a
    `UserError` naming the source)."""
    frames = self.source.frames(self.stop)
    count = 0
    while True:
      try:
        frame = next(frames)
      except StopIteration:
        return
      except Exception as e:  # noqa: BLE001 - the source failed: the stream ends here
        if not isinstance(e, UserError):
          e = UserError(f"{getattr(self.source, 'name', 'the source')} could not be read "
                        f"after {count} frame(s) ({type(e).__name__}: {e}); the stream "
                        "ended there: check the source (a truncated or damaged file?).")
        self.errors.append(e)
        return
      count += 1
      yield frame

  def _enqueue(self, item: tuple) -> bool:
    """An acquired frame to the processing queue, by the policy: 'block' waits (False
    if the pipeline stopped meanwhile), 'drop' counts it dropped if the queue is full."""
    if self.policy == "block":
      return self._put(self.acquired, item)
    try:
      self.acquired.put_nowait(item)
    except queue.Full:
      self.report.dropped += 1
    return True

  def _deliver(self, out: np.ndarray, raw: np.ndarray) -> None:
    """One denoised block (and its raw frames) written, shown, timed and logged."""
    self.files.write_denoised(out)
    if out.ndim == 4:  # with uncertainty: the mean is shown
      out = Channels.mean(out)
    if self.on_output is not None:
      self.on_output(raw, out)
    now = time.perf_counter()
    done = self.report.frames_out
    for i in range(done, done + len(out)):
      self.latencies.append(now - self.arrival.pop(i, now))
    self.report.frames_out = done = done + len(out)
    if self.preview_every_s and now - self.last_preview >= self.preview_every_s:
      self.last_preview = now
      path = os.path.join(self.preview_dir, f"preview_{done:07d}.png")
      write_preview(path, raw[-1], out[-1])
      self.report.previews.append(path)
    if self.progress and done // 100 != (done - len(out)) // 100:
      log.info("stream: %d frames denoised, %.1f frames/s, latency %.3f s", done,
               done / max(1e-9, now - self.t_start), self.latencies[-1])

  # -- running and reporting ----------------------------------------------------

  def _run_stages(self, on_idle: Callable | None) -> None:
    """The stages in threads until all end (`on_idle` called here about every 0.1 s);
    then every file that received frames gets its final name."""
    threads = [threading.Thread(target=stage, name=name, daemon=True) for stage, name in
               ((self.acquire, "acquisition"), (self.process, "processing"),
                (self.output, "output"))]
    for t in threads:
      t.start()
    try:
      for t in threads:
        while t.is_alive():
          t.join(0.1)
          if on_idle is not None:
            on_idle()
    except BaseException as e:  # Ctrl-C, or SIGTERM (errors.Terminated) from the CLI
      self.stop.set()
      for t in threads:
        t.join(5)
      self.errors.append(e)
    finally:
      kept, errors = self.files.commit()
      files, r = self.files, self.report
      r.raw = files.raw_output if files.raw_output in kept else ""
      r.denoised = files.output if files.output in kept else ""
      r.extras = [p for p in files.extra_paths if p in kept]
      self.errors.extend(errors)  # the first error is raised after the report

  def _measure(self) -> None:
    """The report's figures: clipping, time, latencies and whether it kept up."""
    r, stream = self.report, self.stream
    r.clipped = self.files.denoised.clipped
    note = self.files.denoised.note()
    if note:
      log.warning("%s", note)
    r.seconds = time.perf_counter() - self.t_start
    r.frame_shape = tuple(stream.frame_shape or (0, 0))
    if self.latencies:
      r.latency_median_s = float(np.median(self.latencies))
      r.latency_p99_s = float(np.percentile(self.latencies, 99))
      r.startup_frames = stream.startup_frames
      steady = self.latencies[stream.startup_frames:]
      if steady:
        r.steady_latency_median_s = float(np.median(steady))
        r.steady_latency_p99_s = float(np.percentile(steady, 99))
    # The source's own pace: back-pressure that slowed acquisition shows here (the time
    # after the last frame arrived, the last tile and the writing, does not count).
    achieved = max(0, r.frames_in - 1) / self.acquisition_s if self.acquisition_s else 0.0
    r.kept_up = (r.dropped == 0 and (self.rate <= 0 or achieved >= 0.98 * self.rate)
                 and r.frames_out == r.frames_in)

  def _raise_errors(self) -> None:
    """Raise the first error, if any, after saying what was kept."""
    if not self.errors:
      return
    r, first = self.report, self.errors[0]
    if isinstance(first, KeyboardInterrupt):  # name only the files really written
      if r.denoised:
        kept = f"{r.frames_out} denoised frames were written to {r.denoised}" + (
            f" (the raw frames to {r.raw})" if r.raw else "") + " and stay readable"
      elif r.raw:
        kept = (f"no frame was denoised yet, so no denoised file was written; the "
                f"{r.frames_in} raw frames are in {r.raw}")
      else:
        kept = "no file was written"
      log.warning("stream stopped; %s.", kept)
      raise first
    r.error = f"{type(first).__name__}: {first}"
    kept = " and ".join(p for p in (r.denoised, r.raw) if p)
    log.error("the stream stopped (%s); %s.", r.error,
              f"{r.frames_out} denoised frame(s) were kept in {kept}" if kept else
              "no frame came, so no file was written" if not self.arrived else
              "no file was kept")
    raise first


@resources.device_memory("the stream", "lower --batch-size or --core-frames")
def run_pipeline(source: FrameSource, stream: StreamDenoiser, output: str, *,
                 rate: float = 0.0, policy: str = "block", queue_frames: int = 256,
                 raw_output: str | None = None, output_dtype: Any = "float32",
                 preview_every_s: float = 0.0, preview_dir: str | None = None,
                 on_output: Callable | None = None, on_idle: Callable | None = None,
                 progress: bool = True, overwrite: bool = False) -> StreamReport:
  """Acquisition, processing and output in three threads joined by bounded queues.

  The raw and denoised frames are written as they come, with the source's metadata,
  under temporary names that become the final ones when the stream ends. A stage that
  fails stops the others (a failing source ends the stream: the frames acquired until
  then are still denoised); the frames written until then still get their final names
  (a stream that got no frame leaves no file), and the error is raised after that (a
  failing source as a `UserError` naming it).

  Args:
    source: the `FrameSource`.
    stream: the `StreamDenoiser`.
    output: the denoised movie (.tif, .tiff); with the stream's uncertainty the mean,
      its std and samples beside it (as offline).
    rate: the source's frame rate, to judge whether the stream kept up (0: unpaced).
    policy: when processing falls behind, 'block' acquisition or 'drop' frames
      (counted; the raw movie keeps them).
    queue_frames: frames the acquisition queue holds.
    raw_output: the raw movie (default: beside `output`, `*_raw.tif`).
    output_dtype: the denoised movie's dtype (float32; 'input': the source's).
    preview_every_s: seconds between PNGs of the latest raw and denoised frames side by
      side (0: none), written to `preview_dir` (default: beside `output`).
    on_output: called as `on_output(raw, denoised)` for every block, from the output
      stage (e.g. a live view's `update`).
    on_idle: called from this (the main) thread about every 0.1 s, where GUI toolkits
      must draw.
    progress: log the progress every 100 frames.
    overwrite: replace existing outputs (refused otherwise).
  """
  return Pipeline(source, stream, output, rate=rate, policy=policy,
                  queue_frames=queue_frames, raw_output=raw_output,
                  output_dtype=output_dtype, preview_every_s=preview_every_s,
                  preview_dir=preview_dir, on_output=on_output, progress=progress,
                  overwrite=overwrite).run(on_idle)
