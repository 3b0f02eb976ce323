import itertools

import jax
import jax.numpy as jnp
import numpy as np

from deepcad_jax.core.augment import (apply_symmetry, augment_batch, invert_symmetry,
                                      symmetries_for, variant)


def _pair(shape=(4, 6, 6)):
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  return x, -x - 1


def _which_variant(x, y, ox, oy):
  """(swap, symmetry) that maps the original pair (x, y) to (ox, oy)."""
  for swap, s in itertools.product((False, True), symmetries_for(x.shape)):
    a, b = (y, x) if swap else (x, y)
    if jnp.array_equal(apply_symmetry(a, s), ox) and jnp.array_equal(apply_symmetry(b, s), oy):
      return swap, s
  return None


def test_every_variant_is_a_symmetry_and_inverts():
  x, y = _pair()
  for v in range(16):
    ox, oy = variant(x, y, jnp.int32(v))
    swap, s = _which_variant(x, y, ox, oy)
    a, b = invert_symmetry(ox, s), invert_symmetry(oy, s)
    if swap:
      a, b = b, a
    assert jnp.array_equal(a, x) and jnp.array_equal(b, y)


def test_the_eight_symmetries_are_distinct():
  x, _ = _pair()
  images = {np.asarray(apply_symmetry(x, s)).tobytes() for s in range(8)}
  assert len(images) == 8


def test_all_16_variants_occur_under_jit():
  x, y = _pair()
  n = 256
  xs, ys = jnp.broadcast_to(x, (n,) + x.shape), jnp.broadcast_to(y, (n,) + y.shape)
  ox, oy = jax.jit(augment_batch)(jax.random.key(0), xs, ys)
  seen = {_which_variant(x, y, ox[i], oy[i]) for i in range(n)}
  assert None not in seen and len(seen) == 16


def test_non_square_patches_keep_their_shape():
  x, y = _pair((4, 6, 8))
  n = 128
  xs, ys = jnp.broadcast_to(x, (n,) + x.shape), jnp.broadcast_to(y, (n,) + y.shape)
  ox, oy = augment_batch(jax.random.key(1), xs, ys)
  assert ox.shape == xs.shape
  seen = {_which_variant(x, y, ox[i], oy[i]) for i in range(n)}
  assert None not in seen and len(seen) == 8


def test_augmentation_is_reproducible_from_the_key():
  x, y = _pair()
  xs, ys = jnp.stack([x] * 8), jnp.stack([y] * 8)
  a = augment_batch(jax.random.key(3), xs, ys)
  b = augment_batch(jax.random.key(3), xs, ys)
  assert all(jnp.array_equal(p, q) for p, q in zip(a, b))
