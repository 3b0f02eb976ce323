"""Does suite2p itself run on a plane folder deepcad-jax wrote?

Writes a simulated recording (somata with calcium transients, Poisson noise) through
deepcad-jax's suite2p writer into DIR/suite2p/plane0, then runs suite2p's own pipeline
on DIR with registration off (it must find the plane folder rather than convert
anything) and reports what suite2p produced: whether it took the existing binary, the
ROIs it detected and the traces' shape. suite2p 1.x (settings and db) and 0.x (ops)
are both driven the way their documentation says. Run it in an environment with
suite2p installed next to deepcad-jax (suite2p is not a dependency):

  python benchmarks/suite2p_check.py --output DIR [--json result.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import time

import numpy as np

from deepcad_jax.data import open_movie
from deepcad_jax.data.writers import write_movie
from deepcad_jax.analysis.simulate import SimulationParams, simulate


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True, help="an empty or new folder")
  parser.add_argument("--shape", default="400,96,96", help="T,Y,X of the recording")
  parser.add_argument("--json", default=None, help="write the result here")
  args = parser.parse_args()
  import suite2p  # deliberately late: only this check needs it

  shape = tuple(int(n) for n in args.shape.split(","))
  noisy, clean, info = simulate(SimulationParams(shape=shape, snr_db=10.0, seed=0))
  plane = os.path.join(args.output, "suite2p", "plane0")
  os.makedirs(os.path.dirname(plane), exist_ok=True)
  write_movie(f"suite2p:{plane}", clean)  # what `denoise --output suite2p:...` writes
  ours = open_movie(plane)

  records: list[str] = []

  class Keep(logging.Handler):
    def emit(self, record):
      records.append(record.getMessage())

  logging.getLogger("suite2p").addHandler(Keep())
  logging.getLogger("suite2p").setLevel(logging.INFO)
  version = str(getattr(suite2p, "version", "0"))
  printed = io.StringIO()
  t0 = time.perf_counter()
  if hasattr(suite2p, "default_settings"):  # suite2p >= 1.0: settings and db
    settings = suite2p.default_settings()
    settings["torch_device"] = "cpu"
    settings["fs"] = 30.0
    settings["run"]["do_registration"] = 0
    settings["io"]["save_mat"] = False
    db = suite2p.default_db()
    db["data_path"] = [args.output]
    db["save_path0"] = args.output
    suite2p.run_s2p(db=db, settings=settings)
  else:  # suite2p 0.x: one ops dict and a db
    ops = suite2p.default_ops()
    ops.update(fs=30.0, do_registration=0, save_mat=False)
    with contextlib.redirect_stdout(printed):  # 0.x prints its progress
      suite2p.run_s2p(ops=ops, db={"data_path": [args.output],
                                   "save_path0": args.output})
    records += printed.getvalue().splitlines()
  seconds = time.perf_counter() - t0

  found = any("FOUND BINARIES AND" in r for r in records)
  outputs = {name: os.path.exists(os.path.join(plane, name))
             for name in ("stat.npy", "F.npy", "Fneu.npy", "spks.npy", "iscell.npy")}
  traces = np.load(os.path.join(plane, "F.npy")) if outputs["F.npy"] else None
  result = {
      "suite2p": version, "shape": list(shape), "seconds": round(seconds, 1),
      "took_existing_binary": found, "outputs": outputs,
      "rois": None if traces is None else int(traces.shape[0]),
      "trace_frames": None if traces is None else int(traces.shape[1]),
      "frames_written": int(ours.shape[0]),
      "somata_simulated": int(info["neurons"]),
  }
  print(json.dumps(result, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  ok = found and all(outputs.values()) and result["trace_frames"] == shape[0]
  print("suite2p ran on the plane folder as written" if ok else
        "suite2p did NOT run on the plane folder as written")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
