"""`train(stop=..., on_score=...)`: a caller (the napari Train widget) stops a run
cleanly from another thread and sees each held-out score as it is measured."""

import threading

from tests.helpers import noisy_movie, tiny_config, write_tiff
from deepcad_jax import load_model, train


def test_a_stop_event_saves_and_the_same_call_resumes(tmp_path, devices):
  movie = write_tiff(tmp_path / "m.tif", noisy_movie((64, 24, 24))[0])
  cfg = tiny_config(**{"train.epochs": 2, "data.holdout": 0.25})
  stop, scores, seen = threading.Event(), [], []

  def on_step(step, loss):
    seen.append(step)
    if step == 5:
      stop.set()

  run = str(tmp_path / "run")
  part = train(movie, run, cfg, devices=devices[:1], progress=False, on_step=on_step,
               stop=stop, on_score=lambda s, v: scores.append((s, v)))
  assert part.interrupted and part.step == 5 and seen == [1, 2, 3, 4, 5]
  assert load_model(run).meta["step"] == 5 and scores == []  # mid-epoch: not scored
  done = train(movie, run, cfg, devices=devices[:1], progress=False,
               stop=threading.Event(), on_score=lambda s, v: scores.append((s, v)))
  assert not done.interrupted and done.step == done.total_steps == 32
  assert [s for s, _ in scores] == [16, 32] and all(v == v for _, v in scores)
  assert [s for s, _ in done.meta.holdout_curve] == [16, 32]
