"""ROI readers, traces, dF/F, bands from samples, and the traces command."""

import csv
import json
import os

import numpy as np
import pytest

from tests.helpers import noisy_movie, write_tiff
from deepcad_jax import UserError, cli, denoise
from deepcad_jax.analysis.rois import polygon_mask, read_rois, read_suite2p_stat
from deepcad_jax.analysis.traces import block_traces, dff, extract, movie_traces, parse_f0

SHAPE = (12, 16)  # (Y, X) frames


def test_polygon_mask_counts_pixel_centres():
  square = polygon_mask([[2, 3], [2, 7], [6, 7], [6, 3]], SHAPE)  # centres y 2..5, x 3..6
  assert square.sum() == 16 and square[2:6, 3:7].all()
  triangle = polygon_mask([[0, 0], [0, 10], [10, 0]], SHAPE)
  yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
  strict = (yy + xx < 10)
  assert (triangle[strict]).all() and not triangle[yy + xx > 10].any()
  with pytest.raises(UserError, match="at least 3"):
    polygon_mask([[0, 0], [1, 1]], SHAPE)


def test_label_tiff_rois(tmp_path):
  labels = np.zeros(SHAPE, np.uint16)
  labels[1:3, 1:4] = 5
  labels[8:10, 10:12] = 2
  rois = read_rois(write_tiff(tmp_path / "labels.tif", labels), SHAPE)
  assert [r.name for r in rois] == ["2", "5"] and [r.pixels for r in rois] == [4, 6]
  np.testing.assert_allclose(rois[1].weight.sum(), 1.0)
  with pytest.raises(UserError, match="label image is"):
    read_rois(write_tiff(tmp_path / "wrong.tif", labels[:-1]), SHAPE)


def test_json_rois_polygons_masks_and_pixels(tmp_path):
  mask = np.zeros(SHAPE, int)
  mask[4, 4:6] = 1
  spec = {"rois": [{"name": "poly", "polygon": [[2, 3], [2, 7], [6, 7], [6, 3]]},
                   {"name": "mask", "mask": mask.tolist()},
                   {"name": "px", "pixels": [[0, 0], [0, 1]], "weights": [3, 1]}]}
  path = tmp_path / "rois.json"
  path.write_text(json.dumps(spec))
  rois = read_rois(str(path), SHAPE)
  assert [r.name for r in rois] == ["poly", "mask", "px"]
  assert [r.pixels for r in rois] == [16, 2, 2]
  np.testing.assert_allclose(rois[2].weight, [0.75, 0.25])
  path.write_text(json.dumps([{"name": "out", "pixels": [[20, 0]]}]))
  with pytest.raises(UserError, match="outside"):
    read_rois(str(path), SHAPE)
  path.write_text(json.dumps([{"name": "nothing"}]))
  with pytest.raises(UserError, match="none of"):
    read_rois(str(path), SHAPE)


def _stat(tmp_path):
  stat = np.empty(2, dtype=object)
  stat[0] = {"ypix": np.array([1, 1, 2]), "xpix": np.array([1, 2, 1]),
             "lam": np.array([1.0, 1.0, 2.0], np.float32),
             "overlap": np.array([False, False, True]), "med": [1.0, 1.0],
             "npix": np.int64(3)}
  stat[1] = {"ypix": np.array([5]), "xpix": np.array([7]), "lam": np.array([0.4])}
  path = str(tmp_path / "stat.npy")
  np.save(path, stat, allow_pickle=True)
  return path


def test_suite2p_stat_uses_lam_and_drops_overlaps(tmp_path):
  rois = read_rois(_stat(tmp_path), SHAPE)
  assert len(rois) == 2
  np.testing.assert_array_equal(rois[0].index, [1 * 16 + 1, 1 * 16 + 2])
  np.testing.assert_allclose(rois[0].weight, [0.5, 0.5])
  assert rois[1].index.tolist() == [5 * 16 + 7]


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_suite2p_reader_refuses_code(tmp_path):
  stat = np.empty(1, dtype=object)
  stat[0] = {"ypix": np.array([1]), "xpix": np.array([1]), "x": _Evil()}
  path = str(tmp_path / "stat.npy")
  np.save(path, stat, allow_pickle=True)
  with pytest.raises(UserError, match="refusing"):
    read_suite2p_stat(path)
  np.save(str(tmp_path / "plain.npy"), np.zeros((3, 3)))
  with pytest.raises(UserError, match="not suite2p"):
    read_suite2p_stat(str(tmp_path / "plain.npy"))


