"""Watching a live stream: preview PNGs and a live matplotlib window."""

from __future__ import annotations

import os
import sys

import numpy as np

from deepcad_jax.data.png import png_bytes
from deepcad_jax.runtime.files import write_bytes
from deepcad_jax.errors import UserError


def write_png(path: str, image: np.ndarray) -> None:
  """A grayscale 8-bit PNG (no dependencies): the image scaled to its 0.5-99.5% range;
  written atomically."""
  lo, hi = np.percentile(image, [0.5, 99.5]) if image.size else (0, 1)
  img = np.clip((image - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
  write_bytes(path, png_bytes(img, level=6))


def write_preview(path: str, raw: np.ndarray, denoised: np.ndarray) -> None:
  """A PNG of a raw frame and its denoised frame side by side."""
  write_png(path, np.concatenate([raw, denoised], axis=1))


def display_available() -> bool:
  """Whether a window can be shown (a display on Linux; always on macOS and Windows)."""
  return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or \
      sys.platform in ("darwin", "win32")


class LiveView:
  """The latest raw and denoised frames side by side in a matplotlib window.

  `update` (any thread) keeps the latest pair; `draw` (the main thread, via
  `run_pipeline(on_idle=...)`) shows it.
  """

  def __init__(self):
    try:
      import matplotlib.pyplot as plt
    except ImportError:
      raise UserError("the live view needs matplotlib (pip install matplotlib); without "
                      "it, use the preview images (--preview-every).") from None
    self.plt = plt
    self.latest = None
    self.images = None
    self.fig, self.axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, title in zip(self.axes, ("raw", "denoised")):
      ax.set_title(title)
      ax.axis("off")
    plt.ion()
    plt.show()

  def update(self, raw: np.ndarray, denoised: np.ndarray) -> None:
    self.latest = (raw[-1], denoised[-1])

  def draw(self) -> None:
    if self.latest is None:
      return
    frames, self.latest = self.latest, None
    if self.images is None:
      lo, hi = np.percentile(frames[0], [0.5, 99.5])
      self.images = [ax.imshow(f, cmap="gray", vmin=lo, vmax=hi)
                     for ax, f in zip(self.axes, frames)]
    else:
      for im, f in zip(self.images, frames):
        im.set_data(f)
    self.plt.pause(0.001)
