"""Tiling and stitching: which part of a movie each tile reads, keeps and weighs.

One `TilePlan` is computed per movie (or per stream) and drives everything that cuts a
movie into network-sized pieces: offline denoising, the split between processes,
uncertainty samples and the live stream. Every axis is cut the same way
(`AxisTiling`): regular tiles of `tile` voxels every `core` voxels, each keeping
`core` voxels that start `halo` voxels into it (the first tile keeps from 0), and a last
tile aligned to the end of the padded axis that keeps the rest. Every voxel is kept by
exactly one tile.

Three modes fill in those numbers:
- exact: each axis is padded once to a multiple of 8 (the pooling grid), tiles start on
  multiples of 8 and every side with a neighbour has a halo no shorter than the
  network's reach (`exact_halo`), so the kept cores equal one forward pass over the
  whole padded movie, whatever the tile size.
- overlap: DeepCAD-RT's scheme. Patches every int(p * (1 - overlap)) voxels, the centre
  kept (half the overlap dropped on each side with a neighbour), an axis shorter than
  the patch padded to a multiple of 8. Near kept-region borders the network sees less
  context than it uses, so the output depends on the layout.
- reference: the overlap layout with DeepCAD-RT's own kept regions (its end-aligned last
  patch overwrites part of its neighbour's) and per-patch intensity rescale.

`blend` (overlap mode) weighs overlapping tiles with linear tapers instead of cropping.

The device side lives here too: `cut_tiles` and `accumulate` place tile outputs into a
window of frames inside compiled code, with the per-tile weights the plan provides.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepcad_jax.errors import UserError

GRID = 8            # 2 ** (levels - 1): the pooling grid of the 4-level U-Net
MODES = ("exact", "overlap", "reference")


# ------------------------------------------------------------------ receptive field


def reach_by_residue(levels: int = 4, convs_per_level: int = 2, kernel: int = 3
                     ) -> list[tuple[int, int]]:
  """How far an output voxel's inputs reach (left, right), by its position modulo the
  pooling grid, derived from the U-Net's layers by interval arithmetic.

  Each 'SAME' conv widens the interval by kernel // 2 on each side at its level; a 2x
  max-pool maps output j to inputs 2j, 2j+1; nearest upsampling maps output i to input
  i // 2; the decoder sees the union of its skip and its upsampled path. For the
  DeepCAD-RT network this gives 44 to 51 voxels.
  """
  r = (kernel // 2) * convs_per_level
  grid = 2 ** (levels - 1)

  def encoder(level, a, b):  # input interval of encoder level `level` at [a, b]
    a, b = a - r, b + r
    return (a, b) if level == 0 else encoder(level - 1, 2 * a, 2 * b + 1)

  def decoder(level, a, b):
    if level == levels - 1:
      return encoder(level, a, b)
    a, b = a - r, b + r
    lo1, hi1 = encoder(level, a, b)
    lo2, hi2 = decoder(level + 1, a // 2, b // 2)
    return min(lo1, lo2), max(hi1, hi2)

  base = 4 * grid * (levels + r)  # far from any boundary
  out = []
  for residue in range(grid):
    i = base + residue
    lo, hi = decoder(0, i, i)
    out.append((i - lo, hi - i))
  return out


def exact_halo(levels: int = 4, convs_per_level: int = 2, kernel: int = 3) -> int:
  """The halo that makes a tile's core exact: tiles and cores start on the pooling grid,
  so a core voxel k voxels from its border needs reach - k voxels of context beyond it;
  the worst case over positions, rounded up to the grid (48 for DeepCAD-RT)."""
  grid = 2 ** (levels - 1)
  reach = reach_by_residue(levels, convs_per_level, kernel)
  need = 0
  for k in range(4 * max(max(r) for r in reach)):
    left = reach[k % grid][0] - k                 # k voxels right of a core's start
    right = reach[(grid - 1 - k) % grid][1] - k   # k voxels left of a core's end
    need = max(need, left, right)
  return -(-need // grid) * grid


HALO = exact_halo()


# ------------------------------------------------------------------ axes


@dataclasses.dataclass(frozen=True)
class AxisTile:
  start: int      # first voxel of the tile (padded coordinates)
  keep_lo: int    # kept region [keep_lo, keep_hi)
  keep_hi: int
  full_hi: int | None = None  # reference mode: where its kept region ended before the
                              # later patch overwrote part of it (the rescale uses it)


@dataclasses.dataclass(frozen=True)
class AxisTiling:
  """Regular tiles of `tile` voxels every `core` voxels keeping [start + halo, start +
  halo + core) (the first from 0), then one tile aligned to the end that keeps the rest.
  """

  tile: int
  core: int
  halo: int

  def regular(self, i: int) -> AxisTile:
    """Tile i of an axis long enough to hold it and one more."""
    s = i * self.core
    return AxisTile(s, 0 if i == 0 else s + self.halo, s + self.halo + self.core)

  def is_last(self, i: int, padded: int) -> bool:
    """Whether tile i is the end-aligned last one of an axis of `padded` voxels."""
    return i * self.core + self.tile >= padded

  def last(self, i: int, padded: int) -> AxisTile:
    """The end-aligned tile i that keeps from its predecessor's end to `padded`."""
    lo = 0 if i == 0 else self.regular(i - 1).keep_hi
    return AxisTile(max(0, padded - self.tile), lo, padded)

  def tiles(self, padded: int) -> list[AxisTile]:
    out, i = [], 0
    while not self.is_last(i, padded):
      out.append(self.regular(i))
      i += 1
    out.append(self.last(i, padded))
    return out