def test_traces_are_weighted_means_and_dff():
  rng = np.random.default_rng(0)
  movie = rng.uniform(10, 20, size=(9,) + SHAPE).astype(np.float32)
  labels = np.zeros(SHAPE, np.int32)
  labels[3:5, 3:5] = 1
  from deepcad_jax.analysis.rois import rois_from_labels
  rois = rois_from_labels(labels)
  t = movie_traces(movie, rois)
  np.testing.assert_allclose(t[:, 0], movie[:, 3:5, 3:5].mean((1, 2)), rtol=1e-6)
  np.testing.assert_allclose(block_traces(movie[..., None], rois)[..., 0], t)
  f = np.array([[1.0], [2.0], [3.0], [4.0]])
  np.testing.assert_allclose(dff(f, "mean")[:, 0], (f[:, 0] - 2.5) / 2.5)
  np.testing.assert_allclose(dff(f, "percentile:0")[:, 0], f[:, 0] - 1.0)
  assert parse_f0("percentile:20") == ("percentile", 20.0)
  for bad in ("median", "percentile:200", "percentile:x"):
    with pytest.raises(UserError, match="--f0"):
      parse_f0(bad)


def test_band_from_model_samples_contains_the_mean_trace(trained_model, tmp_path, devices):
  movie, _ = noisy_movie((24, 24, 24), seed=4)
  mean, _, samples = denoise(movie, trained_model, output_dtype="float32", symmetries=8,
                             save_samples=True, devices=devices[:1])
  labels = np.zeros(movie.shape[1:], np.int32)
  labels[2:8, 2:8], labels[12:20, 10:22] = 1, 2
  from deepcad_jax.analysis.rois import rois_from_labels
  traces = extract(mean, rois_from_labels(labels), list(samples), raw=movie,
                   f0="percentile:10", band=(5, 95))
  lo, hi = traces.f_band
  assert traces.samples.shape == (8, 24, 2)
  # 8 samples, 5th-95th percentile: the samples' mean always lies inside (see docs/trust.md).
  assert np.all(traces.denoised >= lo - 1e-3) and np.all(traces.denoised <= hi + 1e-3)
  assert np.all(hi - lo > 0)
  dlo, dhi = traces.dff_band
  assert np.all(dhi >= dlo)
  assert traces.summary()["mean_trace_inside_f_band"] == 1.0


