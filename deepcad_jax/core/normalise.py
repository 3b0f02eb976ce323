"""Intensities to network values and back: the one convention for training, inference,
streaming and benchmarks.

The network sees `(intensity - mean) / scale`. By default (`data.normalise = "spread"`)
both come from the movie itself: its mean intensity, and a robust spread of its
intensities (`Movie.spread`: the standard deviation of its voxels clipped to their 0.1
and 99.9 percentiles). A recording stored with another gain or offset (another
detector setting, another ADC) then gives the same network values, so training does not
depend on the recording's units and a learning rate tuned once fits every recording.
The model records the training data's mean and spread (`RunMeta.mean`, `RunMeta.scale`)
for streams, which cannot see a whole movie first.

`normalise = "fixed"` divides by `data.scale` instead, whatever the movie: DeepCAD-RT's
`scale_factor`, kept for imported models and for reproducing it. Outputs map back with
`value * scale + mean`; a spread (a standard deviation) with `value * scale`. The
methods are plain arithmetic, so they serve numpy arrays on the host and traced arrays
inside compiled steps alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from deepcad_jax.errors import UserError

MODES = ("spread", "fixed")


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


def movie_scale(movie: Any, mode: str, fixed: float) -> float:
  """The scale a movie is divided by under `mode`: its robust spread ('spread'; 1 for
  a constant movie, which has nothing to learn), or `fixed`."""
  if mode == "fixed":
    return float(fixed)
  if mode != "spread":
    raise UserError(f"data.normalise must be one of {MODES}; got {mode!r}.")
  spread = movie.spread()
  return spread if spread > 0 and np.isfinite(spread) else 1.0


def for_movie(movie: Any, mode: str, fixed: float, mean: float | None = None,
              scale: float | None = None) -> Normalisation:
  """The normalisation of `movie` (a `data.movie.Movie`): its own mean and, under
  'spread', its own spread. A `scale` given is used as it is; a `mean` given (a
  model's recorded one, a stream's) comes with the model's scale `fixed`, since the
  movie's own spread goes with its own mean."""
  m = movie.mean() if mean is None else float(mean)
  if scale is not None:
    s = float(scale)
  else:
    s = movie_scale(movie, mode, fixed) if mean is None else float(fixed)
  if not (np.isfinite(m) and np.isfinite(s) and s > 0):
    raise UserError(f"cannot normalise {movie.name} with mean {m} and scale {s}: both must "
                    "be finite and the scale positive.")
  return Normalisation(np.float32(m), np.float32(s))
