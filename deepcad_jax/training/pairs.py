"""Training pairs and the grain pipeline that batches them.

A pair is a window of 2*pt consecutive frames at (t0, y0, x0) of size (2*pt, py, px);
the input is frames t0, t0+2, ... and the target t0+1, t0+3, ... . Pair `i` of
an epoch comes from file `i % n_files` at a position drawn from `(seed, i)`, so every
record is reproducible by index and the set is spread evenly over the files, as the
reference spreads its patches. Grain shuffles the pairs (a new order each epoch), batches
them and reads them in worker processes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Sequence

import grain
from absl import flags
import numpy as np

from deepcad_jax.data.movie import Movie
from deepcad_jax.errors import UserError
from deepcad_jax.core.network import MIN_SIZE
from deepcad_jax.core.normalise import Normalisation, movie_scale


def _floor_to(n: int, m: int) -> int:
  return n // m * m


def fit_patch(patch: Sequence[int], shapes: Sequence[tuple[int, int, int]],
              names: Sequence[str]) -> tuple[tuple[int, int, int], list[str]]:
  """The largest patch <= `patch` (multiples of 8) that fits every movie.

  Returns the patch and, when it is smaller than asked, one note saying which files
  force it, what it costs (the share of the configured voxels a pair keeps) and, when
  other files would allow the configured patch, that leaving those out keeps it.
  """
  configured = tuple(int(p) for p in patch)
  allowed = []  # the patch each file alone allows
  for shape, name in zip(shapes, names):
    t, y, x = shape
    if t < 2 * MIN_SIZE:
      raise UserError(f"{name} {shape} has {t} frames; training needs at least "
                      f"{2 * MIN_SIZE} (two interleaved sub-movies of {MIN_SIZE}). "
                      "Record longer or leave this file out.")
    if y < MIN_SIZE or x < MIN_SIZE:
      raise UserError(f"{name} {shape} has frames of {y}x{x} pixels; training needs at "
                      f"least {MIN_SIZE}x{MIN_SIZE}.")
    allowed.append(tuple(min(p, lim) for p, lim in zip(
        configured, (_floor_to(t // 2, 8), _floor_to(y, 8), _floor_to(x, 8)))))
  final = tuple(min(a[i] for a in allowed) for i in range(3)) if allowed else configured
  short = [(n, tuple(s), a) for n, s, a in zip(names, shapes, allowed) if a != configured]
  if not short:
    return final, []
  share = np.prod(final) / np.prod(configured)
  which = ", ".join(f"{n} {s} allows only {a}" for n, s, a in short[:3]) + (
      f" and {len(short) - 3} more" if len(short) > 3 else "")
  if len(short) == len(allowed):
    return final, [f"patch reduced from {configured} to {final} to fit the data "
                   f"({which}); each training pair holds {share:.0%} of the configured "
                   f"voxels: record larger movies, or pass --patch "
                   f"{','.join(map(str, final))} to make it explicit"]
  them = "it" if len(short) == 1 else f"these {len(short)} files"
  return final, [f"patch reduced from {configured} to {final} for all {len(allowed)} "
                 f"files because {which}; each training pair then holds {share:.0%} of "
                 f"the configured voxels; leave {them} out of --data to keep {configured}"]


@dataclasses.dataclass
class PairSource(grain.sources.RandomAccessDataSource):
  """Random-access training pairs over several movies (picklable; files opened lazily)."""

  movies: Sequence[Movie]
  patch: tuple[int, int, int]
  length: int
  seed: int = 0
  scale: float = 1.0  # with normalise 'fixed': intensities minus the mean divided by this
  normalise: str = "fixed"  # 'spread': each movie's own robust spread (normalise.py)
  prior: bool = False  # add each file's temporal mean image (normalised) as 'prior'
  holdout: Sequence[tuple[int, int] | None] | None = None  # per movie: frames [a, b)
                                                           # no pair may touch

  def __post_init__(self):
    self.means = [float(m.mean()) for m in self.movies]
    self.scales = [movie_scale(m, self.normalise, self.scale) for m in self.movies]
    self.priors = [m.mean_image() for m in self.movies] if self.prior else None
    pt, py, px = self.patch
    self.holdout = list(self.holdout or [None] * len(self.movies))
    self.starts = []  # per movie: the ranges [lo, hi) a window may start in
    for m, held in zip(self.movies, self.holdout):
      t, y, x = m.shape
      ranges = [(0, t - 2 * pt + 1)] if held is None else \
          [(0, held[0] - 2 * pt + 1), (held[1], t - 2 * pt + 1)]
      ranges = [(lo, hi) for lo, hi in ranges if hi > lo]
      if not ranges or py > y or px > x:
        raise UserError(f"patch {self.patch} (a window of {2 * pt} frames) does not fit "
                        f"{m.name} {m.shape}" + (f" outside its held-out frames {held[0]}:"
                                                 f"{held[1]}" if held else "") +
                        "; use a smaller --patch.")
      self.starts.append(ranges)

  def __len__(self) -> int:
    return self.length

  def position(self, index: int) -> tuple[int, int, int, int]:
    """(file, t0, y0, x0) of pair `index` (never touching held-out frames)."""
    f = index % len(self.movies)
    t, y, x = self.movies[f].shape
    pt, py, px = self.patch
    rng = np.random.default_rng([self.seed, index])
    ranges = self.starts[f]
    t0, y0, x0 = (int(rng.integers(0, n - p + 1)) for n, p in
                  ((sum(hi - lo for lo, hi in ranges) + 2 * pt - 1, 2 * pt), (y, py),
                   (x, px)))
    for lo, hi in ranges:  # the t0-th allowed start
      if t0 < hi - lo:
        t0 += lo
        break
      t0 -= hi - lo
    return f, t0, y0, x0

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    f, t0, y0, x0 = self.position(int(index))
    pt, py, px = self.patch
    window = self.movies[f].read(t0, t0 + 2 * pt)[:, y0:y0 + py, x0:x0 + px]
    norm = Normalisation(np.float32(self.means[f]), np.float32(self.scales[f]))
    window = norm.to_network(window)
    pair = {"input": window[0::2], "target": window[1::2]}
    if self.priors is not None:
      pair["prior"] = norm.to_network(self.priors[f][y0:y0 + py, x0:x0 + px])
    return pair

  def __repr__(self) -> str:
    names = ",".join(m.name for m in self.movies)
    return (f"PairSource(files=[{names}], patch={self.patch}, length={self.length}, "
            f"seed={self.seed})")


class _Slice:
  """Picks this process's block of each global batch from the shuffled pair stream."""

  def __init__(self, pairs: grain.MapDataset, global_batch: int, local_batch: int,
               offset: int):
    self.pairs, self.global_batch, self.local_batch = pairs, global_batch, local_batch
    self.offset = offset

  def __call__(self, i: int):
    k, j = divmod(int(i), self.local_batch)
    return self.pairs[k * self.global_batch + self.offset + j]