def ceil_to(n: int, multiple: int = GRID) -> int:
  return -(-int(n) // multiple) * multiple


def exact_axis(padded: int, tile: int, halo: int = HALO, multiple: int = GRID
               ) -> AxisTiling:
  """The exact tiling of an axis of `padded` voxels (a multiple of 8) with tiles of at
  most `tile` voxels (multiples of `multiple`): the fewest tiles, cores balanced."""
  if padded <= tile and padded % multiple == 0:
    return AxisTiling(padded, padded, 0)
  for length, _ in _axis_options(padded, halo, multiple):
    if length <= tile:
      return AxisTiling(length, length - 2 * halo, halo)
  raise UserError(f"an exact tile needs at least {ceil_to(2 * halo + GRID, multiple)} "
                  f"voxels on an axis it splits (a core of {GRID} or more plus a "
                  f"{halo}-voxel halo on each side); got at most {tile} for an axis of "
                  f"{padded}.")


def _axis_options(padded: int, halo: int, multiple: int = GRID) -> list[tuple[int, int]]:
  """(tile length, tile count) of the useful exact tilings of one axis, longest first:
  one tile where the axis allows it, then 2, 3, ... tiles with balanced cores."""
  options = {}
  if padded % multiple == 0:
    options[padded] = 1
  count = 2
  while True:
    length = ceil_to(ceil_to((padded - 2 * halo) / count) + 2 * halo, multiple)
    if length < padded:
      tiling = AxisTiling(length, length - 2 * halo, halo)
      options.setdefault(length, len(tiling.tiles(padded)))
    if length - 2 * halo <= multiple or count > padded:
      break
    count += 1
  return sorted(options.items(), reverse=True)


def gap(p: int, overlap: float) -> int:
  """The reference's step between patch starts: int(p * (1 - overlap)), at least 1."""
  return max(1, int(p * (1 - overlap)))


def overlap_axis(p: int, overlap: float) -> AxisTiling:
  """DeepCAD-RT's tiling of an axis: patches every gap voxels, the centre kept."""
  step = gap(p, overlap)
  return AxisTiling(p, step, (p - step) // 2)


def axis_plan(n: int, p: int, overlap: float, reference: bool = False) -> list[AxisTile]:
  """Tiles of one axis of length `n` with patch length `p` (overlap mode; an axis no
  longer than the patch gets one tile, which the caller pads)."""
  if n <= p:
    return [AxisTile(0, 0, n)]
  tiles = overlap_axis(p, overlap).tiles(n)
  if reference and len(tiles) > 1:
    cut = (p - gap(p, overlap)) // 2
    boundary = n - p + cut
    prev = tiles[-2]
    tiles[-2] = AxisTile(prev.start, prev.keep_lo, boundary, prev.keep_hi)
    tiles[-1] = AxisTile(n - p, boundary, n)
  return tiles


def padded_patch(shape: Sequence[int], patch: Sequence[int], multiple: int = GRID
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(patch, padded shape) in overlap mode: an axis shorter than the patch gets a
  smaller patch, the axis length rounded up to `multiple`, and is padded to it."""
  eff = tuple(p if n >= p else ceil_to(n, multiple) for n, p in zip(shape, patch))
  padded = tuple(max(n, e) for n, e in zip(shape, eff))
  return eff, padded


def taper(p: int, tile: AxisTile, n: int, overlap_len: int) -> np.ndarray:
  """1-D blending weights of a tile: a linear taper over the overlap on sides with a
  neighbour, flat elsewhere (never zero)."""
  i = np.arange(p, dtype=np.float32) + 0.5
  w = np.ones(p, np.float32)
  r = max(1, overlap_len)
  if tile.start > 0:
    w = np.minimum(w, i / r)
  if tile.start + p < n:
    w = np.minimum(w, (p - i) / r)
  return w


# ------------------------------------------------------------------ plans


@dataclasses.dataclass(frozen=True)
class Patch:
  """One tile of a 3-D plan (overlap-mode name kept for the tests and benchmarks)."""

  start: tuple[int, int, int]
  keep: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # [lo, hi) per axis
  index: tuple[int, int, int]   # tile index per axis
  full: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """Where every tile of a (T, Y, X) movie reads, what it keeps, and how it is weighed.

  Coordinates are those of the padded movie (`padded`); the movie itself is the corner
  `shape`. Temporal tiles are the slabs the movie is read in; every slab is cut the same
  way in (y, x).
  """

  mode: str
  shape: tuple[int, int, int]
  padded: tuple[int, int, int]
  tile: tuple[int, int, int]
  axes: tuple[tuple[AxisTile, ...], tuple[AxisTile, ...], tuple[AxisTile, ...]]
  blend: bool = False
  halo: int = 0             # exact mode
  overlap: float = 0.0      # overlap and reference modes

  @property
  def slabs(self) -> tuple[AxisTile, ...]:
    return self.axes[0]

  @property
  def yx_tiles(self) -> list[tuple[AxisTile, AxisTile]]:
    return list(itertools.product(self.axes[1], self.axes[2]))

  @property
  def tiles_per_slab(self) -> int:
    return len(self.axes[1]) * len(self.axes[2])

  @property
  def tile_count(self) -> int:
    return len(self.axes[0]) * self.tiles_per_slab

  @property
  def network_voxels(self) -> int:
    """Voxels that go through the network."""
    return self.tile_count * int(np.prod(self.tile))

  @property
  def recompute(self) -> float:
    """Network voxels per movie voxel (1.0: every voxel computed once, no padding)."""
    return self.network_voxels / max(1, int(np.prod(self.shape)))

  def patches(self) -> list[Patch]:
    """Every tile, T slowest."""
    return [Patch(tuple(a.start for a in tiles),
                  tuple((a.keep_lo, a.keep_hi) for a in tiles), idx,
                  tuple((a.keep_lo, a.full_hi or a.keep_hi) for a in tiles))
            for idx, tiles in zip(itertools.product(*(range(len(a)) for a in self.axes)),
                                  itertools.product(*self.axes))]

  # -- frames owned by each slab --------------------------------------------------

  def final_after(self, k: int) -> int:
    """Frames [0, final_after(k)) are complete once slabs 0..k are done (padded
    coordinates): the end of slab k's kept region, or with blending the start of the
    next slab (which touches everything after it)."""
    slabs = self.slabs
    if k < 0:
      return 0
    if k >= len(slabs) - 1:
      return self.padded[0]
    return slabs[k + 1].start if self.blend else slabs[k].keep_hi

  def owned(self, k: int) -> tuple[int, int]:
    """The movie frames slab k completes: [final_after(k - 1), final_after(k)) within
    the movie."""
    t = self.shape[0]
    return min(t, self.final_after(k - 1)), min(t, self.final_after(k))

  def split(self, parts: int) -> list[tuple[int, int]]:
    """Contiguous ranges of slabs for `parts` processes (some may be empty)."""
    n = len(self.slabs)
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))

  def warmup(self, first: int) -> int:
    """The slab to start from so that slab `first`'s frames are complete: with blending
    the one before (its taper overlaps them), else `first` itself."""
    return max(0, first - 1) if self.blend else first

  # -- weights --------------------------------------------------------------------

  def _overlap_lengths(self) -> list[int]:
    return [p - gap(p, self.overlap) for p in self.tile]

  def t_weights(self, k: int) -> np.ndarray:
    """(tile T,) weights of slab k's frames: its taper when blending, else 1 on the
    kept frames and 0 elsewhere."""
    tile, n = self.slabs[k], self.padded[0]
    if self.blend:
      return taper(self.tile[0], tile, n, self._overlap_lengths()[0])
    return _indicator(self.tile[0], tile.start, tile.keep_lo, tile.keep_hi)

  def t_full(self, k: int) -> np.ndarray:
    """(tile T,) indicator of slab k's full kept frames (reference rescale)."""
    tile = self.slabs[k]
    return _indicator(self.tile[0], tile.start, tile.keep_lo, tile.full_hi or tile.keep_hi)

  def yx_weights(self) -> np.ndarray:
    """(tiles per slab, tile Y, tile X) weights, as `t_weights` in (y, x)."""
    out = []
    lengths = self._overlap_lengths()
    for ty, tx in self.yx_tiles:
      if self.blend:
        wy = taper(self.tile[1], ty, self.padded[1], lengths[1])
        wx = taper(self.tile[2], tx, self.padded[2], lengths[2])
      else:
        wy = _indicator(self.tile[1], ty.start, ty.keep_lo, ty.keep_hi)
        wx = _indicator(self.tile[2], tx.start, tx.keep_lo, tx.keep_hi)
      out.append(wy[:, None] * wx[None, :])
    return np.stack(out)

  def yx_full(self) -> np.ndarray:
    """(tiles per slab, tile Y, tile X) indicators of the full kept regions (reference)."""
    return np.stack([
        _indicator(self.tile[1], ty.start, ty.keep_lo, ty.full_hi or ty.keep_hi)[:, None] *
        _indicator(self.tile[2], tx.start, tx.keep_lo, tx.full_hi or tx.keep_hi)[None, :]
        for ty, tx in self.yx_tiles])

  def t_norm(self) -> np.ndarray:
    """(padded T,) sum of the slabs' temporal weights (1 everywhere unless blending)."""
    total = np.zeros(self.padded[0] + self.tile[0], np.float32)
    for k, tile in enumerate(self.slabs):
      total[tile.start:tile.start + self.tile[0]] += self.t_weights(k)
    return total[:self.padded[0]]

  def yx_norm(self) -> np.ndarray:
    """(padded Y, padded X) sum of the (y, x) weights (1 everywhere unless blending)."""
    total = np.zeros(self.padded[1:], np.float32)
    for (ty, tx), w in zip(self.yx_tiles, self.yx_weights()):
      total[ty.start:ty.start + self.tile[1], tx.start:tx.start + self.tile[2]] += w
    return total

  def describe(self) -> str:
    """One line for reports: mode, tile, count and recompute factor."""
    what = {"exact": f"exact (halo {self.halo})",
            "overlap": f"overlap {self.overlap:g}" + (", blended" if self.blend else ""),
            "reference": f"reference stitching (overlap {self.overlap:g})"}[self.mode]
    return (f"{what}: {self.tile_count} tile(s) of {'x'.join(map(str, self.tile))}, "
            f"recompute {self.recompute:.2f}x")


def _indicator(p: int, start: int, lo: int, hi: int) -> np.ndarray:
  w = np.zeros(p, np.float32)
  w[max(0, lo - start):max(0, hi - start)] = 1
  return w


def exact_plan(shape: Sequence[int], tile: Sequence[int], halo: int = HALO,
               y_multiple: int = GRID) -> TilePlan:
  """The exact plan of a movie with tiles of at most `tile` (multiples of 8; tile Y a
  multiple of `y_multiple`, for a Y axis split over devices)."""
  shape = tuple(int(n) for n in shape)
  padded = tuple(ceil_to(n) for n in shape)
  axes = [exact_axis(n, t, halo, m) for n, t, m in zip(padded, tile,
                                                      (GRID, y_multiple, GRID))]
  return TilePlan("exact", shape, padded, tuple(a.tile for a in axes),
                  tuple(tuple(a.tiles(n)) for a, n in zip(axes, padded)), halo=halo)


def overlap_plan(shape: Sequence[int], patch: Sequence[int], overlap: float,
                 reference: bool = False, blend: bool = False) -> TilePlan:
  """DeepCAD-RT's plan: `patch` every int(p * (1 - overlap)) voxels, centres kept."""
  if blend and reference:
    raise UserError("--blend and --reference-stitching exclude each other; pick one.")
  shape = tuple(int(n) for n in shape)
  eff, padded = padded_patch(shape, patch)
  axes = tuple(tuple(axis_plan(n, p, overlap, reference)) for n, p in zip(padded, eff))
  return TilePlan("reference" if reference else "overlap", shape, padded, tuple(eff), axes,
                  blend=blend, overlap=float(overlap))


def patch_plan(shape: Sequence[int], patch: Sequence[int], overlap: float,
               reference: bool = False) -> list[Patch]:
  """All patches of a (T, Y, X) movie in overlap mode, T slowest."""
  return overlap_plan(shape, patch, overlap, reference).patches()


# ------------------------------------------------------------------ choosing exact tiles


def choose_exact_tile(shape: Sequence[int], voxel_budget: float, halo: int = HALO,
                      y_multiple: int = GRID, window_cost=None) -> tuple[int, int, int]:
  """The exact tile shape with the fewest network voxels whose size fits
  `voxel_budget`, preferring whole frames in (y, x) where the cost is within 2%.

  `window_cost(tile)` (optional) adds the voxel-equivalent of buffers that scale with
  the frame size rather than the tile (the slab window, the output slab).
  """
  padded = [ceil_to(n) for n in shape]
  best = None
  for ly, ny in _axis_options(padded[1], halo, y_multiple):
    for lx, nx in _axis_options(padded[2], halo, GRID):
      t_options = _axis_options(padded[0], halo, GRID)
      for lt, nt in t_options:
        extra = window_cost((lt, ly, lx)) if window_cost else 0
        if lt * ly * lx + extra > voxel_budget:
          continue
        cost = nt * lt * ny * ly * nx * lx
        key = (cost, ny * nx)
        if best is None or cost < best[0][0] * 0.98 or (
            cost <= best[0][0] * 1.02 and ny * nx < best[0][1]):
          best = (key, (lt, ly, lx))
        break  # longer T tiles come first: the first that fits is the best for (ly, lx)
  if best is None:
    raise UserError(
        f"exact tiling of a {'x'.join(map(str, shape))} movie needs tiles of at least "
        f"{2 * halo + GRID} voxels per split axis, which does not fit the memory budget; "
        "raise --memory-budget or use --tiling overlap.")
  return best[1]


# ------------------------------------------------------------------ device side


def cut_tiles(window: jax.Array, t_starts: jax.Array, yx_starts: jax.Array,
              tile: Sequence[int]) -> jax.Array:
  """(B, tile T, tile Y, tile X) tiles of a (W, Y, X[, ...]) window at (t, y, x) starts
  given per tile as arrays (a gather inside compiled code)."""
  def one(t0, yx):
    starts = (t0, yx[0], yx[1]) + (0,) * (window.ndim - 3)
    return jax.lax.dynamic_slice(window, starts, tuple(tile) + window.shape[3:])
  return jax.vmap(one)(t_starts, yx_starts)


def accumulate(acc: jax.Array, outs: jax.Array, t_starts: jax.Array, yx_starts: jax.Array,
               weights: jax.Array) -> jax.Array:
  """acc[t:t+T, y:y+Y, x:x+X] += weights[b] * outs[b] for every tile b, in order.

  `outs` is (B, T, Y, X[, C]), `weights` (B, T, Y, X) (0 where a tile keeps nothing;
  a cropped tile's weights are 1 on its kept region, so the kept values land exactly).
  """
  w = weights.reshape(weights.shape + (1,) * (outs.ndim - weights.ndim))
  for b in range(outs.shape[0]):
    starts = (t_starts[b], yx_starts[b, 0], yx_starts[b, 1]) + (0,) * (acc.ndim - 3)
    region = jax.lax.dynamic_slice(acc, starts, outs.shape[1:])
    # where, not a product alone: what a tile does not keep never reaches the output
    part = jnp.where(w[b] > 0, w[b] * outs[b], 0)
    acc = jax.lax.dynamic_update_slice(acc, region + part, starts)
  return acc
