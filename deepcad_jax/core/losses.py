"""The training loss: one definition for the train step and for pruning's Taylor
criterion (which ranks channels by the gradient of the same loss)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def loss_fn(output: jax.Array, target: jax.Array) -> jax.Array:
  """0.5 * mean |output - target| + 0.5 * mean (output - target)^2, as the reference."""
  d = output - target
  return 0.5 * jnp.mean(jnp.abs(d)) + 0.5 * jnp.mean(d * d)
