"""A held-out, self-supervised quality score for recordings without ground truth.

Training predicts odd frames from even frames (and, swapped, even from odd). The score
does the same on frames training never saw, without augmentation: the network is
applied to the even frames of a segment and its output compared with the odd frames,
and the other way round (odd frames predict the even frame before each),

  score = 1/2 [ mean (f(even) - odd)^2 + mean (f(odd) - even)^2 ].

Because the noise of a frame is independent of its neighbours', the expected score is
the mean squared error against the clean movie plus the noise variance, a constant of
the data: on one segment, a lower score is a model closer to the truth.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from deepcad_jax.data.movie import ArrayMovie, Movie, as_movie
from deepcad_jax.errors import UserError
from deepcad_jax.denoising.denoiser import Denoiser, as_denoiser

MIN_FRAMES = 16  # a segment gives two sub-movies of at least 8 frames


def parse_frames(text: str | None, n: int, name: str = "the movie") -> tuple[int, int]:
  """'a:b' (Python slice bounds, negative from the end; either may be empty) -> (a, b)
  within [0, n); None means all frames."""
  if text is None:
    return 0, n
  try:
    a, b = (t.strip() for t in str(text).split(":"))
    lo, hi, _ = slice(int(a) if a else None, int(b) if b else None).indices(n)
  except ValueError:
    raise UserError(f"--frames takes a range a:b of frames (e.g. 900:1000 or -100:); got "
                    f"{text!r}.") from None
  if hi - lo < MIN_FRAMES:
    raise UserError(f"--frames {text} selects {max(0, hi - lo)} frames of {name} ({n} "
                    f"frames); the score needs at least {MIN_FRAMES}.")
  return lo, hi


def holdout_range(n: int, holdout: float | str) -> tuple[int, int] | None:
  """The frames held out of training: the last `holdout` fraction (a float in (0, 1)) or
  an explicit range 'a:b'; None when nothing is held out (0)."""
  if isinstance(holdout, str):
    return parse_frames(holdout, n)
  if not holdout:
    return None
  count = int(round(n * float(holdout)))
  if count < MIN_FRAMES or n - count < MIN_FRAMES:
    raise UserError(f"holding out {holdout:g} of {n} frames leaves {count} for the score "
                    f"and {n - count} for training; each needs at least {MIN_FRAMES} (use "
                    "a longer movie or another --holdout).")
  return n - count, n


@dataclasses.dataclass
class Score:
  score: float             # the mean of the two directions
  even_to_odd: float
  odd_to_even: float
  frames: tuple[int, int]
  movie: str

  def describe(self, model: str = "the model") -> str:
    """The score in a line for the command line."""
    return (f"held-out score of {model} on {self.movie} frames {self.frames[0]}:"
            f"{self.frames[1]}: {self.score:.6g} (even -> odd {self.even_to_odd:.6g}, "
            f"odd -> even {self.odd_to_even:.6g}); lower is closer to the truth, for "
            "this movie only")


def score(denoiser: Denoiser | Any, movie: Movie | np.ndarray | str,
          frames: tuple[int, int] | None = None, mean: float | None = None) -> Score:
  """The held-out score of a model (a `Denoiser`, `Model` or model path) on frames
  [a, b) of `movie` (default: all of it). `mean` normalises as training did (default:
  the segment's mean)."""
  den = as_denoiser(denoiser)
  movie = as_movie(movie)
  a, b = frames or (0, movie.shape[0])
  if b - a < MIN_FRAMES:
    raise UserError(f"{movie.name}: frames {a}:{b} are too few for the score (at least "
                    f"{MIN_FRAMES}).")
  segment = movie.read(a, b).astype(np.float32)
  even, odd = segment[0::2], segment[1::2]
  n = min(len(even), len(odd))
  even, odd = even[:n], odd[:n]
  mean = float(segment.mean()) if mean is None else float(mean)
  parts = []
  for source, target in ((even, odd), (odd, even)):
    out = np.concatenate([f.data for f in den.frames(ArrayMovie(source, movie.name),
                                                       mean=mean)])
    parts.append(float(np.mean((out.astype(np.float64) - target) ** 2)))
  return Score(float(np.mean(parts)), parts[0], parts[1], (a, b), movie.name)


def scores(denoiser: Denoiser, movies: Sequence[Movie], segments: Sequence[tuple[int, int]],
           means: Sequence[float] | None = None) -> float:
  """The held-out score over several movies' segments, weighted by their frames."""
  total, weight = 0.0, 0
  for i, (m, seg) in enumerate(zip(movies, segments)):
    s = score(denoiser, m, seg, None if means is None else means[i])
    total += s.score * (seg[1] - seg[0])
    weight += seg[1] - seg[0]
  return total / max(1, weight)
