import jax
import numpy as np
import pytest

from tests.helpers import write_tiff
from deepcad_jax import Denoiser, UserError, cli, load_model
from deepcad_jax.data.movie import ArrayMovie
from deepcad_jax.analysis.score import holdout_range, parse_frames, score
from deepcad_jax.analysis.simulate import simulate


def test_the_score_is_the_error_against_the_truth_plus_the_noise(trained_model):
  """E[(f(even) - odd)^2] = E[(f(even) - clean odd)^2] + E[noise^2]: the noise of the
  odd frames is independent of the even frames the network saw."""
  noisy, clean, _ = simulate(shape=(48, 32, 32), snr_db=-2.0, seed=7)
  den = Denoiser(load_model(trained_model), devices=jax.devices()[:1])
  s = score(den, noisy)
  # The score normalises the movie as a whole (its mean and spread), as training does.
  norm = den.normalisation(ArrayMovie(noisy))
  mse, noise = [], []
  for src, tgt in ((slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2),
                                                            slice(0, None, 2))):
    out = np.concatenate([f.data for f in den.frames(
        ArrayMovie(noisy[src]), mean=float(norm.mean), scale=float(norm.scale))])
    mse.append(np.mean((out - clean[tgt]) ** 2))
    noise.append(np.mean((noisy[tgt] - clean[tgt]) ** 2))
  # Up to the cross term, whose expectation is zero.
  assert s.score - np.mean(noise) == pytest.approx(np.mean(mse), rel=0.2, abs=1e-3)
  assert s.score > np.mean(noise)  # a lower score is a model closer to the truth


def test_frame_ranges():
  assert parse_frames(None, 100) == (0, 100)
  assert parse_frames("-30:", 100) == (70, 100)
  assert parse_frames("10:50", 100) == (10, 50)
  with pytest.raises(UserError, match="--frames takes a range a:b"):
    parse_frames("ten", 100)
  with pytest.raises(UserError, match="selects 5 frames"):
    parse_frames("0:5", 100)
  assert holdout_range(200, 0.1) == (180, 200)
  assert holdout_range(200, "0:40") == (0, 40)
  assert holdout_range(200, 0) is None
  with pytest.raises(UserError, match="needs at least 16"):
    holdout_range(100, 0.1)


def test_score_cli(capsys, tmp_path, trained_model):
  noisy, _, _ = simulate(shape=(40, 24, 24), snr_db=0.0, seed=1)
  path = write_tiff(tmp_path / "m.tif", noisy)
  assert cli.main(["deepcad-jax", "score", "--model", trained_model, "--movie", path,
                   "--frames", "-20:"]) == 0
  assert "held-out score" in capsys.readouterr().out
  assert cli.main(["deepcad-jax", "score", "--model", trained_model, "--movie", path,
                   "--frames", "0:4"]) == 2
  assert "needs at least 16" in capsys.readouterr().err


def test_held_out_frames_are_never_trained_on_and_scored_every_epoch(tmp_path):
  from tests.helpers import tiny_config
  from deepcad_jax import train
  from deepcad_jax.data.movie import ArrayMovie
  from deepcad_jax.training.pairs import PairSource
  movie = simulate(shape=(80, 24, 24), snr_db=0.0, seed=2)[0]
  src = PairSource([ArrayMovie(movie)], (8, 16, 16), 400, holdout=[(40, 60)])
  for i in range(400):
    _, t0, _, _ = src.position(i)
    assert t0 + 16 <= 40 or t0 >= 60  # a window of 2 x 8 frames never touches 40:60
  assert {src.position(i)[1] < 40 for i in range(400)} == {True, False}  # both sides
  # Without a held-out range the positions are what they always were.
  plain = PairSource([ArrayMovie(movie)], (8, 16, 16), 10)
  assert PairSource([ArrayMovie(movie)], (8, 16, 16), 10, holdout=[None]).position(3) == \
      plain.position(3)
  path = write_tiff(tmp_path / "m.tif", movie)
  cfg = tiny_config(**{"train.epochs": 3, "data.holdout": 0.25})
  result = train(path, str(tmp_path / "run"), cfg, devices=jax.devices()[:1],
                 progress=False)
  assert result.meta["holdout"] == [[60, 80]]
  curve = result.meta["holdout_curve"]
  assert [s for s, _ in curve] == [16, 32, 48] and all(v > 0 for _, v in curve)
  best = min(curve, key=lambda c: c[1])[0]
  assert load_model(str(tmp_path / "run"), "best").meta["step"] == best
  with pytest.raises(UserError, match="--step takes a checkpoint number or 'best'"):
    load_model(str(tmp_path / "run"), "bestest")
