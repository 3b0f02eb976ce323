"""Memory budgets: how many bytes a tile plan may use on each device, and what a voxel costs."""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax



# Share of memory a tile plan may use when no --memory-budget is given: of each
# accelerator's memory (what XLA's allocator may hold), or of the machine's RAM on CPUs.
DEVICE_MEMORY_SHARE = 0.8
HOST_MEMORY_SHARE = 0.4


# ------------------------------------------------------------------ memory


def memory_budget(devices: Sequence[jax.Device], override: float | None = None) -> float:
  """Bytes one device may use for inference: `override`, else DEVICE_MEMORY_SHARE of an
  accelerator's memory, else HOST_MEMORY_SHARE of the machine's RAM split over the
  local CPU devices."""
  if override:
    return float(override)
  device = devices[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return DEVICE_MEMORY_SHARE * float(stats["bytes_limit"])
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    ram = 8 * 2**30
  local = max(1, sum(1 for d in devices if d.process_index == jax.process_index()))
  return HOST_MEMORY_SHARE * ram / local


def compiled_bytes(compiled: Any) -> int | None:
  """Device memory an executable needs by XLA's own analysis (temporaries, arguments
  and outputs, less what they share), or None where the backend does not say."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if m is None:
    return None
  return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes)


def bytes_per_voxel(features: float, dtype: str, channels_in: int = 1, samples: int = 1,
                    channels_out: int = 0) -> float:
  """Estimated peak bytes per tile voxel of the network's forward pass (measured with
  XLA's memory analysis: about 17 f bytes natively, 49 f with the CPU's 2-D convolution
  path, in float32), plus the per-sample outputs; the compiled step's own analysis
  checks it (`Engine.prepare`)."""
  per_f = 49.0 if jax.default_backend() == "cpu" else 17.0
  act = per_f * features * (0.6 if dtype == "bfloat16" else 1.0) * (1 + 0.1 * (channels_in - 1))
  return act + 4.0 * (samples + channels_out + 4)
