"""Pair augmentation on the device: swap x the 8 symmetries of the (y, x) square.

Symmetry `s` in [0, 8) flips X when s >= 4, then rotates by (s % 4) * 90 degrees in the
(y, x) plane. With square patches all 8 apply (16 variants with the swap); a non-square
patch keeps its shape only under the 4 symmetries {0, 2, 4, 6}, so it gets 8 variants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepcad_jax.config import PLANE_SYMMETRIES

N_SYMMETRIES = PLANE_SYMMETRIES
SHAPE_PRESERVING = (0, 2, 4, 6)  # identity, rot180, flip, flip+rot180


def apply_symmetry(x: jax.Array, s: int) -> jax.Array:
  """Symmetry `s` (a Python int) on the last two axes (Y, X)."""
  if s >= 4:
    x = jnp.flip(x, axis=-1)
  return jnp.rot90(x, s % 4, axes=(-2, -1))


def invert_symmetry(x: jax.Array, s: int) -> jax.Array:
  """The inverse of `apply_symmetry(., s)`."""
  x = jnp.rot90(x, -(s % 4), axes=(-2, -1))
  if s >= 4:
    x = jnp.flip(x, axis=-1)
  return x


def symmetries_for(shape) -> tuple[int, ...]:
  """The symmetries that keep a (..., Y, X) shape."""
  return tuple(range(N_SYMMETRIES)) if shape[-1] == shape[-2] else SHAPE_PRESERVING


def variant(x: jax.Array, y: jax.Array, v: jax.Array, prior: jax.Array | None = None
            ) -> tuple[jax.Array, ...]:
  """Variant `v` (traced int in [0, 2 * n_symmetries)) of one pair; a mean-image
  `prior` (Y, X) gets the same symmetry (the swap does not concern it)."""
  syms = symmetries_for(x.shape)
  s_index = v % len(syms)
  swap = v >= len(syms)
  branches = [lambda a, s=s: apply_symmetry(a, s) for s in syms]
  x, y = (jax.lax.switch(s_index, branches, a) for a in (x, y))
  x, y = jnp.where(swap, y, x), jnp.where(swap, x, y)
  if prior is None:
    return x, y
  return x, y, jax.lax.switch(s_index, branches, prior)


def augment_pair(key: jax.Array, x: jax.Array, y: jax.Array,
                 prior: jax.Array | None = None) -> tuple[jax.Array, ...]:
  """One random variant of the pair (x, y): (T, Y, X) each (and of its prior)."""
  v = jax.random.randint(key, (), 0, 2 * len(symmetries_for(x.shape)))
  return variant(x, y, v, prior)


def augment_batch(key: jax.Array, x: jax.Array, y: jax.Array,
                  prior: jax.Array | None = None) -> tuple[jax.Array, ...]:
  """An independent random variant for every pair of a (B, T, Y, X) batch (and of
  its (B, Y, X) priors)."""
  keys = jax.random.split(key, x.shape[0])
  return jax.vmap(augment_pair)(keys, x, y, prior)
