import numpy as np
import pytest
import tifffile

from tests.helpers import noisy_movie, write_tiff
from deepcad_jax import UserError
from deepcad_jax.data import as_movie, list_movies, open_movie, write_movie
from deepcad_jax.training.pairs import PairSource, fit_patch, pair_iterator


def _indexed_movie(t=40, y=16, x=16):
  """Pixel value = frame index * 1000 + y * 10 + x (as float32)."""
  tt, yy, xx = np.meshgrid(np.arange(t), np.arange(y), np.arange(x), indexing="ij")
  return (tt * 1000 + yy * 10 + xx).astype(np.float32)


def test_pairs_follow_the_even_odd_rule():
  movie = _indexed_movie()
  source = PairSource([as_movie(movie)], (8, 8, 8), length=32, seed=1)
  mean = movie.mean()
  for i in range(len(source)):
    _, t0, y0, x0 = source.position(i)
    pair = source[i]
    frames_in = np.round((pair["input"][:, 0, 0] + mean - y0 * 10 - x0) / 1000)
    frames_out = np.round((pair["target"][:, 0, 0] + mean - y0 * 10 - x0) / 1000)
    np.testing.assert_array_equal(frames_in, t0 + 2 * np.arange(8))
    np.testing.assert_array_equal(frames_out, t0 + 1 + 2 * np.arange(8))
    assert pair["input"].shape == (8, 8, 8) and pair["input"].dtype == np.float32
    np.testing.assert_allclose(pair["input"][0] + mean, movie[t0, y0:y0 + 8, x0:x0 + 8])


def test_pairs_spread_over_files_and_record_means(tmp_path):
  a = write_tiff(tmp_path / "a.tif", np.full((20, 16, 16), 10, np.uint16))
  b = write_tiff(tmp_path / "b.tif", np.full((30, 16, 16), 50, np.uint16))
  source = PairSource([open_movie(a), open_movie(b)], (8, 8, 8), length=10)
  assert source.means == [10.0, 50.0]
  assert [source.position(i)[0] for i in range(4)] == [0, 1, 0, 1]
  assert np.all(source[1]["input"] == 0)  # mean subtracted


def test_grain_iterator_is_seeded_and_resumable():
  source = PairSource([as_movie(_indexed_movie())], (8, 8, 8), length=12, seed=0)
  it = pair_iterator(source, batch_size=2, seed=5)
  first = [next(it)["input"] for _ in range(3)]
  state = it.get_state()
  after = [next(it)["input"] for _ in range(2)]
  again = pair_iterator(source, batch_size=2, seed=5)
  assert all(np.array_equal(a, next(again)["input"]) for a in first)
  it.set_state(state)
  assert all(np.array_equal(a, next(it)["input"]) for a in after)
  assert first[0].shape == (2, 8, 8, 8)


def test_grain_worker_processes_give_the_same_batches():
  source = PairSource([as_movie(_indexed_movie())], (8, 8, 8), length=12, seed=0)
  plain = pair_iterator(source, batch_size=2, seed=5)
  workers = pair_iterator(source, batch_size=2, seed=5, workers=2)
  for _ in range(4):
    assert np.array_equal(next(plain)["target"], next(workers)["target"])


def test_memmap_and_page_reads_agree(tmp_path):
  movie = (np.arange(12 * 8 * 9) % 65535).astype(np.uint16).reshape(12, 8, 9)
  plain = open_movie(write_tiff(tmp_path / "plain.tif", movie))
  packed = open_movie(write_tiff(tmp_path / "zlib.tif", movie, compression="zlib"))
  assert plain.memory_mapped and not packed.memory_mapped
  for m in (plain, packed):
    assert m.shape == (12, 8, 9) and m.dtype == np.uint16
    np.testing.assert_array_equal(m.read(3, 7), movie[3:7])
    assert m.mean() == pytest.approx(movie.mean())


def test_imagej_hyperstack_singleton_axes_are_squeezed(tmp_path):
  movie = np.random.default_rng(0).integers(0, 100, (10, 1, 1, 8, 8)).astype(np.uint16)
  path = tmp_path / "hyper.tif"
  tifffile.imwrite(path, movie, imagej=True, metadata={"axes": "TZCYX"})
  m = open_movie(str(path))
  assert m.shape == (10, 8, 8)
  np.testing.assert_array_equal(m.read(0, 10), movie[:, 0, 0])


