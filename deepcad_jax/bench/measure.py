"""How the benchmarks measure: ahead-of-time compilation, repeated timed runs
(`measure`), peak memory, FLOPs from XLA's cost analysis, the environment a record was
measured in, and the record itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import resource
import statistics
import subprocess
import time
from typing import Any, Callable, Sequence

import jax
import jaxlib
import numpy as np

from deepcad_jax import config as config_lib
from deepcad_jax.model_io.checkpoint import Model
from deepcad_jax.denoising.memory import compiled_bytes
from deepcad_jax.core.network import ensemble_params

log = logging.getLogger("deepcad_jax")


@dataclasses.dataclass
class Timing:
  compile_s: float
  times: list[float]

  @property
  def median_s(self) -> float:
    return statistics.median(self.times)


def measure(fn: Callable, args: Sequence[Any], repeats: int,
            compile_s: float | None = None) -> Timing:
  """Time `fn(*args)` `repeats` times after one untimed warm-up call.

  `compile_s` is the ahead-of-time compile time where the caller compiled; otherwise
  the warm-up call (which compiles) is reported as the compile time.
  """
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(max(1, repeats)):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return Timing(first if compile_s is None else compile_s, times)


def _compile(jitted, *args):
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def peak_memory_bytes(device: jax.Device | None = None) -> tuple[int, str]:
  """(bytes, source): the device's peak allocation, or this process's peak RSS on CPU."""
  device = device or jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS"


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float(cost.get("flops", 0.0)) or None if cost else None


def _compiled_memory(compiled) -> int | None:
  return compiled_bytes(compiled)


def environment() -> dict[str, Any]:
  dev = jax.devices()[0]
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, timeout=10,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = ""
  return {"device": dev.device_kind, "platform": dev.platform,
          "device_count": jax.device_count(), "jax_version": jax.__version__,
          "jaxlib_version": jaxlib.__version__, "commit": commit or "unknown",
          "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "date": datetime.date.today().isoformat()}


def _shape(shape) -> str:
  return "x".join(str(int(n)) for n in shape)


def _starting(name: str, what: str) -> None:
  """A line as each measurement starts (a workload runs for minutes; see it move)."""
  log.info("bench: %s (%s): compiling and timing...", name, what)


def _record(workload: str, env: dict, dtype: str, batch_size: int, timing: Timing | None,
            **extra) -> dict[str, Any]:
  mem, mem_source = peak_memory_bytes()
  rec = {"workload": workload, "device": env["device"], "dtype": dtype,
         "batch_size": batch_size, "jax_version": env["jax_version"],
         "commit": env["commit"], "peak_memory_bytes": mem, "peak_memory_source": mem_source}
  if timing is not None:
    rec.update(median_s=timing.median_s, compile_s=timing.compile_s,
               min_s=min(timing.times), max_s=max(timing.times), runs=len(timing.times))
  rec.update(extra)
  if "voxels" in rec and "median_s" in rec:
    rec["voxels_per_s"] = rec["voxels"] / rec["median_s"]
  if rec.get("flops") and "median_s" in rec:
    rec["flop_per_s"] = rec["flops"] / rec["median_s"]
  log.info("bench: %s done: median %.4g s over %d run(s)%s%s", workload,
           rec.get("median_s", float("nan")), rec.get("runs", 0),
           f", compile {rec['compile_s']:.3g} s" if "compile_s" in rec else "",
           f", {rec['voxels_per_s']:.3g} voxels/s" if "voxels_per_s" in rec else "")
  return rec


def _random_model(features: int, patch, overlap: float, members: int = 1) -> Model:
  cfg = config_lib.from_dict({"name": f"bench-f{features}",
                              "model": {"features": features, "ensemble": members},
                              "infer": {"patch": list(patch), "overlap": overlap}})
  return Model.create(ensemble_params(features, 0, members), cfg, mean=0.0,
                      source="random")


def _patches(n: int, patch, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(n,) + tuple(patch)).astype(np.float32)
