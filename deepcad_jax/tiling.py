"""Patch plans: where overlapping patches start and which part of each is kept.

Per axis (as the reference): gap = int(p * (1 - overlap)); patches start at 0, gap,
2*gap, ... and the last one is aligned to the end of the axis. From each patch the centre
is kept: cut = (p - gap) // 2 voxels are dropped on every side with a neighbour, so
interior kept regions are exactly `gap` long and meet; the end-aligned last patch keeps
from where its neighbour's kept region ends to the end of the axis. Every voxel is kept
by exactly one patch. An axis no longer than the patch gets one patch (the caller pads).

`reference=True` reproduces DeepCAD-RT's own kept regions: its last patch keeps from
`n - p + cut`, and where that overlaps its neighbour's kept region the later write (the
last patch) wins, so the neighbour's kept region ends there instead.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class AxisTile:
  start: int      # first voxel of the patch
  keep_lo: int    # kept region [keep_lo, keep_hi), in movie coordinates
  keep_hi: int
  full_hi: int | None = None  # reference mode: where its kept region ended before the
                              # later patch overwrote part of it (the rescale uses it)


def gap(p: int, overlap: float) -> int:
  """The reference's step between patch starts: int(p * (1 - overlap)), at least 1."""
  return max(1, int(p * (1 - overlap)))


def axis_plan(n: int, p: int, overlap: float, reference: bool = False) -> list[AxisTile]:
  """Tiles of one axis of length `n` with patch length `p`."""
  if n <= p:
    return [AxisTile(0, 0, n)]
  step = gap(p, overlap)
  count = math.ceil((n - p) / step) + 1
  starts = [i * step for i in range(count - 1)] + [n - p]
  cut = (p - step) // 2
  tiles, lo = [], 0
  for i, s in enumerate(starts):
    hi = n if i == count - 1 else s + cut + step
    tiles.append(AxisTile(s, lo, hi))
    lo = hi
  if reference and count > 1:
    boundary = n - p + cut
    prev = tiles[-2]
    tiles[-2] = AxisTile(prev.start, prev.keep_lo, boundary, prev.keep_hi)
    tiles[-1] = AxisTile(n - p, boundary, n)
  return tiles


@dataclasses.dataclass(frozen=True)
class Patch:
  start: tuple[int, int, int]
  keep: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # [lo, hi) per axis
  index: tuple[int, int, int]   # tile index per axis
  full: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None


def patch_plan(shape: Sequence[int], patch: Sequence[int], overlap: float,
               reference: bool = False) -> list[Patch]:
  """All patches of a (T, Y, X) movie, T slowest; pure function of its arguments."""
  axes = [axis_plan(n, p, overlap, reference) for n, p in zip(shape, patch)]
  return [Patch(tuple(a.start for a in tiles), tuple((a.keep_lo, a.keep_hi) for a in tiles),
                idx, tuple((a.keep_lo, a.full_hi or a.keep_hi) for a in tiles))
          for idx, tiles in zip(itertools.product(*(range(len(a)) for a in axes)),
                                itertools.product(*axes))]


def padded_patch(shape: Sequence[int], patch: Sequence[int], multiple: int = 8
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(patch, padded shape): an axis shorter than the patch gets a smaller patch, the
  axis length rounded up to `multiple`, and is padded to it."""
  eff = tuple(p if n >= p else -(-n // multiple) * multiple for n, p in zip(shape, patch))
  padded = tuple(max(n, e) for n, e in zip(shape, eff))
  return eff, padded


def blend_weights(p: int, tile: AxisTile, n: int, overlap_len: int) -> np.ndarray:
  """1-D weights for blending: a linear taper over the overlap on sides with a
  neighbour, flat elsewhere (never zero)."""
  i = np.arange(p, dtype=np.float32) + 0.5
  w = np.ones(p, np.float32)
  r = max(1, overlap_len)
  if tile.start > 0:
    w = np.minimum(w, i / r)
  if tile.start + p < n:
    w = np.minimum(w, (p - i) / r)
  return w