def test_bigtiff_written_in_blocks_reads_back(tmp_path, monkeypatch):
  import deepcad_jax.data.writers as output_mod
  monkeypatch.setattr(output_mod, "BIGTIFF_BYTES", 100)  # force BigTIFF for a small file
  movie = np.arange(6 * 4 * 5, dtype=np.float32).reshape(6, 4, 5)
  path = str(tmp_path / "big.tif")
  write_movie(path, iter([movie[:2], movie[2:]]), movie.shape, np.float32)
  with tifffile.TiffFile(path) as tif:
    assert tif.is_bigtiff
  np.testing.assert_array_equal(open_movie(path).read(0, 6), movie)


@pytest.mark.parametrize("make,match", [
    (lambda p: write_tiff(p / "img.tif", np.zeros((16, 16), np.uint16)), "single 2-D image"),
    (lambda p: write_tiff(p / "ch.tif", np.zeros((5, 2, 16, 16), np.uint16),
                          metadata={"axes": "TCYX"}),
     r"recording of 2 channels; give one, e\.g\. '.*ch\.tif\[channel=0\]'"),
    (lambda p: (p / "movie.png").write_bytes(b"x") and str(p / "movie.png"), "not a TIFF"),
    (lambda p: (p / "bad.tif").write_bytes(b"not a tiff") and str(p / "bad.tif"),
     "not a readable TIFF"),
    (lambda p: str(p / "missing.tif"), "does not exist"),
])
def test_bad_movies_get_one_clear_sentence(tmp_path, make, match):
  path = make(tmp_path)
  with pytest.raises(UserError, match=match):
    open_movie(path)


def test_nan_movie_is_rejected(tmp_path):
  movie = np.ones((10, 8, 8), np.float32)
  movie[4, 2, 2] = np.nan
  m = open_movie(write_tiff(tmp_path / "nan.tif", movie))
  with pytest.raises(UserError, match=r"NaN.*frame 4"):
    m.mean()


def test_list_movies(tmp_path):
  with pytest.raises(UserError, match="holds no .tif"):
    list_movies(str(tmp_path))
  write_tiff(tmp_path / "b.tif", np.zeros((4, 8, 8), np.uint16))
  write_tiff(tmp_path / "a.tiff", np.zeros((4, 8, 8), np.uint16))
  assert [p.rsplit("/", 1)[1] for p in list_movies(str(tmp_path))] == ["a.tiff", "b.tif"]


def test_fit_patch_shrinks_to_small_movies_and_says_so():
  patch, notes = fit_patch((32, 64, 64), [(40, 50, 100)], ["m.tif"])
  assert patch == (16, 48, 64)
  assert notes == ["patch reduced from (32, 64, 64) to (16, 48, 64) to fit the data "
                   "(m.tif (40, 50, 100) allows only (16, 48, 64)); each training pair "
                   "holds 38% of the configured voxels: record larger movies, or pass "
                   "--patch 16,48,64 to make it explicit"]
  # One short file among others: it is named, with what leaving it out keeps.
  patch, notes = fit_patch((32, 64, 64), [(200, 64, 64), (40, 64, 64), (100, 80, 80)],
                           ["a.tif", "short.tif", "c.tif"])
  assert patch == (16, 64, 64) and len(notes) == 1
  assert ("for all 3 files because short.tif (40, 64, 64) allows only (16, 64, 64); "
          "each training pair then holds 50% of the configured voxels; leave it out of "
          "--data to keep (32, 64, 64)") in notes[0]
  assert fit_patch((32, 64, 64), [(200, 64, 64)], ["a.tif"]) == ((32, 64, 64), [])
  with pytest.raises(UserError, match="at least 16"):
    fit_patch((8, 8, 8), [(15, 32, 32)], ["short.tif"])
  with pytest.raises(UserError, match="at least 8x8"):
    fit_patch((8, 8, 8), [(40, 6, 32)], ["thin.tif"])


def test_read_mean_image_from_an_image_or_a_movie(tmp_path):
  from deepcad_jax.data.movie import read_mean_image
  movie, _ = noisy_movie((10, 12, 14))
  image = movie.mean(0).astype(np.float32)
  np.testing.assert_allclose(read_mean_image(write_tiff(tmp_path / "img.tif", image)), image)
  np.testing.assert_allclose(read_mean_image(write_tiff(tmp_path / "m.tif", movie)), image,
                             rtol=1e-6)
  assert open_movie(str(tmp_path / "m.tif")).mean() == pytest.approx(movie.mean())
