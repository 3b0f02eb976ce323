"""The training loss: one definition for the train step and for pruning's Taylor
criterion (which ranks channels by the gradient of the same loss).

"l2", the default, is the mean squared error: its minimiser is the conditional mean of
the target, so the denoised movie keeps the recording's brightness (the noise of the
target frame averages out). "deepcad" is DeepCAD-RT's 0.5 L1 + 0.5 L2, kept to
reproduce it: its L1 half pulls towards the conditional median, which for photon counts
lies below the mean, so at about one photon per voxel the denoised movie comes out
darker than the raw one (benchmarks/brightness.py measures by how much).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def l2_loss(output: jax.Array, target: jax.Array) -> jax.Array:
  """mean (output - target)^2."""
  d = output - target
  return jnp.mean(d * d)


def deepcad_loss(output: jax.Array, target: jax.Array) -> jax.Array:
  """0.5 * mean |output - target| + 0.5 * mean (output - target)^2, as DeepCAD-RT."""
  d = output - target
  return 0.5 * jnp.mean(jnp.abs(d)) + 0.5 * jnp.mean(d * d)


LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "l2": l2_loss, "deepcad": deepcad_loss}


def loss_fn(output: jax.Array, target: jax.Array, name: str = "l2") -> jax.Array:
  """The loss `name` (a key of LOSSES) of `output` against `target`."""
  return LOSSES[name](output, target)
