"""Does CaImAn's own loader read the memmap deepcad-jax writes?

CaImAn is installed with conda, not pip, so this check runs CaImAn's `load_memmap`
from a CaImAn source checkout: the two functions it needs from `caiman/mmapping.py`
and `caiman/paths.py` are taken from the source as written and run with numpy only.
It writes a movie with a frame that is not square (24 x 40, so a swapped Y and X
would show) through deepcad-jax's CaImAn writer, loads it with `load_memmap`, rebuilds
the movie with CaImAn's idiom `np.reshape(Yr.T, [T] + list(dims), order='F')` and
compares.

  git clone https://github.com/flatironinstitute/CaImAn
  python benchmarks/caiman_check.py --caiman CaImAn --output DIR [--json result.json]
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import pathlib
import subprocess
import sys
import types
from typing import Any

import numpy as np

from deepcad_jax.data import open_movie
from deepcad_jax.data.writers import write_movie, written_path


def _functions(path: str, names: set[str]) -> str:
  """The source of the top-level functions `names` of the file `path`."""
  with open(path) as f:
    tree = ast.parse(f.read())
  keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
  return ast.unparse(ast.Module(body=keep, type_ignores=[]))


def caiman_load_memmap(checkout: str):
  """CaImAn's `load_memmap`, from the checkout's source."""
  paths = types.ModuleType("caiman.paths")
  exec("import os, re\n" + _functions(os.path.join(checkout, "caiman", "paths.py"),
                                      {"decode_mmap_filename_dict", "fn_relocated"}),
       paths.__dict__)
  caiman = types.ModuleType("caiman")
  caiman.paths = paths
  namespace = {"np": np, "pathlib": pathlib, "logging": logging, "caiman": caiman,
               "Any": Any}
  exec(_functions(os.path.join(checkout, "caiman", "mmapping.py"),
                  {"prepare_shape", "load_memmap"}), namespace)
  return namespace["load_memmap"]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--caiman", required=True, help="a CaImAn source checkout")
  parser.add_argument("--output", required=True, help="a folder for the test movie")
  parser.add_argument("--json", default=None, help="write the result here")
  parser.add_argument("--commit", default=None, help="the checkout's commit, when it is "
                      "not a git work tree (recorded in the result)")
  args = parser.parse_args()
  load_memmap = caiman_load_memmap(args.caiman)
  movie = np.random.default_rng(0).normal(100, 10, (37, 24, 40)).astype(np.float32)
  os.makedirs(args.output, exist_ok=True)
  out = os.path.join(args.output, "den.mmap")
  write_movie(out, movie, overwrite=True)
  name = written_path(out, movie.shape[1:], movie.shape[0])
  yr, dims, frames = load_memmap(name)
  images = np.reshape(yr.T, [frames] + list(dims), order="F")  # CaImAn's own idiom
  commit = subprocess.run(["git", "-C", args.caiman, "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or args.commit
  result = {"caiman_commit": commit, "written": os.path.basename(name),
            "Yr_shape": list(yr.shape), "dims": list(dims), "T": int(frames),
            "equal_to_movie": bool(images.shape == movie.shape and
                                   np.array_equal(images, movie)),
            "deepcad_jax_reads_back": bool(np.array_equal(
                open_movie(name).read(0, movie.shape[0]), movie))}
  print(json.dumps(result, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return 0 if result["equal_to_movie"] and result["deepcad_jax_reads_back"] else 1


if __name__ == "__main__":
  sys.exit(main())
