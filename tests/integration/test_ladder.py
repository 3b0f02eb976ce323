import json
import os
import shutil

import pytest

from tests.helpers import tiny_config, write_tiff
from deepcad_jax import cli
from deepcad_jax.research.ladder import run_ladder
from deepcad_jax.analysis.simulate import simulate

pytestmark = pytest.mark.slow  # the ladder trains every rung


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
  root = tmp_path_factory.mktemp("ladder")
  noisy, clean, _ = simulate(shape=(64, 24, 24), snr_db=0.0, seed=3)
  return write_tiff(root / "noisy.tif", noisy), write_tiff(root / "clean.tif", clean), root


def test_a_two_rung_ladder_with_a_pruned_rung_runs_resumes_and_writes(sim):
  noisy, clean, root = sim
  workdir = str(root / "study")
  cfg = tiny_config(**{"train.epochs": 1})
  rows = run_ladder(noisy, workdir, widths=(8, 4), config=cfg, clean=clean,
                    holdout=0.25, pruned_from="widest", progress=False)
  kinds = [(r.name, r.kind) for r in rows]
  assert kinds == [("f08", "scratch"), ("f04", "scratch"), ("pruned_f04", "pruned")]
  f8, f4, pruned = rows
  assert f8.parameters > f4.parameters >= pruned.parameters
  assert pruned.parameters <= f4.parameters and pruned.features == 8
  for r in rows:
    assert r.holdout_score > 0 and r.snr_db is not None and r.flops_per_voxel > 0
    assert r.infer_voxels_per_s > 0 and r.train_step_s > 0 and r.steps == rows[0].steps > 0
  for name in ("ladder.json", "ladder.csv", "ladder.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  table = json.load(open(os.path.join(workdir, "ladder.json")))
  assert [r["name"] for r in table["rungs"]] == ["f08", "f04", "pruned_f04"]
  # Interrupted: one rung and the results are gone; a rerun trains only what is missing.
  done = os.path.join(workdir, "f08", "checkpoints")
  stamp = {n: os.path.getmtime(os.path.join(done, n)) for n in os.listdir(done)}
  shutil.rmtree(os.path.join(workdir, "f04"))
  os.remove(os.path.join(workdir, "ladder.json"))
  rows = run_ladder(noisy, workdir, widths=(8, 4), config=cfg, clean=clean, holdout=0.25,
                    measure=False, progress=False)
  assert [r.name for r in rows] == ["f08", "f04"]
  assert {n: os.path.getmtime(os.path.join(done, n)) for n in os.listdir(done)} == stamp
  assert os.path.exists(os.path.join(workdir, "ladder.json"))


def test_ladder_cli(capsys, sim):
  noisy, _, root = sim
  code = cli.main(["deepcad-jax", "ladder", "--data", noisy, "--workdir",
                   str(root / "cli"), "--widths", "4", "--config", "tiny", "--epochs", "1",
                   "--holdout", "0.25", "--nomeasure"])
  out = capsys.readouterr().out
  assert code == 0 and "f04" in out and "ladder.json" in out
  code = cli.main(["deepcad-jax", "ladder", "--data", noisy, "--workdir",
                   str(root / "cli2"), "--widths", "4", "--holdout", "0"])
  assert code == 2 and "give --holdout" in capsys.readouterr().err
