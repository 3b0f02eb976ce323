import jax
import numpy as np
import pytest

from tests.helpers import noisy_movie, write_tiff
from deepcad_jax import Denoiser, UserError, denoise, denoise_files, load_model
from deepcad_jax.data import ArrayMovie, open_movie
from deepcad_jax.denoising.denoiser import denoise_with
from deepcad_jax.denoising.outputs import to_dtype
from deepcad_jax.denoising.engine import Engine
from deepcad_jax.runtime.parallel import data_mesh
from deepcad_jax.denoising.step import identity_tiles
from deepcad_jax.denoising.tiling import overlap_plan


def _run(movie, patch, overlap, batch_size=3, blend=False, mean=None):
  plan = overlap_plan(movie.shape, patch, overlap, blend=blend)
  return denoise_with(movie, identity_tiles(), plan, mean=mean, batch_size=batch_size,
                      devices=jax.devices()[:1])


@pytest.mark.parametrize("shape", [(7, 33, 150), (8, 8, 8), (1, 9, 9), (45, 20, 70),
                                   (100, 17, 17)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.6])
def test_identity_network_returns_the_input_exactly(shape, overlap):
  movie = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  out = _run(movie, (16, 32, 32), overlap, mean=0.0)
  assert out.shape == movie.shape
  np.testing.assert_array_equal(out, movie)


@pytest.mark.parametrize("shape", [(7, 33, 150), (45, 20, 70)])
def test_blending_with_identity_returns_the_input(shape):
  movie = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  out = _run(movie, (16, 16, 32), 0.5, blend=True, mean=0.0)
  np.testing.assert_allclose(out, movie, rtol=1e-5, atol=1e-5)


class CountingMovie(ArrayMovie):
  """Records the largest read, to check memory stays bounded by the slab."""

  largest = 0

  def read(self, t0, t1):
    self.largest = max(self.largest, t1 - t0)
    return super().read(t0, t1)


def test_reads_are_bounded_by_one_slab_not_the_movie():
  movie = CountingMovie(np.zeros((200, 16, 16), np.float32))
  plan = overlap_plan(movie.shape, (16, 16, 16), 0.25)
  engine = Engine(identity_tiles(), None, data_mesh(jax.devices()[:1]), 1)
  blocks = [f.data for f in engine.run(movie, plan, mean=0.0)]
  assert movie.largest == 16
  assert max(len(b) for b in blocks) <= 16 and sum(len(b) for b in blocks) == 200
  # With two tiles per call, a window holds two slabs (the second starts 12 frames on).
  movie = CountingMovie(np.zeros((200, 16, 16), np.float32))
  engine = Engine(identity_tiles(), None, data_mesh(jax.devices()[:1]), 2)
  assert sum(len(f.data) for f in engine.run(movie, plan, mean=0.0)) == 200
  assert movie.largest == 28


def test_to_dtype_rounds_and_clips_instead_of_wrapping():
  block = np.array([-3.2, 0.4, 1.6, 70000.0], np.float32)
  out, clipped = to_dtype(block, np.uint16)
  np.testing.assert_array_equal(out, [0, 0, 2, 65535])
  assert clipped == 2 and out.dtype == np.uint16
  out, clipped = to_dtype(np.array([-40000.0, 5.5, 40000.0]), np.int16)
  np.testing.assert_array_equal(out, [-32768, 6, 32767])
  assert clipped == 2
  out, clipped = to_dtype(block, np.float32)
  assert clipped == 0 and np.array_equal(out, block)


def test_load_model_reads_what_inference_needs(trained_model):
  model = load_model(trained_model)
  assert model.features == 4 and model.patch == (8, 16, 16)
  assert model.overlap == 0.25 and 40 < model.mean < 110
  with pytest.raises(UserError, match="no checkpoint at step 999"):
    load_model(trained_model, step=999)
  with pytest.raises(UserError, match="not a model directory"):
    load_model(trained_model + "/nope")


