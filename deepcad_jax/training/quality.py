"""What training measures of its own model: the held-out quality every epoch
(`analysis.score`), each training movie's noise model, and the brightness offset stored
with the final model."""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import numpy as np

from deepcad_jax.analysis import noise as noise_lib
from deepcad_jax.analysis.score import HeldOutScorer, Score
from deepcad_jax.data.movie import ArrayMovie
from deepcad_jax.denoising.denoiser import Denoiser
from deepcad_jax.errors import UserError
from deepcad_jax.model_io import checkpoint as ckpt
from deepcad_jax.training.pairs import PairSource

log = logging.getLogger("deepcad_jax")

NOISE_FIT_FRAMES = 1000  # frames of each training movie its noise model is fitted on
FINAL_CHECK_FRAMES = 200  # without held-out frames: the training frames checked at the end
BRIGHTNESS_SEGMENTS, BRIGHTNESS_FRAMES = 4, 64  # where the final brightness offset is fit
BRIGHTNESS_CONTEXT_PATCHES = 2  # frames denoised around each segment, in training patches


def holdout_scorer(meta: ckpt.RunMeta, source: PairSource, final_check: bool = False
                    ) -> Callable[[Any], Score] | None:
  """params -> the held-out quality over every movie's held-out frames (`score.py`),
  each movie normalised as in training. Without held-out frames: None, or with
  `final_check` the last frames of the first movie (seen in training, so optimistic;
  it still names a collapsed model). The predict step compiles once; each call only
  swaps parameters."""
  rows = [(m, h, mean, scale) for m, h, mean, scale in
          zip(source.movies, source.holdout, source.means, source.scales) if h is not None]
  if not rows:
    if not final_check:
      return None
    m = source.movies[0]
    t = m.shape[0]
    rows = [(m, (max(0, t - FINAL_CHECK_FRAMES), t), source.means[0], source.scales[0])]
  scorer = HeldOutScorer(*zip(*rows))
  model = ckpt.Model(params=None, meta=meta, source="training")
  compiled: list[Denoiser] = []  # the first step's denoiser; later ones share its steps

  def score(params) -> Score:
    host = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    if compiled:
      den = compiled[0].with_params(host)
    else:
      den = Denoiser(model.with_params(host), tiling="exact", devices=jax.local_devices())
      compiled.append(den)
    return scorer(den)
  return score


def brightness_offset(meta: ckpt.RunMeta, source: PairSource, params: Any) -> float:
  """How much the denoised movie is darker than the raw one, in network units: the
  mean of (raw - denoised) / scale over segments spread evenly over every training
  movie, each denoised as `denoise` does (exact tiling), with `context_frames` of the
  movie on either side that are denoised but not counted: a frame near the end of what
  is denoised sees less of its neighbours, and at a fraction of a photon per voxel its
  output mean differs by several percent (a 64-frame segment alone read 2.5% darker
  than the same frames of the whole movie). A short movie is denoised whole. The noise
  averages out of the raw mean, so this is the network's bias; a model adds it to its
  output when loaded (`RunMeta.output_offset`), and keeps the brightness of the
  recording (a short run does not pin its output's mean by itself)."""
  host = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
  den = Denoiser(ckpt.Model(host, meta, "training"), tiling="exact",
                 devices=jax.local_devices())
  context = context_frames(meta)
  total, count = 0.0, 0
  for m, mean, scale in zip(source.movies, source.means, source.scales):
    t = m.shape[0]
    for a, b in spread_segments(t, BRIGHTNESS_SEGMENTS, BRIGHTNESS_FRAMES, context):
      lo, hi = max(0, a - context), min(t, b + context)
      raw = m.read(lo, hi).astype(np.float64)
      out = np.concatenate([f.data for f in den.frames(
          ArrayMovie(raw.astype(np.float32), m.name), mean=mean, scale=scale)])
      kept = slice(a - lo, b - lo)
      total += float((raw[kept] - out[kept]).sum()) / scale
      count += raw[kept].size
  return total / max(count, 1)


def context_frames(meta: ckpt.RunMeta) -> int:
  """Frames denoised on either side of a brightness segment but not counted: two
  training patches' length in time."""
  return BRIGHTNESS_CONTEXT_PATCHES * int(meta.config.data.patch[0])


def spread_segments(frames: int, count: int, length: int, context: int = 0
                    ) -> list[tuple[int, int]]:
  """Up to `count` segments of `length` frames spread evenly over `frames`; one
  segment of all frames when the segments with `context` frames on either side would
  cover about as much as the movie."""
  if frames <= count * (length + 2 * context):
    return [(0, frames)]
  starts = np.linspace(0, frames - length, count).round().astype(int)
  return [(int(a), int(a) + length) for a in starts]


def noise_models(source: PairSource) -> tuple[dict, ...]:
  """Each training movie's noise model (on its first NOISE_FIT_FRAMES frames)."""
  fits = []
  for m in source.movies:
    frames = (0, min(m.shape[0], NOISE_FIT_FRAMES))
    try:
      nm = noise_lib.fit_movie(m, frames)
    except UserError as e:  # a movie with no frame-to-frame variation: nothing to learn
      log.warning("%s", e)
      continue
    log.info("%s", nm.describe())
    fits.append(nm.to_json())
  return tuple(fits)


def check_frames(source: PairSource) -> tuple[int, int]:
  """The frames the final check scores when nothing is held out."""
  t = source.movies[0].shape[0]
  return max(0, t - FINAL_CHECK_FRAMES), t
