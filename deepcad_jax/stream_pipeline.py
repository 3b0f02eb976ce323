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
from typing import Any

import numpy as np

from deepcad_jax import resources
from deepcad_jax.data.movie import TIFF_SUFFIXES
from deepcad_jax.data.output import BIGTIFF_BYTES, MovieWriter, check_space, movie_bytes
from deepcad_jax.errors import UserError
from deepcad_jax.infer import resolve_output_dtype
from deepcad_jax.stream_denoiser import StreamDenoiser
from deepcad_jax.stream_files import _DenoisedWriter, raw_path
from deepcad_jax.stream_sources import FrameSource
from deepcad_jax.stream_view import write_png

log = logging.getLogger("deepcad_jax")


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
    if path and not path.lower().endswith(TIFF_SUFFIXES):
      raise UserError(f"{path} must end in .tif or .tiff.")
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
