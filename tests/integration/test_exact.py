"""Exact tiling: tiled output == one forward pass over the whole (padded) movie.

The networks are f=4 with weights doubled, so that the signal reaches the deepest level
and back (with PyTorch's small initial weights it fades, and tiling errors would hide).
These tests use one device unless they say otherwise, so they also run on a GPU
(`benchmarks/gpu_suite.sh`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepcad_jax import config as config_lib
from deepcad_jax import Denoiser, UserError, denoise
from deepcad_jax.model_io.checkpoint import Model
from deepcad_jax.denoising.denoiser import denoise_with, whole_movie_forward
from deepcad_jax.core.network import UNet3D, init_params
from deepcad_jax.denoising.step import tile_network
from deepcad_jax.denoising.tiling import (HALO, exact_halo, exact_plan, overlap_plan,
                                          reach_by_residue)


def scaled_model(features=4, scale=2.0, prior=False, members=1):
  cfg = config_lib.from_dict({"model": {"features": features, "mean_prior": prior,
                                        "ensemble": members},
                              "infer": {"patch": [16, 32, 32], "overlap": 0.25}})
  params = [jax.tree_util.tree_map(lambda a: np.asarray(a) * scale,
                                   init_params(features, m, 2 if prior else 1))
            for m in range(members)]
  if members > 1:
    params = jax.tree_util.tree_map(lambda *a: np.stack(a), *params)
  else:
    params = params[0]
  return Model.create(params, cfg, (16, 32, 32), 0.0, "scaled-random")


def relative_rms(a, b):
  return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.std(b), 1e-12))


def test_the_receptive_field_is_derived_and_measured_alike():
  # Derived from the layers: 44 to 51 voxels, 46 from an 8-aligned border, halo 48.
  reach = reach_by_residue()
  assert min(min(r) for r in reach) == 44 and max(max(r) for r in reach) == 51
  assert exact_halo() == HALO == 48
  # Measured by perturbing one input voxel at each position modulo 8: the outputs that
  # change lie within the derived reach, and the farthest is as far as derived.
  net = UNet3D(4, conv_impl="xla")
  params = jax.tree_util.tree_map(lambda a: a * 2.0, init_params(4, 0))
  fn = jax.jit(lambda x: net.apply({"params": params}, x))
  x = np.random.default_rng(0).normal(size=(1, 160, 16, 16, 1)).astype(np.float32)
  base = np.asarray(fn(x))
  farthest = 0
  for r in range(8):
    t0 = 64 + r
    x2 = x.copy()
    x2[0, t0, 8, 8, 0] += 100.0
    changed = np.nonzero(np.abs(np.asarray(fn(x2)) - base).max(axis=(0, 2, 3, 4)) > 0)[0]
    allowed = [t for t in range(160) if t - reach[t % 8][0] <= t0 <= t + reach[t % 8][1]]
    assert set(changed) <= set(allowed), r
    farthest = max(farthest, t0 - changed.min(), changed.max() - t0)
  assert farthest == 51


@pytest.mark.parametrize("shape,tile,batch,tiles", [
    ((7, 9, 5), None, 1, 1),               # shorter than the pooling grid on every axis
    ((130, 21, 19), (104, 24, 24), 1, 5),  # five temporal tiles, odd frame sizes
    ((37, 110, 29), (40, 104, 32), 2, 2),  # tiles split Y; two tiles per call
])
def test_exact_tiling_equals_the_whole_movie(shape, tile, batch, tiles):
  den = Denoiser(scaled_model(), tiling="exact", tile=tile, batch_size=batch,
                 devices=jax.devices()[:1])
  movie = np.random.default_rng(sum(shape)).poisson(50, shape).astype(np.uint16)
  out = denoise(movie, den, output_dtype="float32", brightness="model")
  whole = whole_movie_forward(movie, den)
  assert relative_rms(out, whole) <= 1e-5
  assert den.plan(shape, np.uint16, np.float32).tile_count == tiles


def test_exact_tiling_is_exact_on_several_devices_and_with_a_spatial_split(devices):
  model = scaled_model()
  movie = np.random.default_rng(3).poisson(50, (121, 64, 30)).astype(np.float32)
  whole = whole_movie_forward(movie, Denoiser(model, devices=devices[:1]))
  # Four devices, four or eight tiles per call (slabs grouped into one window), and Y
  # split over two devices.
  for kwargs in ({"devices": devices, "tile": (104, 64, 32)},
                 {"devices": devices, "tile": (104, 64, 32), "batch_size": 8},
                 {"devices": devices, "spatial": 2, "tile": (104, 64, 32)}):
    den = Denoiser(model, tiling="exact", **kwargs)
    out = denoise(movie, den, output_dtype="float32", brightness="model")
    assert relative_rms(out, whole) <= 1e-5, kwargs


def test_exact_uncertainty_prior_and_ensemble_equal_the_whole_movie():
  movie = np.random.default_rng(4).poisson(50, (121, 20, 27)).astype(np.float32)
  one = jax.devices()[:1]
  den = Denoiser(scaled_model(prior=True, members=2), tiling="exact", tile=(104, 24, 32),
                 symmetries=2, save_samples=True, devices=one)
  mean, std, samples = denoise(movie, den, output_dtype="float32", brightness="model")
  whole = whole_movie_forward(movie, den)
  assert relative_rms(mean, whole[..., 0]) <= 1e-5
  assert relative_rms(std, whole[..., 1]) <= 1e-5
  assert relative_rms(samples, np.moveaxis(whole[..., 2:], -1, 0)) <= 1e-5
  assert samples.shape == (4,) + movie.shape  # 2 symmetries x 2 members, non-square


def test_the_test_can_fail_too_short_a_halo_and_the_overlap_scheme_are_not_exact():
  model = scaled_model()
  movie = np.random.default_rng(5).poisson(50, (150, 24, 24)).astype(np.float32)
  den = Denoiser(model, devices=jax.devices()[:1])
  whole = whole_movie_forward(movie, den)
  fn = tile_network(4)
  params = den.engine.params
  short = exact_plan(movie.shape, (88, 24, 24), halo=40)
  got = denoise_with(movie, fn, short, params=params, devices=jax.devices()[:1])
  assert relative_rms(got, whole) > 1e-4
  overlap = overlap_plan(movie.shape, (16, 24, 24), 0.4)
  got = denoise_with(movie, fn, overlap, params=params, devices=jax.devices()[:1])
  assert relative_rms(got, whole) > 1e-3


def test_auto_chooses_exact_unless_it_costs_more(trained_model):
  den = Denoiser(trained_model)
  plan = den.plan((40, 30, 20))
  assert plan.mode == "exact" and plan.tile_count == 1
  # A budget too small for one tile: exact would need more network voxels than the
  # model's 8x16x16 patches at overlap 0.25, so auto falls back to them and says why.
  den = Denoiser(trained_model, memory_budget="20MB")
  assert den.plan((300, 500, 500)).mode == "overlap"
  with pytest.raises(UserError, match="raise --memory-budget or use --tiling overlap"):
    Denoiser(trained_model, tiling="exact", memory_budget="1MB").plan((300, 500, 500))
  # Asking for the overlap scheme's knobs chooses it.
  assert Denoiser(trained_model, overlap=0.5).plan((40, 30, 20)).mode == "overlap"
  assert Denoiser(trained_model, blend=True).plan((40, 30, 20)).blend
  with pytest.raises(UserError, match="belong to the overlap scheme"):
    Denoiser(trained_model, tiling="exact", blend=True)
  with pytest.raises(UserError, match="--tile must be three multiples of 8"):
    Denoiser(trained_model, tile=(100, 16, 16))
  with pytest.raises(UserError, match="--memory-budget takes a size"):
    Denoiser(trained_model, memory_budget="lots")


def test_the_compiled_step_is_checked_against_the_memory_budget(trained_model, monkeypatch):
  # When the estimate per voxel is too low, the first tile does not fit by XLA's own
  # analysis of the compiled step, and the plan shrinks it until it does.
  from deepcad_jax.denoising import denoiser as infer
  estimate = infer.bytes_per_voxel
  monkeypatch.setattr(infer, "bytes_per_voxel", lambda *a, **k: estimate(*a, **k) / 4)
  den = Denoiser(trained_model, tiling="exact", memory_budget="600MB",
                 devices=jax.devices()[:1])
  first = den.exact_plan((160, 200, 200))
  plan = den.plan((160, 200, 200), np.uint16, np.uint16)
  assert np.prod(plan.tile) < np.prod(first.tile)
  _, compiled = den.engine.prepare(plan, np.uint16, out_dtype=np.uint16)
  assert infer.compiled_bytes(compiled) <= 600e6


def test_reflect_padding_matches_numpy():
  from deepcad_jax.denoising.step import reflect_index
  for n in (1, 2, 5, 8):
    a = np.arange(n)
    for pad in (0, 1, 3, 7, 20):
      np.testing.assert_array_equal(a[reflect_index(np.arange(n + pad), n)],
                                    np.pad(a, (0, pad), mode="reflect" if n > 1 else "edge"))


def test_whole_movie_forward_pads_to_the_pooling_grid():
  den = Denoiser(scaled_model(), devices=jax.devices()[:1])
  movie = np.random.default_rng(6).normal(size=(9, 10, 11)).astype(np.float32)
  out = whole_movie_forward(movie, den, mean=0.0)
  x = np.pad(movie, ((0, 7), (0, 6), (0, 5)), mode="reflect")
  net = UNet3D(4)
  ref = net.apply({"params": den.engine.params}, jnp.asarray(x)[None, ..., None])
  np.testing.assert_allclose(out, np.asarray(ref)[0, :9, :10, :11, 0], rtol=1e-5,
                             atol=1e-5)