def _watch_parent(parent: int, every_s: float = 0.5) -> None:
  while os.getppid() == parent:
    time.sleep(every_s)
  os._exit(1)  # the parent is gone (killed, even with SIGKILL): so is its reader


def worker_init(parent: int, index: int, count: int) -> None:
  """Runs first in every grain worker: the worker leaves signals to the parent (which
  stops its workers itself), and exits within a second of the parent's death."""
  del index, count
  for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C and scancel reach the whole group
    signal.signal(sig, signal.SIG_IGN)
  threading.Thread(target=_watch_parent, args=(parent,), daemon=True,
                   name="deepcad-jax-parent-watch").start()


def pair_iterator(source: PairSource, batch_size: int, seed: int, workers: int = 0,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
  """Batches {'input', 'target'}: (B / process_count, pt, py, px) (and 'prior':
  (B / process_count, py, px) when the source has one), from step `start_step`.

  The pairs are a seeded shuffle of the source, reshuffled every epoch; global batch k
  holds pairs k*B .. k*B+B-1 of that stream, and process p reads only its contiguous
  block of each. The stream is a pure function of (seed, step), so a run resumes at any
  step with any number of processes.

  Args:
    source: the training pairs.
    batch_size: the global batch B, a multiple of `process_count`.
    seed: the shuffle's seed.
    workers: grain worker processes reading pairs (0: read in this process).
    start_step: the first global batch to yield (resuming).
    process_index, process_count: this process and how many share each batch.
  """
  if batch_size % process_count:
    raise UserError(f"batch size {batch_size} is not a multiple of the "
                    f"{process_count} processes.")
  local = batch_size // process_count
  pairs = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  ds = grain.MapDataset.range(start_step * local, 1 << 62).map(
      _Slice(pairs, batch_size, local, process_index * local))
  ds = ds.batch(local, drop_remainder=True).to_iter_dataset()
  if workers > 0:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain workers read absl flags; outside app.run too
    # Workers are spawned processes (their parent is this one, whichever thread starts
    # them); each watches its parent, as PR_SET_PDEATHSIG would watch the starting thread.
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                        worker_init_fn=functools.partial(worker_init, os.getpid()))
  return iter(ds)
