"""Memory: what the host and the devices have, estimates checked before work starts,
and XLA's RESOURCE_EXHAUSTED turned into one sentence.

A run that cannot fit should say so before it compiles or allocates anything ("this
needs N GB; the device has M"); what still runs out at compile or run time is caught
around training and inference (`device_memory`) and reported the same way.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence, TypeVar

import jax

from deepcad_jax.errors import UserError
from deepcad_jax.runtime.files import format_bytes

F = TypeVar("F", bound=Callable[..., Any])


def host_available_bytes() -> int | None:
  """Memory the host can still give (MemAvailable on Linux), or None if unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def device_bytes(devices: Sequence[jax.Device]) -> tuple[int | None, str]:
  """(bytes one device may use, its description): an accelerator's limit, or on CPUs
  the host's available memory shared by the local devices used."""
  mine = [d for d in devices if d.process_index == jax.process_index()]
  device = (mine or jax.local_devices())[0]  # only this process's devices report stats
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} {device.id}"
  available = host_available_bytes()
  local = max(1, len(mine))
  if available is None:
    return None, "the host"
  return available // local, ("the host" if local == 1 else
                              f"each of the {local} CPU devices (sharing the host's memory)")


def check_fits(need: float, have: int | None, where: str, what: str, fix: str) -> None:
  """Refuses when `need` bytes exceed `have` (no refusal when `have` is unknown)."""
  if have is not None and need > have:
    raise UserError(f"{what} needs at least {format_bytes(need)}; {where} has "
                    f"{format_bytes(have)}; {fix}.")


def is_out_of_memory(e: BaseException) -> bool:
  return isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)


def device_memory(what: str, fix: str) -> Callable[[F], F]:
  """Decorator: XLA running out of memory in the function becomes one `UserError`
  sentence saying what ran out and `fix`."""

  def wrap(fn: F) -> F:
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
      try:
        return fn(*args, **kwargs)
      except MemoryError:
        raise UserError(f"{what} ran out of host memory; {fix}.") from None
      except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
          raise
        detail = str(e).strip().splitlines()[0][:200]
        raise UserError(f"{what} ran out of device memory ({detail}); {fix}.") from None
    return guarded  # type: ignore[return-value]

  return wrap
