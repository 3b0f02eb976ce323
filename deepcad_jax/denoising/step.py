"""The compiled predict step: a window of raw frames in, finished output frames out.

`predict_step` is pure and runs entirely on the device: it normalises the window
(mean, scale), pads (y, x) to the plan's padded frame, cuts the tiles, runs the network
on them in chunks of `batch` tiles (a `lax.scan`, so memory holds one chunk's
activations), weighs and places each tile's output into an output window (crop, blend
or DeepCAD-RT's rescale, as the plan says), slices out the frames this window
completes, adds the mean back and converts them to the output dtype (rounded and
clipped, never wrapped). The host only reads frames, transfers them and writes what
comes back.

`tile_network` is the one function that applies a model to normalised tiles (ensemble
members averaged, test-time symmetries for uncertainty); training, inference, streaming
and the benchmarks share the network definition through it and `model.UNet3D`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepcad_jax.runtime import parallel
from deepcad_jax.core.augment import apply_symmetry, invert_symmetry, symmetries_for
from deepcad_jax.core.network import UNet3D, network_input, over_members
from deepcad_jax.core.normalise import Normalisation
from deepcad_jax.denoising.tiling import accumulate, cut_tiles

# (params, tiles (B, T, Y, X), prior tiles (B, Y, X) or None) -> (B, T, Y, X[, C])
TileFn = Callable[[Any, jax.Array, Any], jax.Array]


def symmetry_samples(predict: Callable[..., jax.Array], batch: jax.Array, samples: int,
                     prior: jax.Array | None = None) -> jax.Array:
  """`predict(batch, prior)` -> (M, B, T, Y, X) under the first `samples` symmetries of
  the (y, x) plane, each inverted back: (samples * M, B, T, Y, X).

  The symmetry is applied to the batch and its prior alike; an exactly equivariant
  network gives identical samples.
  """
  outs = []
  for s in symmetries_for(batch.shape)[:samples]:
    p = None if prior is None else apply_symmetry(prior, s)
    outs.append(invert_symmetry(predict(apply_symmetry(batch, s), p), s))
  return jnp.concatenate(outs)


def tile_network(features: int, dtype: Any = jnp.float32, *, members: int = 1, ensemble_impl: str = "loop", symmetries: int = 0,
                 keep_samples: bool = False, std_scale: float = 1.0,
                 widths: Sequence[int] | None = None) -> TileFn:
  """The network applied to normalised tiles (`normalise.Normalisation`), giving
  normalised outputs.

  Args:
    features: the network's width f, as for `model.UNet3D`.
    dtype: compute dtype.
    members: ensemble members M (parameters stacked on a leading axis), averaged.
    ensemble_impl: how the members run: 'loop' or 'vmap' (`network.over_members`).
    symmetries: K >= 1: each tile is predicted under K symmetries of the (y, x) plane
      with every member, and the result has channels [mean, std * std_scale]; 0: the
      plain (member-averaged) prediction.
    keep_samples: with `symmetries`, add the K x M samples as channels after the std.
    std_scale: the calibration's factor on the std (`calibrate`).
    widths: per-layer widths, as for `model.UNet3D` (default uniform from `features`).

  Returns:
    A `TileFn`: (params, tiles (B, T, Y, X), prior or None) -> (B, T, Y, X), or
    (B, T, Y, X, C) with `symmetries`.
  """
  net = UNet3D(features=features, dtype=jnp.dtype(dtype),
               widths=None if widths is None else tuple(widths))

  def predict(params, tiles, prior):  # -> (members, B, T, Y, X)
    def one(p):
      return net.apply({"params": p}, network_input(tiles, prior))[..., 0]
    return one(params)[None] if members == 1 else over_members(one, members,
                                                                ensemble_impl, params)

  def apply(params, tiles, prior):
    outs = symmetry_samples(functools.partial(predict, params), tiles, max(1, symmetries),
                            prior)
    if not symmetries:
      return outs.mean(0)
    stats = [outs.mean(0), outs.std(0, ddof=1) * std_scale]  # the Channels order
    return jnp.stack(stats + (list(outs) if keep_samples else []), axis=-1)

  return apply


def identity_tiles(channels: int = 0) -> TileFn:
  """A stand-in network that returns its input: what tiling and stitching alone do (the
  `overhead` benchmark, tests). With `channels`, the input is repeated on that many."""
  def apply(params, tiles, prior):
    del params, prior
    return tiles if not channels else jnp.stack([tiles] * channels, axis=-1)
  return apply


class Channels:
  """The channel layout of an output with uncertainty: arrays (..., C) hold the mean,
  then the standard deviation, then the samples (with `keep_samples`). The one place
  that knows the positions."""

  MEAN, STD, FIRST_SAMPLE = 0, 1, 2

  @staticmethod
  def count(samples: int = 0) -> int:
    return Channels.FIRST_SAMPLE + samples

  @staticmethod
  def mean(values: Any) -> Any:
    return values[..., Channels.MEAN]

  @staticmethod
  def std(values: Any) -> Any:
    return values[..., Channels.STD]

  @staticmethod
  def samples(values: Any) -> Any:
    return values[..., Channels.FIRST_SAMPLE:]

  @staticmethod
  def extras(values: Any) -> Any:
    """Every channel after the mean (the std, then the samples)."""
    return values[..., Channels.STD:]

  @staticmethod
  def join(mean: Any, extras: Any) -> Any:
    """(..., C) from the mean (...) and the other channels (..., C - 1)."""
    return np.concatenate([np.asarray(mean)[..., None], extras], axis=-1)


@dataclasses.dataclass(frozen=True)
class StepLayout:
  """Everything static about a predict step (its compiled shapes and modes)."""

  window: int                      # frames per window W
  frame: tuple[int, int]           # the movie's (Y, X)
  padded_frame: tuple[int, int]    # (Y, X) after padding
  tile: tuple[int, int, int]
  tiles: int                       # tile slots per window (a multiple of batch)
  batch: int                       # tiles per network call
  emit: int                        # frames returned per window E
  channels: int = 0                # 0: plain; else [mean, std, samples...]
  blend: bool = False
  reference: bool = False
  out_dtype: str = "float32"       # dtype of channel 0 as returned

  @property
  def chunks(self) -> int:
    return self.tiles // self.batch


def reflect_index(index: np.ndarray, n: int) -> np.ndarray:
  """Source positions of `index` on an axis of `n` values reflected at both ends
  (numpy's 'reflect' padding, repeated as often as needed; 'edge' when n == 1)."""
  index = np.asarray(index)
  if n == 1:
    return np.zeros_like(index)
  period = 2 * (n - 1)
  i = np.mod(index, period)
  return np.where(i >= n, period - i, i)


def _finish(frames: jax.Array, norm: Normalisation, valid: jax.Array, layout: StepLayout):
  """(main frames in the output dtype, extra channels float32 or None, clipped count,
  sum of squared rounding errors, temporal moments): every channel back in intensities
  (the std as a spread), frames cropped to the movie. Integer outputs are also measured
  over rows [valid[0], valid[1]) (those the host keeps): voxels clipped, the squared
  rounding errors of the others, and per pixel the sums of (x - mean) and (x - mean)^2
  over those rows ((2, Y, X) float32; None for floats)."""
  y, x = layout.frame
  frames = frames[:, :y, :x]
  extras = None
  if layout.channels:
    extras = jnp.concatenate([norm.spread_from_network(Channels.std(frames)[..., None]),
                              norm.from_network(Channels.samples(frames))], axis=-1)
    frames = Channels.mean(frames)
  frames = norm.from_network(frames)
  mean = norm.mean
  dtype = np.dtype(layout.out_dtype)
  if dtype.kind == "f":
    return (frames.astype(dtype), extras, jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.float32), None)
  info = np.iinfo(dtype)
  rounded = jnp.rint(frames)
  outside = (rounded < info.min) | (rounded > info.max)
  rows = jnp.arange(frames.shape[0])
  kept = ((rows >= valid[0]) & (rows < valid[1]))[:, None, None]
  clipped = jnp.sum(outside & kept, dtype=jnp.int32)
  error = jnp.where(kept & ~outside, rounded - frames, 0.0)
  rounding_sq = jnp.sum(jnp.sum(error * error, axis=(1, 2)))  # per frame, then frames
  shifted = jnp.where(kept, frames - mean, 0.0)
  moments = jnp.stack([jnp.sum(shifted, axis=0), jnp.sum(shifted * shifted, axis=0)])
  return (jnp.clip(rounded, info.min, info.max).astype(dtype), extras, clipped,
          rounding_sq, moments)


