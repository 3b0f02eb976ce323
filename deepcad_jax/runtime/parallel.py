"""One mesh over all devices, and its shardings.

By default the mesh is 1-D ('data'): batches are split over devices, parameters
replicated. With `spatial > 1` it is 2-D ('data', 'space'): each patch's Y axis is also
split over `spatial` devices, for patches too large for one device; XLA's SPMD
partitioner inserts the halo exchanges the convolutions need.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from deepcad_jax.errors import UserError

DATA = "data"
SPACE = "space"


def data_mesh(devices: Sequence[jax.Device] | None = None, spatial: int = 1) -> Mesh:
  """A mesh over `devices` (default: every device): ('data',), or ('data', 'space')
  with `spatial` devices along 'space'."""
  devices = list(devices) if devices is not None else jax.devices()
  if spatial == 1:
    return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,),
                         devices=devices)
  if len(devices) % spatial:
    raise UserError(f"--spatial {spatial} does not divide the {len(devices)} devices.")
  return jax.make_mesh((len(devices) // spatial, spatial), (DATA, SPACE),
                       axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_for(mesh: Mesh, batch_size: int = 0) -> int:
  """The global batch: `batch_size`, or one per device along 'data' when 0; a batch
  that does not split evenly over those devices is one sentence with the fix."""
  n_dev = device_count(mesh)
  batch = batch_size or n_dev
  if batch % n_dev:
    raise UserError(f"batch size {batch} is not a multiple of the {n_dev} devices along "
                    f"the data axis; use --batch-size {max(n_dev, batch // n_dev * n_dev)}.")
  return batch


def check_spatial(patch_y: int, spatial: int) -> None:
  """Patch Y must split into whole pooling windows with at least two rows per device at
  the deepest level: with one row per device there, XLA's partitioned gradients were
  wrong (measured on jax 0.10.2, CPU), while two or more rows give the unsplit result."""
  if spatial > 1 and (patch_y % (8 * spatial) or patch_y < 16 * spatial):
    raise UserError(f"with --spatial {spatial} the patch Y ({patch_y}) must be a multiple "
                    f"of {8 * spatial} and at least {16 * spatial}.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch axis over 'data'; with a 'space' axis, also Y of (B, T, Y, X) over it."""
  if SPACE in mesh.axis_names:
    return NamedSharding(mesh, P(DATA, None, SPACE))
  return NamedSharding(mesh, P(DATA))


def image_sharding(mesh: Mesh) -> NamedSharding:
  """(B, Y, X) images (the mean-image prior) placed as the batch they go with."""
  if SPACE in mesh.axis_names:
    return NamedSharding(mesh, P(DATA, SPACE))
  return NamedSharding(mesh, P(DATA))


def pair_shardings(mesh: Mesh, prior: bool = False) -> dict[str, NamedSharding]:
  """Shardings of a training batch {'input', 'target'[, 'prior']}."""
  data = batch_sharding(mesh)
  out = {"input": data, "target": data}
  if prior:
    out["prior"] = image_sharding(mesh)
  return out


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def device_count(mesh: Mesh) -> int:
  return mesh.shape[DATA]
