"""Multi-process runs on `jax.distributed`: one global mesh over every process's devices.

`initialize` joins the run from explicit flags (coordinator, process count and id) or
from what SLURM, Open MPI or a TPU slice provide (JAX detects these itself). On CPUs it
turns on gloo collectives. Everything else in deepcad-jax is the same code on one or
many processes: batches are assembled from each process's share with
`jax.make_array_from_process_local_data`, Orbax coordinates checkpoint writes, and only
process 0 logs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from deepcad_jax.errors import UserError

log = logging.getLogger("deepcad_jax")

_ENV_HINTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
              "MEGASCALE_COORDINATOR_ADDRESS")


def cluster_detected() -> bool:
  """True where the environment describes a multi-process job JAX can join by itself."""
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(os.environ.get(name, "1") or 1) > 1:
      return True
  return any(os.environ.get(n) for n in _ENV_HINTS[2:])


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
  """Join a multi-process run; returns whether this is one. Call before other JAX use."""
  explicit = coordinator is not None or num_processes is not None or process_id is not None
  if not explicit and not (auto and cluster_detected()):
    if auto:
      log.info("no SLURM, Open MPI or TPU multi-process environment found; running as "
               "one process.")
    return False
  if explicit and (coordinator is None or num_processes is None or process_id is None):
    raise UserError("a multi-process run needs --coordinator HOST:PORT, --num-processes N "
                    "and --process-id I together (or --distributed under SLURM/MPI/TPU).")
  if explicit and not 0 <= process_id < num_processes:
    raise UserError(f"--process-id must be in [0, {num_processes}); got {process_id}.")
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get(
      "JAX_PLATFORMS", "") == "cpu":
    try:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # older JAX names it differently; CPU collectives then stay off
      log.warning("could not enable gloo CPU collectives.")
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs)
  if jax.process_index() != 0:
    logging.getLogger("deepcad_jax").setLevel(logging.WARNING)  # process 0 reports
  log.info("joined a run of %d processes with %d devices (%d here).", jax.process_count(),
           jax.device_count(), jax.local_device_count())
  return True


def barrier(name: str) -> None:
  """Wait for every process (no-op on one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def broadcast_int(value: int) -> int:
  """Process 0's `value` on every process (itself on one), so all decide alike."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def global_batch(local: Any, sharding: Any) -> Any:
  """The global batch from this process's share (a pytree of numpy arrays); `sharding`
  is one sharding for every leaf or a matching pytree of them."""
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree_util.tree_map(lambda _: sharding, local)
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.tree_util.tree_map(
      lambda a, s: jax.make_array_from_process_local_data(s, np.asarray(a)), local,
      sharding)