def test_cli_traces_from_files_and_from_a_model(trained_model, tmp_path, capsys):
  movie, _ = noisy_movie((24, 24, 24), seed=6)
  raw = write_tiff(tmp_path / "raw.tif", movie)
  den = str(tmp_path / "den.tif")
  assert cli.main(["deepcad-jax", "denoise", "--model", trained_model, "--input", raw,
                   "--output", den, "--uncertainty", "4", "--save-samples",
                   "--output-dtype", "float32"]) == 0
  rois = tmp_path / "rois.json"
  rois.write_text(json.dumps({"rois": [
      {"name": "a", "polygon": [[2, 2], [2, 9], [9, 9], [9, 2]]},
      {"name": "b", "pixels": [[15, 15], [15, 16], [16, 15]]}]}))
  out = str(tmp_path / "tr")
  assert cli.main(["deepcad-jax", "traces", "--movie", den, "--samples",
                   str(tmp_path / "den_sample*.tif"), "--raw", raw, "--rois", str(rois),
                   "--output", out, "--f0", "mean"]) == 0
  text = capsys.readouterr().out
  assert "2 ROI(s) x 24 frames" in text and "over 4 samples" in text
  rows = list(csv.DictReader(open(os.path.join(out, "traces.csv"))))
  assert len(rows) == 48 and rows[0]["roi"] == "a" and rows[-1]["roi"] == "b"
  assert all(float(r["F_lo"]) <= float(r["F_hi"]) for r in rows)
  png = os.path.join(out, "traces.png")
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  summary = json.load(open(os.path.join(out, "traces.json")))
  assert summary["samples"] == 4 and summary["names"] == ["a", "b"]
  # The same band computed from the model, with no sample files.
  out2 = str(tmp_path / "tr2")
  assert cli.main(["deepcad-jax", "traces", "--model", trained_model, "--raw", raw,
                   "--rois", str(rois), "--output", out2, "--uncertainty", "4",
                   "--f0", "mean"]) == 0
  rows2 = list(csv.DictReader(open(os.path.join(out2, "traces.csv"))))
  for r1, r2 in zip(rows, rows2):
    for col in ("F", "F_lo", "F_hi", "raw_F"):
      assert float(r1[col]) == pytest.approx(float(r2[col]), rel=1e-4, abs=1e-3)
  # Refuses to overwrite; clear errors for missing inputs.
  assert cli.main(["deepcad-jax", "traces", "--movie", den, "--rois", str(rois),
                   "--output", out]) == 2
  assert "already exists" in capsys.readouterr().err
  assert cli.main(["deepcad-jax", "traces", "--rois", str(rois), "--output",
                   str(tmp_path / "x")]) == 2
  assert "either --movie" in capsys.readouterr().err
  assert cli.main(["deepcad-jax", "traces", "--model", trained_model, "--raw", raw,
                   "--samples", str(tmp_path / "den_sample*.tif"), "--rois", str(rois),
                   "--output", str(tmp_path / "y")]) == 2
  assert "--samples belongs to --movie" in capsys.readouterr().err


def test_cli_traces_from_a_model_default_to_the_calibrated_samples(trained_model, tmp_path,
                                                                   capsys):
  movie, _ = noisy_movie((24, 24, 24), seed=7)
  raw = write_tiff(tmp_path / "raw.tif", movie.astype(np.float32))
  rois = tmp_path / "rois.json"
  rois.write_text(json.dumps({"rois": [
      {"name": "a", "polygon": [[2, 2], [2, 9], [9, 9], [9, 2]]}]}))
  out = str(tmp_path / "tr")
  assert cli.main(["deepcad-jax", "traces", "--model", trained_model, "--raw", raw,
                   "--rois", str(rois), "--output", out, "--draws", "4",
                   "--bias-probes", "1"]) == 0
  assert "over 4 samples" in capsys.readouterr().out
  # the same as denoise --uncertainty calibrated --save-samples, then traces --samples
  assert cli.main(["deepcad-jax", "denoise", "--model", trained_model, "--input", raw,
                   "--output", str(tmp_path / "den.tif"), "--uncertainty", "calibrated",
                   "--draws", "4", "--bias-probes", "1", "--save-samples"]) == 0
  out2 = str(tmp_path / "tr2")
  assert cli.main(["deepcad-jax", "traces", "--movie", str(tmp_path / "den.tif"),
                   "--samples", str(tmp_path / "den_sample*.tif"), "--raw", raw,
                   "--rois", str(rois), "--output", out2]) == 0
  rows = list(csv.DictReader(open(os.path.join(out, "traces.csv"))))
  rows2 = list(csv.DictReader(open(os.path.join(out2, "traces.csv"))))
  assert len(rows) == len(rows2) == 24
  for r1, r2 in zip(rows, rows2):
    for col in ("F", "F_lo", "F_hi", "raw_F"):
      assert float(r1[col]) == pytest.approx(float(r2[col]), rel=1e-4, abs=1e-4)
  assert cli.main(["deepcad-jax", "traces", "--model", trained_model, "--raw", raw,
                   "--rois", str(rois), "--output", str(tmp_path / "x"),
                   "--uncertainty", "many"]) == 2
  assert "--uncertainty takes 'calibrated' or a number" in capsys.readouterr().err
