"""One data-parallel mesh over all devices, and its shardings."""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: every device)."""
  devices = list(devices) if devices is not None else jax.devices()
  return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def device_count(mesh: Mesh) -> int:
  return mesh.shape[DATA]
