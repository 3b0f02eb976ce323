"""The README's figure: one frame of the demo's simulated movie, raw beside denoised.

  python benchmarks/demo_figure.py [--workdir deepcad-jax-demo] [--frame 150]
      [--output docs/images/demo.png]

Runs `deepcad-jax demo` in --workdir unless a finished demo is there already, then
writes the frame of the raw and the denoised movie side by side (on the denoised
frame's 0.5-99.5 percentile contrast, 2x zoom), the same cover image a bioimage.io
export carries.
"""

from __future__ import annotations

import argparse
import json
import os

from deepcad_jax.cli.demo import run_demo
from deepcad_jax.data.movie import open_movie
from deepcad_jax.export.bioimageio import cover_image
from deepcad_jax.runtime.files import write_bytes


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="deepcad-jax-demo")
  p.add_argument("--frame", type=int, default=150)
  p.add_argument("--output", default=os.path.join("docs", "images", "demo.png"))
  args = p.parse_args(argv)
  results = os.path.join(args.workdir, "results.json")
  if not os.path.isfile(results):
    run_demo(args.workdir)
  with open(results) as f:
    files = json.load(f)["files"]
  t = args.frame
  raw = open_movie(files["noisy"]).read(t, t + 1)[0]
  denoised = open_movie(files["denoised"]).read(t, t + 1)[0]
  write_bytes(args.output, cover_image(raw, denoised))
  print(args.output)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