def test_batch_size_and_device_count_do_not_change_the_result(trained_model, devices):
  movie, _ = noisy_movie((30, 40, 36), seed=3)
  model = load_model(trained_model)
  reference = denoise(movie, model, output_dtype="float32", devices=devices[:1])
  for devs, batch in ((devices[:1], 3), (devices, 4), (devices, 8)):
    out = denoise(movie, model, output_dtype="float32", devices=devs, batch_size=batch)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-3)


def test_denoise_keeps_shape_and_precision(trained_model):
  movie, _ = noisy_movie((9, 33, 20), seed=4)
  out = denoise(movie, trained_model)
  assert out.shape == movie.shape and out.dtype == np.float32  # the network's precision
  rounded = denoise(movie, trained_model, output_dtype="input")
  assert rounded.dtype == np.uint16
  np.testing.assert_array_equal(rounded, np.clip(np.rint(out), 0, 65535))
  out = denoise(movie.astype(np.int16), trained_model, dtype="bfloat16",
                output_dtype="input")
  assert out.dtype == np.int16


def test_out_of_core_paths_equal_in_memory(trained_model, tmp_path):
  movie, _ = noisy_movie((40, 24, 24), seed=5)
  den = Denoiser(trained_model)
  expected = denoise(movie, den, output_dtype="float32")
  for name, kwargs in (("plain.tif", {}), ("zlib.tif", {"compression": "zlib"}),
                       ("big.tif", {"bigtiff": True})):
    path = write_tiff(tmp_path / name, movie, **kwargs)
    out = denoise(open_movie(path), den, output_dtype="float32")
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-4)
    out_path = str(tmp_path / f"den_{name}")
    denoise_files(path, out_path, den.model, output_dtype="float32", progress=False)
    np.testing.assert_allclose(open_movie(out_path).read(0, 40), expected, rtol=1e-6,
                               atol=1e-4)


def test_denoise_files_refuses_to_overwrite(trained_model, tmp_path):
  movie, _ = noisy_movie((16, 16, 16))
  src = write_tiff(tmp_path / "in.tif", movie)
  dst = str(tmp_path / "out.tif")
  denoise_files(src, dst, trained_model, progress=False)
  before = open(dst, "rb").read()
  with pytest.raises(UserError, match="already exists; add --overwrite"):
    denoise_files(src, dst, trained_model, progress=False)
  with pytest.raises(UserError, match="is the input file"):
    denoise_files(src, src, trained_model, overwrite=True, progress=False)
  assert open(dst, "rb").read() == before
  denoise_files(src, dst, trained_model, overwrite=True, progress=False)


def test_denoise_a_folder(trained_model, tmp_path):
  (tmp_path / "in").mkdir()
  for i in range(2):
    write_tiff(tmp_path / "in" / f"m{i}.tif", noisy_movie((12, 16, 20), seed=i)[0])
  reports = denoise_files(str(tmp_path / "in"), str(tmp_path / "out"), trained_model,
                          progress=False)
  assert [r.output.rsplit("/", 1)[1] for r in reports] == ["m0.tif", "m1.tif"]
  assert open_movie(str(tmp_path / "out" / "m1.tif")).shape == (12, 16, 20)


def test_spatial_sharding_gives_the_same_denoised_movie(trained_model, devices):
  movie, _ = noisy_movie((20, 40, 24), seed=6)
  one = denoise(movie, trained_model, patch=(8, 32, 16), output_dtype="float32",
                devices=devices[:1])
  two = denoise(movie, Denoiser(trained_model, patch=(8, 32, 16), devices=devices,
                                spatial=2), output_dtype="float32")
  # Partitioned convolutions sum in another order: float32 rounding, ~4e-5 relative.
  np.testing.assert_allclose(two, one, rtol=2e-4, atol=1e-3)
  with pytest.raises(UserError, match="--spatial 3 does not divide"):
    Denoiser(trained_model, devices=devices, spatial=3)
  with pytest.raises(UserError, match="must be a multiple of 16 and at least 32"):
    Denoiser(trained_model, devices=devices, spatial=2,
             tiling="overlap")  # the model's 16-row patch
