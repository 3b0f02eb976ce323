"""Frame sources of a live stream: a TIFF replayed at a rate, or a folder an acquisition
program writes into."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Iterator

import numpy as np
import tifffile

from deepcad_jax.data.metadata import MovieMetadata, read_metadata
from deepcad_jax.data.movie import TIFF_SUFFIXES, open_movie, read_frames
from deepcad_jax.data.spec import is_store
from deepcad_jax.errors import UserError, check_number

log = logging.getLogger("deepcad_jax")


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
    first: tuple[str, tuple[int, ...]] | None = None  # the first file and its frames
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
        if first is None:
          first = (name, tuple(data.shape[1:]))
        elif tuple(data.shape[1:]) != first[1]:
          raise UserError(
              f"{path} holds frames of {'x'.join(map(str, data.shape[1:]))} but the "
              f"stream's frames are {'x'.join(map(str, first[1]))} (from {first[0]}); "
              "the stream stopped before it: the frames acquired so far are kept, start "
              "another stream for the new frame size.")
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


def open_source(path: str, rate: float = 30.0, idle_timeout: float = 10.0) -> FrameSource:
  """The source a path names: a folder an acquisition writes into (watched), or a movie
  (replayed at `rate` frames/s; 0: as fast as possible)."""
  check_number("--rate", rate, at_least=0, fix="0 replays as fast as possible")
  check_number("--idle-timeout", idle_timeout, above=0)
  if os.path.isdir(path) and not is_store(path):
    return FolderSource(path, idle_timeout)
  return ReplaySource(path, rate)
