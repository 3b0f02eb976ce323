import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepcad_jax import UNet3D, UserError
from deepcad_jax.core.network import LADDER, init_params, param_count, upsample_nearest


@pytest.mark.parametrize("features,count", [(16, 1_020_337), (64, 16_315_585)])
def test_parameter_counts(features, count):
  params = jax.eval_shape(lambda: init_params(features, jax.random.key(0)))
  assert param_count(params) == count


def test_ladder_is_monotone():
  counts = [param_count(jax.eval_shape(lambda f=f: init_params(f, jax.random.key(0))))
            for f in LADDER]
  assert counts == sorted(counts, reverse=True) and LADDER == (64, 48, 32, 24, 16, 12, 8)


def test_params_are_float32():
  params = init_params(4, 0)
  assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {np.dtype(np.float32)}


@pytest.mark.parametrize("shape", [(8, 8, 8), (9, 17, 23), (16, 33, 20), (13, 8, 31)])
def test_output_shape_equals_input_shape(shape):
  params = init_params(4, 0)
  x = jnp.ones((2,) + shape + (1,))
  y = jax.jit(UNet3D(4).apply)({"params": params}, x)
  assert y.shape == x.shape and y.dtype == jnp.float32


def test_too_small_input_is_a_clear_error():
  params = init_params(4, 0)
  with pytest.raises(UserError, match="at least 8"):
    UNet3D(4).apply({"params": params}, jnp.ones((1, 7, 16, 16, 1)))


def test_nearest_upsampling_matches_pytorch_rule():
  x = jnp.arange(5.0).reshape(1, 5, 1, 1, 1)
  y = upsample_nearest(x, (11, 1, 1))
  expected = np.floor(np.arange(11) * 5 / 11)  # PyTorch 'nearest': floor(i * in / out)
  np.testing.assert_array_equal(np.asarray(y).ravel(), expected)


def test_gradient_reaches_every_parameter():
  params = init_params(4, 0)
  x = jax.random.normal(jax.random.key(1), (1, 16, 16, 16, 1))
  grads = jax.jit(jax.grad(lambda p: jnp.mean(UNet3D(4).apply({"params": p}, x) ** 2)))(params)
  norms = [float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grads)]
  assert all(n > 0 for n in norms)


def test_bfloat16_compute_is_close_to_float32():
  params = init_params(4, 0)
  x = jax.random.normal(jax.random.key(1), (1, 16, 16, 16, 1))
  y32 = jax.jit(UNet3D(4).apply)({"params": params}, x)
  y16 = jax.jit(UNet3D(4, dtype=jnp.bfloat16).apply)({"params": params}, x)
  assert y16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(y32 - y16))) < 0.05 * float(jnp.max(jnp.abs(y32))) + 1e-3


@pytest.mark.parametrize("shape", [(9, 17, 23), (16, 16, 16)])
def test_conv_implementations_agree(shape):
  params = init_params(4, 0)
  x = jax.random.normal(jax.random.key(2), (2,) + shape + (1,))
  native = jax.jit(UNet3D(4, conv_impl="xla").apply)({"params": params}, x)
  as_2d = jax.jit(UNet3D(4, conv_impl="2d").apply)({"params": params}, x)
  np.testing.assert_allclose(native, as_2d, rtol=1e-4, atol=1e-5)
  g = [jax.jit(jax.grad(lambda p, impl=impl: jnp.sum(
      UNet3D(4, conv_impl=impl).apply({"params": p}, x) ** 2)))(params)
       for impl in ("xla", "2d")]
  for a, b in zip(jax.tree_util.tree_leaves(g[0]), jax.tree_util.tree_leaves(g[1])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("n_in,n_out", [(18, 37), (37, 75), (5, 11), (4, 8), (3, 7),
                                        (7, 10), (9, 19)])
def test_nearest_upsampling_every_size_matches_the_rule(n_in, n_out):
  x = jnp.arange(float(n_in)).reshape(1, n_in, 1, 1, 1)
  y = upsample_nearest(x, (n_out, 1, 1))
  np.testing.assert_array_equal(np.asarray(y).ravel(), np.floor(np.arange(n_out) * n_in / n_out))
