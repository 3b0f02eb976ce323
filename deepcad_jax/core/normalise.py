"""Intensities to network values and back: the one convention for training, inference,
streaming and benchmarks.

The network sees `(intensity - mean) / scale`, where `mean` is the training data's mean
intensity (or a movie's own) and `scale` DeepCAD-RT's `scale_factor` (1 by default); the
mean-image prior is normalised the same way. Its outputs map back with
`value * scale + mean`; a spread (a standard deviation) with `value * scale`. The
functions are plain arithmetic, so they serve numpy arrays on the host and traced arrays
inside compiled steps alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Normalisation:
  """The affine map between intensities and network values (see the module doc)."""

  mean: Any            # a float, or a 0-d array inside a compiled step
  scale: Any = 1.0

  def to_network(self, intensities: Any) -> Any:
    """(intensities - mean) / scale, in float32."""
    return (intensities.astype(np.float32) - self.mean) / self.scale

  def from_network(self, values: Any) -> Any:
    """values * scale + mean: network outputs (or inputs) as intensities."""
    return values * self.scale + self.mean

  def spread_from_network(self, values: Any) -> Any:
    """A standard deviation in network units, in intensity units."""
    return values * self.scale
