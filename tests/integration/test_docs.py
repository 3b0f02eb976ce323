"""The examples of the README and of docs/ run, on tiny data, so the docs cannot rot.

Every ```bash and ```python block of README.md and docs/*.md runs, page by page in the
order of the page, in a folder of its own holding the tiny data the examples name:
`movie.tif` (a simulated 48x32x32 recording), its ground truth in `sim/` (`noisy.tif`,
`clean.tif`), `movies/` (two recordings), a model trained on it for a few steps at
`runs/mouse1` and `runs/rt`, and `rois.json`. `deepcad-jax` is this checkout's
command (`python -m deepcad_jax`). A block that cannot run on tiny data (it installs
packages, needs a GPU cluster, trains the full-size network for hours) is marked with an
HTML comment on the line before it, which the page's reader does not see:

  <!-- no-test: the reason -->

`python -m pytest tests/integration/test_docs.py -v` lists each page; a mark needs its
reason, and the examples that run may not dwindle unnoticed
(`test_the_marks_have_reasons_and_most_pages_run_examples`).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(
    os.path.join(ROOT, "docs")) if f.endswith(".md"))
BLOCK = re.compile(r"(?:^[ \t]*<!-- no-test: (?P<reason>.*?) -->\n)?^(?P<indent>[ \t]*)"
                   r"```(?P<lang>bash|python)\n(?P<code>.*?)^(?P=indent)```", re.S | re.M)
# What the examples may name, and made only where a page names it (and does not write it).
FIXTURES = ("movie.tif", "movies/", "sim/", "runs/mouse1", "runs/rt", "rois.json")


def blocks(page: str) -> list[tuple[str, str, str | None]]:
  """(language, code, no-test reason or None) of each example of `page`, in order."""
  with open(os.path.join(ROOT, page)) as f:
    text = f.read()
  return [(m["lang"], textwrap.dedent(m["code"]), m["reason"]) for m in BLOCK.finditer(text)]


def _runnable(page: str) -> list[tuple[str, str]]:
  return [(lang, code) for lang, code, reason in blocks(page) if reason is None]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, trained_model):
  """The files every page may name, made once (the pages get copies)."""
  from deepcad_jax.analysis.simulate import write_simulation
  root = tmp_path_factory.mktemp("docs-data")
  info = write_simulation(str(root / "sim"), shape=(48, 32, 32), snr_db=-2.0, seed=0)
  shutil.copy(info["noisy"], root / "movie.tif")
  (root / "movies").mkdir()
  for name in ("a.tif", "b.tif"):
    shutil.copy(info["noisy"], root / "movies" / name)
  (root / "runs").mkdir()
  for name in ("mouse1", "rt"):
    shutil.copytree(trained_model, root / "runs" / name)
  (root / "rois.json").write_text(json.dumps({"rois": [
      {"name": "a", "polygon": [[4, 4], [4, 12], [12, 12], [12, 4]]},
      {"name": "b", "pixels": [[20, 20], [20, 21], [21, 20], [21, 21]]}]}))
  bin_dir = root / "bin"
  bin_dir.mkdir()
  shim = bin_dir / "deepcad-jax"
  shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m deepcad_jax "$@"\n')
  shim.chmod(0o755)
  return root


def _workspace(page: str, tiny_data, tmp_path) -> str:
  code = "\n".join(c for _, c in _runnable(page))
  for name in FIXTURES:
    written = re.search(rf"--output\s+{re.escape(name)}", code)
    if name.rstrip("/") in code and not written:
      src = tiny_data / name.rstrip("/")
      dst = tmp_path / name.rstrip("/")
      dst.parent.mkdir(parents=True, exist_ok=True)
      (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
  return str(tmp_path)


def _run(lang: str, code: str, cwd: str, tiny_data) -> subprocess.CompletedProcess:
  env = dict(os.environ, PATH=f"{tiny_data / 'bin'}{os.pathsep}{os.environ['PATH']}",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
             MPLBACKEND="Agg")
  argv = (["bash", "-euo", "pipefail", "-c", code] if lang == "bash"
          else [sys.executable, "-c", code])
  return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if _runnable(p)])
def test_the_examples_of_a_page_run(page, tiny_data, tmp_path):
  cwd = _workspace(page, tiny_data, tmp_path)
  for lang, code in _runnable(page):
    done = _run(lang, code, cwd, tiny_data)
    assert done.returncode == 0, (f"{page}: this {lang} example failed:\n{code}\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def test_the_marks_have_reasons_and_most_pages_run_examples():
  runnable = [code for page in PAGES for _, code in _runnable(page)]
  assert len(runnable) >= 10, len(runnable)
  assert len([p for p in PAGES if _runnable(p)]) >= 5
  for page in PAGES:
    for _, _, reason in blocks(page):
      assert reason is None or reason.strip(), f"{page}: a no-test mark needs its reason"
