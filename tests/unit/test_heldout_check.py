"""The calibrated uncertainty's held-out check (analysis.uncertainty.heldout), bias split
(.bootstrap) and segments (.files), on hand-made arrays."""

import numpy as np
import pytest

from deepcad_jax.analysis.uncertainty.bootstrap import Deviations
from deepcad_jax.analysis.uncertainty.files import segment_spans
from deepcad_jax.analysis.uncertainty.heldout import (bin_scales, box_mean, heldout_check,
                                                      pair_probe, scale_deviation)


def test_box_mean_is_the_mean_over_the_square_with_edges_repeated():
  x = np.random.default_rng(0).normal(size=(2, 16, 18))
  out = box_mean(x, 5)
  assert out[1, 7, 9] == pytest.approx(x[1, 5:10, 7:12].mean())
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2)), mode="edge")
  assert out[0, 0, 0] == pytest.approx(padded[0, :5, :5].mean())
  np.testing.assert_allclose(box_mean(x, 1), x)


def test_pair_probe_puts_the_line_between_the_neighbours_in_place_of_each_pair():
  raw = np.arange(32, dtype=np.float32)[:, None, None] ** 2 * np.ones((1, 4, 4), np.float32)
  probe, held = pair_probe(raw, 8)
  assert list(held) == [4, 12, 20, 28]
  np.testing.assert_allclose(probe[4], (2 * raw[3] + raw[6]) / 3)
  np.testing.assert_allclose(probe[5], (raw[3] + 2 * raw[6]) / 3)
  untouched = np.setdiff1d(np.arange(32), np.r_[held, held + 1])
  np.testing.assert_array_equal(probe[untouched], raw[untouched])


def _case(seed=0):
  """A movie whose estimate errs by a fixed, spatially smooth field: the check must
  find that field's box-mean variance from the raw frames' noise alone."""
  rng = np.random.default_rng(seed)
  t, y, x = 64, 32, 32
  clean = np.ones((t, y, x)) + np.linspace(0, 1, x)[None, None] * rng.random((t, 1, 1))
  field = np.kron(rng.normal(0, 0.5, (y // 4, x // 4)), np.ones((4, 4)))
  est = clean + field[None]
  raw = (clean + rng.normal(0, 1, clean.shape)).astype(np.float32)
  held = pair_probe(raw, 8)[1]
  truth = float((box_mean(field, 4) ** 2).mean())
  return raw, est, held, truth


def test_heldout_check_finds_the_box_error_with_no_noise_model_and_scales_the_bootstrap():
  raw, est, held, truth = _case()
  boot = np.full((2 * len(held),) + raw.shape[1:], truth / 4)
  rows = heldout_check(raw, est, est, held, boot, 4, 2)
  assert rows[-1]["heldout_error_var"] == pytest.approx(truth, rel=0.1)
  assert rows[-1]["scale"] == pytest.approx(2.0, rel=0.1)
  assert "scaled" in rows[-1]["verdict"] and len(rows) == 3
  level = bin_scales(est, rows, 4)
  assert level.shape == raw.shape[1:] and set(np.unique(level)) <= {
      np.float32(r["scale"]) for r in rows[:-1]}


def test_heldout_check_leaves_a_bootstrap_it_cannot_tell_apart():
  raw, est, held, truth = _case(1)
  boot = np.full((2 * len(held),) + raw.shape[1:], truth)
  rows = heldout_check(raw, est, est, held, boot, 4, 2)
  assert all(r["scale"] == 1.0 and r["verdict"].startswith("consistent") for r in rows)


def test_scaling_a_deviation_scales_its_box_mean_and_keeps_the_finer_rest():
  dev = np.random.default_rng(2).normal(size=(4, 12, 12)).astype(np.float32)
  level = np.full((12, 12), 0.5, np.float32)
  np.testing.assert_allclose(scale_deviation(dev, level, 3), dev - 0.5 * box_mean(dev, 3),
                             atol=1e-6)
  np.testing.assert_allclose(scale_deviation(dev, np.ones((12, 12), np.float32), 3), dev,
                             atol=1e-6)


def _deviations(mean_field, sigma=1.0, draws=8, seed=3):
  """Bootstrap deviations d_k = mean_field + white noise of std `sigma`, summed."""
  rng = np.random.default_rng(seed)
  devs = (mean_field[None] + rng.normal(0, sigma, (draws,) + mean_field.shape)
          ).astype(np.float32)
  moments = Deviations(3)
  for d in devs:
    moments.add(d)
  return moments, devs


def test_adjusted_sums_are_the_sums_over_the_adjusted_deviations():
  rng = np.random.default_rng(4)
  moments, devs = _deviations(rng.normal(0, 1, (6, 12, 12)))
  gain = rng.random((6, 12, 12)).astype(np.float32)
  adj = np.stack([moments.adjust(d, gain, True) for d in devs]).astype(np.float64)
  square, cross, low = moments.adjusted(gain, True)
  np.testing.assert_allclose(square, (adj ** 2).sum(0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(cross, (adj * box_mean(adj, 3)).sum(0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(low, (box_mean(adj, 3) ** 2).sum(0), rtol=1e-4, atol=1e-4)
  # without the split the deviations and their sums stay as drawn
  np.testing.assert_array_equal(moments.adjust(devs[0], gain, False), devs[0])
  assert moments.adjusted(gain, False)[0] is moments.square


def test_bias_split_drops_the_own_error_the_network_takes_out_again():
  """A mean deviation that is all own error (as large as `removed` says) is dropped: the
  draws' spread is left. One that is bias (nothing removed) is kept whole."""
  field = np.full((8, 16, 16), 2.0)
  moments, _ = _deviations(field, sigma=1.0, draws=8)
  removed = np.full(field.shape, 4.0, np.float32)
  gain = moments.bias_gain(removed)
  assert moments.summary(gain, removed)["bias_sq"] < 0.1 * 4.0  # of a mean square of 4
  square = moments.adjusted(gain, True)[0] / moments.n
  # the spread alone (and the little that clipping the bias^2 estimate at zero keeps of
  # its sampling noise), not spread + mean^2 = 5
  assert float(square.mean()) == pytest.approx(1.0, abs=0.2)
  gain = moments.bias_gain(np.zeros(field.shape, np.float32))
  assert float(gain.mean()) > 0.95
  square = moments.adjusted(gain, True)[0] / moments.n
  assert float(square.mean()) == pytest.approx(1.0 + 4.0, rel=0.1)  # spread + bias^2
  summary = moments.summary(gain, np.zeros(field.shape, np.float32))
  assert summary["bias_sq"] == pytest.approx(4.0, rel=0.1)
  assert summary["spread"] == pytest.approx(1.0, rel=0.1)


def test_segment_spans_cover_the_frames_in_the_fewest_that_fit():
  # fits whole in half the available memory: one span
  assert segment_spans(100, 10.0, 5, 10_000, 12) == [(0, 100)]
  assert segment_spans(100, 10.0, 5, None, 12) == [(0, 100)]
  # 500 bytes for a segment: 50 frames read, 40 written, so 3 spans of equal length
  assert segment_spans(100, 10.0, 5, 1000, 12) == [(0, 33), (33, 67), (67, 100)]
  assert segment_spans(100, 10.0, 5, 10_000, 12, segment_frames=25) == [
      (0, 25), (25, 50), (50, 75), (75, 100)]
  # not even the shortest segment and its margins fit
  assert segment_spans(100, 10.0, 5, 300, 12) is None
