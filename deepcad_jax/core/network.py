"""The DeepCAD-RT 3D U-Net in Flax linen, channels last.

Four levels of width f, 2f, 4f, 8f; a double 3x3x3 conv (+bias, ReLU) per level; 2x2x2 max
pooling (odd sizes floored); nearest upsampling to the skip's exact size, concatenated as
[skip, upsampled]; a final 1x1x1 conv to one channel. Inputs and outputs are
(N, T, Y, X, C). Parameters are float32; `dtype` sets the compute precision.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepcad_jax.errors import UserError

# The paper's pruning ladder, widest first.
LADDER: tuple[int, ...] = (64, 48, 32, 24, 16, 12, 8)
LEVELS = 4
MIN_SIZE = 2 ** (LEVELS - 1)  # smallest T, Y or X that survives the poolings
# The 3x3x3 convolutions in the order of a `widths` tuple: each encoder level then each
# decoder level (deepest first), two convolutions each. The final 1x1x1 conv has one.
LAYERS: tuple[tuple[str, str], ...] = tuple(
    [(f"encoder_{level}", conv) for level in range(LEVELS) for conv in ("conv1", "conv2")] +
    [(f"decoder_{level}", conv) for level in range(LEVELS - 2, -1, -1)
     for conv in ("conv1", "conv2")])


def uniform_widths(features: int, in_channels: int = 1) -> tuple[int, ...]:
  """The output channels of every 3x3x3 conv (`LAYERS` order) of `UNet3D(features)`:
  level l has f * 2**l; an encoder's first conv has max(half of that, its input)."""
  widths, cin = [], in_channels
  for level in range(LEVELS):
    out = features * 2**level
    widths += [max(out // 2, cin), out]
    cin = out
  for level in range(LEVELS - 2, -1, -1):
    widths += [features * 2**level] * 2
  return tuple(widths)


def widths_of(params: Any) -> tuple[int, ...]:
  """The output channels of every 3x3x3 conv of a parameter tree (`LAYERS` order); a
  stacked ensemble's leading member axis is ignored."""
  return tuple(int(np.shape(params[m][c]["kernel"])[-1]) for m, c in LAYERS)


def flops_per_voxel(widths: Sequence[int], in_channels: int = 1) -> float:
  """Multiply-adds x 2 per output voxel of the network with these conv widths (the
  pooled levels count 1/8 per level); bias additions and ReLUs not counted."""
  w = dict(zip(LAYERS, widths))
  total, cin = 0.0, in_channels
  for level in range(LEVELS):
    mid, out = w[(f"encoder_{level}", "conv1")], w[(f"encoder_{level}", "conv2")]
    total += 2 * 27 * (cin * mid + mid * out) / 8**level
    cin = out
  for level in range(LEVELS - 2, -1, -1):
    skip = w[(f"encoder_{level}", "conv2")]
    mid, out = w[(f"decoder_{level}", "conv1")], w[(f"decoder_{level}", "conv2")]
    total += 2 * 27 * ((skip + cin) * mid + mid * out) / 8**level
    cin = out
  return total + 2 * cin


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """PyTorch 'nearest' source indices: floor(i * n_in / n_out)."""
  return (np.arange(n_out) * n_in) // n_out


def _repeat_counts(x: jax.Array, counts: np.ndarray, axis: int) -> jax.Array:
  """Element i of `axis` repeated counts[i] times, as reshapes and concatenations.

  Nearest upsampling by ~2 repeats every element twice except a few that appear once
  or three times; runs of equal counts become one broadcast-and-reshape each, which XLA
  compiles far better than a gather (and whose gradient is not a scatter).
  """
  pieces, start = [], 0
  while start < len(counts):
    end = start
    while end < len(counts) and counts[end] == counts[start]:
      end += 1
    c = int(counts[start])
    part = jax.lax.slice_in_dim(x, start, end, axis=axis)
    if c > 1:
      part = jnp.repeat(part, c, axis=axis)
    if c > 0:
      pieces.append(part)
    start = end
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=axis)


def upsample_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Nearest-neighbour resize of the (T, Y, X) axes of (N, T, Y, X, C) to `size`
  (PyTorch's 'nearest': output i takes input floor(i * n_in / n_out))."""
  for axis, n_out in zip((1, 2, 3), size):
    n_in = x.shape[axis]
    if n_out == n_in:
      continue
    counts = np.bincount(_nearest_indices(n_in, n_out), minlength=n_in)
    runs = 1 + int(np.count_nonzero(np.diff(counts)))
    if runs <= 4:  # 2x, or 2x with a few odd elements (odd sizes after pooling)
      x = _repeat_counts(x, counts, axis)
    else:
      x = jnp.take(x, _nearest_indices(n_in, n_out), axis=axis)
  return x


def torch_uniform(fan_in: int):
  """PyTorch's default Conv3d init (kaiming_uniform, a=sqrt(5)): U(-b, b), b = 1/sqrt(fan_in).

  Used for weights and biases, as the reference network is initialised.
  """
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv3d_as_2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 'SAME' k x k x k convolution of (N, T, Y, X, C) written as 2-D convolutions.

  XLA:CPU runs 3-D convolutions through a slow generic kernel; the same arithmetic as
  k 2-D convolutions over (Y, X) with the frames folded into the batch is 2.5-8x faster
  there. Thin inputs (few channels) stack the k time-shifted copies on channels and do
  one 2-D convolution; wider ones sum k 2-D convolutions.
  """
  n, t, y, xx, c = x.shape
  k = kernel.shape[0]
  if k == 1:
    return jnp.einsum("ntyxc,co->ntyxo", x, kernel[0, 0, 0])
  half = k // 2
  xp = jnp.pad(x, ((0, 0), (half, k - 1 - half), (0, 0), (0, 0), (0, 0)))
  dims = ("NHWC", "HWIO", "NHWC")
  if c < 8:
    stacked = jnp.concatenate([xp[:, d:d + t] for d in range(k)], axis=-1)
    w = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(k, k, k * c, kernel.shape[-1])
    out = jax.lax.conv_general_dilated(stacked.reshape(n * t, y, xx, k * c), w, (1, 1),
                                       "SAME", dimension_numbers=dims)
  else:
    out = sum(jax.lax.conv_general_dilated(xp[:, d:d + t].reshape(n * t, y, xx, c),
                                           kernel[d], (1, 1), "SAME", dimension_numbers=dims)
              for d in range(k))
  return out.reshape(n, t, y, xx, -1)


class Conv3D(nn.Module):
  """A 'SAME' 3-D convolution with bias; float32 params initialised as PyTorch's.

  Its parameters ('kernel' (k, k, k, in, out), 'bias') are those of `nn.Conv`.
  `impl`: 'xla' (native 3-D convolution), '2d' (see `conv3d_as_2d`), or 'auto' (2d on
  the CPU, native elsewhere).
  """

  features: int
  kernel_size: int = 3
  dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c = self.kernel_size, x.shape[-1]
    init = torch_uniform(c * k**3)
    kernel = self.param("kernel", init, (k, k, k, c, self.features), jnp.float32)
    bias = self.param("bias", init, (self.features,), jnp.float32)
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    impl = self.impl if self.impl != "auto" else (
        "2d" if jax.default_backend() == "cpu" else "xla")
    if impl == "2d":
      y = conv3d_as_2d(x, kernel)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME",
                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + bias


def conv(width: int, kernel: int, dtype: Any, impl: str, name: str) -> Conv3D:
  return Conv3D(width, kernel, dtype, impl, name=name)


class DoubleConv(nn.Module):
  """Two 3x3x3 conv + bias + ReLU layers."""

  mid: int
  out: int
  dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for name, width in (("conv1", self.mid), ("conv2", self.out)):
      x = nn.relu(conv(width, 3, self.dtype, self.impl, name)(x))
    return x


class UNet3D(nn.Module):
  """DeepCAD-RT network: `UNet3D(features=16)` has 1,020,337 parameters.

  `widths` gives every 3x3x3 conv its own number of output channels (`LAYERS` order,
  e.g. a pruned network); None means those of `features` (`uniform_widths`).
  `conv_impl` chooses how convolutions are computed ('auto', 'xla', '2d'; see `Conv3D`);
  the parameters and the result are the same either way.
  """

  features: int = 16
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  widths: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if min(x.shape[1:4]) < MIN_SIZE:
      raise UserError(
          f"UNet3D needs at least {MIN_SIZE} voxels on T, Y and X (three 2x poolings); "
          f"got an input of shape {tuple(x.shape)}: pad it or use a larger patch.")
    widths = dict(zip(LAYERS, self.widths or uniform_widths(self.features, x.shape[-1])))
    x = x.astype(self.dtype)
    skips = []
    for level in range(LEVELS):
      if level > 0:
        x = nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2), padding="VALID")
      name = f"encoder_{level}"
      x = DoubleConv(widths[(name, "conv1")], widths[(name, "conv2")], self.dtype,
                     self.conv_impl, name=name)(x)
      skips.append(x)
    for level in range(LEVELS - 2, -1, -1):
      skip = skips[level]
      x = upsample_nearest(x, skip.shape[1:4])
      x = jnp.concatenate([skip, x], axis=-1)
      name = f"decoder_{level}"
      x = DoubleConv(widths[(name, "conv1")], widths[(name, "conv2")], self.dtype,
                     self.conv_impl, name=name)(x)
    x = conv(1, 1, self.dtype, self.conv_impl, "final")(x)
    return x.astype(jnp.float32)


def init_params(features: int, key: int | jax.Array, in_channels: int = 1,
                widths: Sequence[int] | None = None) -> Any:
  """Initial float32 parameters for `UNet3D(features, widths=widths)`
  (shape-independent).

  An integer seed uses JAX's 'rbg' generator: XLA:CPU compiles threefry samplers for
  these 30 tensors in ~9 s, rbg in ~2 s.
  """
  if isinstance(key, int):
    key = jax.random.key(key, impl="rbg")
  dummy = jnp.zeros((1, 8, 8, 8, in_channels), jnp.float32)
  net = UNet3D(features, widths=None if widths is None else tuple(widths))
  return jax.jit(net.init)(key, dummy)["params"]


def network_input(frames: jax.Array, prior: jax.Array | None = None) -> jax.Array:
  """The network's (B, T, Y, X, C) input: the frames, and with a mean-image prior
  (B, Y, X) a second channel holding that image in every frame."""
  x = frames[..., None]
  if prior is None:
    return x
  return jnp.concatenate([x, jnp.broadcast_to(prior[:, None, :, :, None], x.shape)], -1)


def member(params: Any, m: int) -> Any:
  """Member `m` of an ensemble's stacked parameters."""
  return jax.tree_util.tree_map(lambda a: a[m], params)


def stack_members(members: Sequence[Any]) -> Any:
  """Parameters of several networks stacked on a leading member axis."""
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *members)


def over_members(fn: Any, members: int, impl: str, *stacked: Any) -> jax.Array:
  """fn(*args_m) for every member m of pytrees stacked on a leading axis -> (M, ...).

  'loop' runs the members one after another inside the compiled function; 'vmap'
  batches them, which turns every convolution into a grouped one: on XLA:CPU that was
  25x slower than the loop (f=8, 3 members, training step).
  """
  if impl == "vmap":
    return jax.vmap(fn)(*stacked)
  return jnp.stack([fn(*(member(a, m) for a in stacked)) for m in range(members)])


def ensemble_params(features: int, seed: int, members: int = 1,
                    in_channels: int = 1, widths: Sequence[int] | None = None) -> Any:
  """Initial parameters of `members` networks from seeds seed, seed+1, ...: a single
  network's when members == 1, else stacked on a leading member axis."""
  params = [init_params(features, seed + m, in_channels, widths) for m in range(members)]
  return params[0] if members == 1 else stack_members(params)


def param_count(params: Any) -> int:
  """Number of scalars in a parameter pytree."""
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def add_prior_channel(params: Any) -> Any:
  """The parameters of the same network with a second input channel (the mean-image
  prior) whose weights are zero: the function is unchanged until training moves them."""
  params = jax.tree_util.tree_map(np.asarray, params)
  first = dict(params["encoder_0"]["conv1"])
  pad = [(0, 0)] * first["kernel"].ndim
  pad[-2] = (0, 1)  # the input-channel axis of (..., k, k, k, in, out)
  first["kernel"] = np.pad(first["kernel"], pad)
  return {**params, "encoder_0": {**params["encoder_0"], "conv1": first}}


def add_output_offset(params: Any, offset: float) -> Any:
  """The parameters of the same network whose output is `offset` higher everywhere
  (in network units): the final 1x1x1 conv's bias moved by it, for every ensemble
  member (the brightness correction fitted on held-out frames, `score.py`)."""
  params = jax.tree_util.tree_map(np.asarray, params)
  final = dict(params["final"])
  final["bias"] = (final["bias"] + np.float32(offset)).astype(final["bias"].dtype)
  return {**params, "final": final}
