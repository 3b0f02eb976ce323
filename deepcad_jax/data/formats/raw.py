"""Raw binary movies: headerless arrays in C order, with the shape and dtype given.

`raw:movie.bin[shape=1000x512x512,dtype=uint16]` (or `--raw-shape`, `--raw-dtype`;
`offset=` skips a header, `axes=` names the axis order). The file is memory-mapped, so
only the frames read are loaded.
"""

from __future__ import annotations

import os

import numpy as np

from deepcad_jax.data.axes import Source
from deepcad_jax.data.metadata import MovieMetadata
from deepcad_jax.errors import UserError

_EXAMPLE = "raw:movie.bin[shape=1000x512x512,dtype=uint16] (or --raw-shape and --raw-dtype)"


def open_raw(path: str, shape: tuple[int, ...] | None, dtype: str | None,
             offset: int | None) -> Source:
  """The memory-mapped raw movie `path` of `shape` and `dtype` after `offset` bytes."""
  if shape is None or dtype is None:
    raise UserError(f"{path} is a raw binary file, which says nothing about its shape or "
                    f"type; give them, e.g. {_EXAMPLE}.")
  try:
    kind = np.dtype(dtype)
  except TypeError:
    raise UserError(f"{path}: dtype {dtype!r} is not a numpy type; give e.g. uint16, "
                    "int16 or float32.") from None
  if kind.kind not in "uif":
    raise UserError(f"{path}: dtype {dtype!r} is not a number type; give e.g. uint16.")
  offset = int(offset or 0)
  size = os.path.getsize(path)
  need = int(np.prod(shape, dtype=np.int64)) * kind.itemsize
  if size - offset != need:
    frame = int(np.prod(shape[1:], dtype=np.int64)) * kind.itemsize
    hint = (f"; {(size - offset) // frame} frames of {shape[1:]} would fit"
            if frame and (size - offset) % frame == 0 else "")
    raise UserError(f"{path} holds {size - offset} bytes after offset {offset}, but "
                    f"shape {tuple(shape)} of {kind.name} needs {need}{hint}; check the "
                    "shape, dtype and offset.")
  data = np.memmap(path, kind, "r", offset=offset, shape=tuple(shape))
  return Source(data, path, None, MovieMetadata(kind="raw"))
