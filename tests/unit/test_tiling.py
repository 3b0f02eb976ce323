import numpy as np
from hypothesis import given, settings, strategies as st

from deepcad_jax.denoising.tiling import axis_plan, padded_patch, patch_plan


def test_reference_protocol_has_75_patches():
  # The paper's timing: 490x490x300 (x-y-t) with 150^3 patches and overlap 0.4.
  assert len(patch_plan((300, 490, 490), (150, 150, 150), 0.4)) == 75
  tiles = axis_plan(490, 150, 0.4)
  assert [t.start for t in tiles] == [0, 90, 180, 270, 340]  # last aligned to the end


def test_kept_regions_drop_half_the_overlap():
  tiles = axis_plan(490, 150, 0.4)  # gap 90, cut 30
  assert [(t.keep_lo, t.keep_hi) for t in tiles] == [
      (0, 120), (120, 210), (210, 300), (300, 390), (390, 490)]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 400), p=st.integers(1, 160), overlap=st.floats(0, 0.95))
def test_every_voxel_is_kept_exactly_once_per_axis(n, p, overlap):
  tiles = axis_plan(n, p, overlap)
  count = np.zeros(n, int)
  for t in tiles:
    assert 0 <= t.start and (t.start + p <= n or len(tiles) == 1)
    assert t.start <= t.keep_lo < t.keep_hi <= min(n, t.start + p)
    count[t.keep_lo:t.keep_hi] += 1
  assert (count == 1).all()


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40)),
       patch=st.tuples(st.integers(8, 24), st.integers(8, 24), st.integers(8, 24)),
       overlap=st.floats(0, 0.9))
def test_every_voxel_is_kept_exactly_once_in_3d(shape, patch, overlap):
  eff, padded = padded_patch(shape, patch)
  count = np.zeros(padded, int)
  for p in patch_plan(padded, eff, overlap):
    (a, b), (c, d), (e, f) = p.keep
    count[a:b, c:d, e:f] += 1
  assert (count == 1).all()
  assert all(n <= s for n, s in zip(shape, padded))
  assert all(e % 8 == 0 or e == p for e, p in zip(eff, patch))
