"""The per-movie brightness correction (`denoising/brightness.py`): the smoothing, the
cross-validated choice, and pass two's conversion."""

import numpy as np
import pytest

from deepcad_jax import UserError
from deepcad_jax.data.movie import ArrayMovie
from deepcad_jax.denoising import brightness
from deepcad_jax.denoising.outputs import DenoiseStats


def test_blur_keeps_a_constant_and_the_mean_and_spreads_a_point_by_sigma():
  assert np.allclose(brightness.gaussian_blur(np.full((9, 13), 3.5), 2.0), 3.5)
  rng = np.random.default_rng(0)
  image = rng.normal(size=(20, 24))
  assert brightness.gaussian_blur(image, 3.0).mean() == pytest.approx(image.mean())
  point = np.zeros((41, 41))
  point[20, 20] = 1
  out = brightness.gaussian_blur(point, 2.0)
  profile = out[20] / out[20].sum()
  x = np.arange(41) - 20
  assert np.sqrt((profile * x ** 2).sum()) == pytest.approx(2.0, rel=0.02)
  # a kernel wider than the image mirrors it again (no error, mean kept)
  assert brightness.gaussian_blur(image, 16.0).mean() == pytest.approx(image.mean())


def _measure(raw: np.ndarray, den: np.ndarray, block: int = 8) -> brightness.Correction:
  m = brightness.Measure(ArrayMovie(raw), block)
  for t in range(0, len(den), 10):  # blocks of another length than the sets'
    m.add(den[t:t + 10])
  return m.fit()


def _bump(shape, amplitude, sigma, centre):
  y, x = np.mgrid[:shape[0], :shape[1]]
  return amplitude * np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / (2 * sigma ** 2))


def test_a_smooth_regional_bias_is_found_and_taken_out():
  """A denoiser whose output misses a smooth patch of brightness: the correction
  recovers it from the noisy raw movie alone, and the corrected mean image is much
  closer to the truth than the uncorrected one."""
  rng = np.random.default_rng(1)
  t, shape = 96, (32, 32)
  truth = 5 + _bump(shape, 4.0, 3.0, (10, 20)) + rng.uniform(0, 1, size=(t,) + shape)
  raw = rng.poisson(truth).astype(np.float32)
  bias = -_bump(shape, 1.5, 4.0, (20, 10))
  den = (truth + bias).astype(np.float32)
  c = _measure(raw, den)
  assert c.choice.startswith("sigma")
  assert set(c.scores) >= {"none", "global", "sigma 1 px", "sigma 8 px"}
  assert c.scores[c.choice] == min(c.scores.values())
  before = np.abs(den.mean(0) - truth.mean(0)).mean()
  after = np.abs(den.mean(0) + c.field - truth.mean(0)).mean()
  assert after < 0.3 * before
  assert c.field.dtype == np.float32 and c.field.shape == shape


def test_an_unbiased_denoiser_gets_no_regional_field():
  """When the denoised movie's mean image already is the truth's, the noisy raw mean
  only adds noise: the cross-validation picks no correction or one global offset."""
  rng = np.random.default_rng(2)
  truth = np.broadcast_to(2 + _bump((24, 24), 3.0, 4.0, (12, 12)), (128, 24, 24))
  raw = rng.poisson(truth).astype(np.float32)
  c = _measure(raw, truth.astype(np.float32))
  assert c.choice in ("none", "global")
  assert np.abs(c.field).max() < 0.1


def test_a_short_movie_gets_one_global_offset():
  raw = np.full((12, 16, 16), 10.0, np.float32)
  c = _measure(raw, np.full_like(raw, 9.0))
  assert c.choice == "global" and np.allclose(c.field, 1.0)
  assert "one offset" in c.describe()


def test_pass_two_moves_frames_and_samples_but_not_the_std_and_counts_rounding():
  field = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
  c = brightness.Correction(field, "sigma 1 px", {}, 10.0)
  block = np.zeros((2, 3, 4, 4), np.float32)  # mean, std, two samples
  block[..., 1] = 0.5
  stats = DenoiseStats()
  (data, extras), = brightness.correct(iter([block]), c, np.float32, stats)
  assert np.allclose(data, field) and np.allclose(extras[..., 0], 0.5)
  assert np.allclose(extras[..., 1:], field[..., None])
  (data, _), = brightness.correct(iter([block[..., 0] + 100.4]), c, np.uint16, stats)
  assert data.dtype == np.uint16 and stats.rounded == data.size and stats.rounding_sq > 0


def test_an_unknown_mode_is_one_sentence():
  with pytest.raises(UserError, match="--brightness takes regional"):
    brightness.check_mode("local")
