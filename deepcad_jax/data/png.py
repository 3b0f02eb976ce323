"""PNG images without dependencies: 8-bit grayscale, for stream previews and the cover
image of a bioimage.io package."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def png_bytes(image: np.ndarray, level: int = 9) -> bytes:
  """An 8-bit grayscale PNG of a 2-D uint8 array, compressed at zlib `level`."""
  h, w = image.shape
  rows = b"".join(b"\x00" + np.ascontiguousarray(image[y], np.uint8).tobytes()
                  for y in range(h))
  return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
          + _chunk(b"IDAT", zlib.compress(rows, level)) + _chunk(b"IEND", b""))


def _chunk(tag: bytes, data: bytes) -> bytes:
  return (struct.pack(">I", len(data)) + tag + data +
          struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