def predict_step(params: Any, carry: jax.Array | None, window: jax.Array, group: dict,
                 consts: dict, *, layout: StepLayout, tile_fn: TileFn,
                 tile_sharding: Any = None) -> dict:
  """One window through the network; see the module docstring.

  Args:
    params: the network's parameters (replicated).
    carry: with blending, the output window carried over from the previous call (its
      frame 0 is this window's frame 0); None otherwise.
    window: (W, Y, X) raw frames in the movie's dtype (T already padded by the host).
    group: per-window arrays: `mean` (), `scale` () (the `Normalisation`), `t_starts` (tiles,), `yx_index` (tiles,),
      `t_weight` (tiles, tile T), `t_full` (reference), `emit_start` (), `shift` (),
      `valid` (2,) (the output rows the host keeps), `t_norm` (emit,) (blending).
    consts: per-movie arrays: `yx_starts` (n, 2), `yx_weight` (n, tile Y, tile X),
      `yx_full` (reference), `yx_norm` (padded Y, padded X) (blending), `prior`
      (padded Y, padded X) normalised mean image or None, `pad_y`, `pad_x` (reflect
      indices of the padded frame).
    layout: the static shapes and modes.
    tile_fn: the network on normalised tiles (`tile_network`).
    tile_sharding: how a chunk of tiles is placed on the devices (None: as XLA likes).

  Returns:
    {'frames': (E, Y, X) output dtype, 'extras': (E, Y, X, C - 1) float32 or None,
     'carry': the next carry (blending) or None, 'clipped': voxels clipped (int32),
     'rounding_sq': integer outputs: the kept voxels' squared rounding errors, summed,
     'moments': integer outputs: (2, Y, X) per-pixel sums of (x - mean), (x - mean)^2,
     'rescale_skipped': tiles whose reference rescale was not positive (int32)}.
  """
  norm = Normalisation(group["mean"].astype(jnp.float32),
                       group["scale"].astype(jnp.float32))
  x = norm.to_network(window)
  x = jnp.take(jnp.take(x, consts["pad_y"], axis=1), consts["pad_x"], axis=2)
  prior = consts.get("prior")
  shape = (layout.window,) + tuple(layout.padded_frame) + (
      (layout.channels,) if layout.channels else ())
  acc = carry if layout.blend else jnp.zeros(shape, jnp.float32)
  bs = layout.batch

  def chunk(acc, c):
    ts = jax.lax.dynamic_slice_in_dim(group["t_starts"], c * bs, bs)
    yi = jax.lax.dynamic_slice_in_dim(group["yx_index"], c * bs, bs)
    yx = consts["yx_starts"][yi]
    tiles = cut_tiles(x, ts, yx, layout.tile)
    if tile_sharding is not None:
      tiles = jax.lax.with_sharding_constraint(tiles, tile_sharding)
    ptiles = None
    if prior is not None:
      ptiles = jax.vmap(lambda s: jax.lax.dynamic_slice(prior, s, layout.tile[1:]))(yx)
    outs = tile_fn(params, tiles, ptiles)
    tw = jax.lax.dynamic_slice_in_dim(group["t_weight"], c * bs, bs)
    weights = tw[:, :, None, None] * consts["yx_weight"][yi][:, None]
    skipped = jnp.zeros((), jnp.int32)
    if layout.reference:
      tf = jax.lax.dynamic_slice_in_dim(group["t_full"], c * bs, bs)
      full = tf[:, :, None, None] * consts["yx_full"][yi][:, None]
      raw = jnp.sum(full * norm.from_network(tiles), axis=(1, 2, 3))
      den = jnp.sum(full * norm.from_network(outs), axis=(1, 2, 3))
      ratio = raw / den
      ok = jnp.isfinite(ratio) & (ratio > 0) & (jnp.sum(full, axis=(1, 2, 3)) > 0)
      factor = jnp.where(ok, jnp.sqrt(jnp.where(ok, ratio, 1.0)), 1.0)
      outs = norm.to_network(norm.from_network(outs) * factor[:, None, None, None])
      skipped = jnp.sum(~ok & (jnp.sum(full, axis=(1, 2, 3)) > 0), dtype=jnp.int32)
    acc = accumulate(acc, outs, ts, yx, weights)
    return acc, skipped

  acc, skipped = jax.lax.scan(chunk, acc, jnp.arange(layout.chunks))
  emit = jax.lax.dynamic_slice_in_dim(acc, group["emit_start"], layout.emit)
  if layout.blend:
    weight = group["t_norm"][:, None, None] * consts["yx_norm"][None]
    emit = emit / (weight[..., None] if layout.channels else weight)
  frames, extras, clipped, rounding_sq, moments = _finish(emit, norm, group["valid"],
                                                          layout)
  new_carry = None
  if layout.blend:
    padded = jnp.concatenate([acc, jnp.zeros_like(acc)])
    new_carry = jax.lax.dynamic_slice_in_dim(padded, group["shift"], layout.window)
  return {"frames": frames, "extras": extras, "carry": new_carry, "clipped": clipped,
          "rounding_sq": rounding_sq, "moments": moments,
          "rescale_skipped": jnp.sum(skipped)}


def compile_predict_step(layout: StepLayout, tile_fn: TileFn, mesh: jax.sharding.Mesh,
                         tile_sharding: Any = None) -> Callable:
  """`predict_step` jit-compiled for `layout`: every input and output replicated over the
  mesh (one window per call), the tiles of a chunk placed by `tile_sharding`; the carry
  is donated."""
  rep = parallel.replicated(mesh)
  step = functools.partial(predict_step, layout=layout, tile_fn=tile_fn,
                           tile_sharding=tile_sharding)
  return jax.jit(step, in_shardings=rep, out_shardings=rep, donate_argnums=1)


def frame_padding(frame: Sequence[int], padded: Sequence[int]) -> dict[str, np.ndarray]:
  """The reflect indices that pad a (Y, X) frame to `padded`."""
  return {"pad_y": reflect_index(np.arange(padded[0]), frame[0]).astype(np.int32),
          "pad_x": reflect_index(np.arange(padded[1]), frame[1]).astype(np.int32)}
