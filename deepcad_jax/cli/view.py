"""`deepcad-jax view`: open napari on a raw movie, its denoised movie and std, linked,
with the Inspect widget docked (`--screenshot` renders it headless and exits)."""

from __future__ import annotations

import os
import sys

from absl import flags

from deepcad_jax.errors import UserError
from deepcad_jax.cli.flags import Command, _require, _v

NO_NAPARI = ('deepcad-jax view needs napari, which is not installed; install it with '
             'pip install "deepcad-jax[napari]".')


def _define_view(fv):
  flags.DEFINE_string("raw", None, "The raw movie (any format denoise reads).",
                      flag_values=fv)
  flags.DEFINE_string("denoised", None, "Its denoised movie.", flag_values=fv)
  flags.DEFINE_string("std", None, "Its std (denoise --uncertainty K writes "
                      "<output>_std.tif): the band around the denoised trace.",
                      flag_values=fv)
  flags.DEFINE_string("samples", None, "Its samples (denoise --uncertainty calibrated "
                      "--save-samples): comma-separated files or a glob, e.g. "
                      "'den_sample*.tif'; the traces' band comes from them.",
                      flag_values=fv)
  flags.DEFINE_string("rois", None, "ROIs whose traces are plotted: a label TIFF, JSON "
                      "polygons or suite2p stat.npy (as deepcad-jax traces reads).",
                      flag_values=fv)
  flags.DEFINE_string("model", None, "The model that denoised it: its held-out quality "
                      "and noise model are shown.", flag_values=fv)
  flags.DEFINE_integer("frame", None, "Frame shown first (default: the middle one).",
                       flag_values=fv)
  flags.DEFINE_string("pixel", None, "Y,X of a pixel whose trace is plotted at start "
                      "(when no --rois).", flag_values=fv)
  flags.DEFINE_string("screenshot", None, "Render the window headless, write it to this "
                      "PNG and exit (Linux: needs a display; run under xvfb-run -a).",
                      flag_values=fv)
  flags.DEFINE_boolean("overwrite", False, "Replace an existing --screenshot.",
                       flag_values=fv)


def _pixel(text: str | None) -> tuple[int, int] | None:
  if text is None:
    return None
  try:
    y, x = (int(v) for v in text.split(","))
  except ValueError:
    raise UserError(f"--pixel takes Y,X (two integers, e.g. 20,31); got {text!r}.") from None
  return y, x


def _run_view(fv):
  _require(fv, "raw")
  shot = _v(fv, "screenshot")
  if shot is not None:
    if not shot.lower().endswith(".png"):
      raise UserError(f"--screenshot writes a PNG; give a name ending in .png, not {shot}.")
    if os.path.exists(shot) and not _v(fv, "overwrite"):
      raise UserError(f"{shot} already exists; add --overwrite to replace it or choose "
                      "another --screenshot.")
  try:
    import napari
    from deepcad_jax.viewer import app
  except ImportError:
    raise UserError(NO_NAPARI) from None
  if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or
                                               os.environ.get("WAYLAND_DISPLAY")):
    raise UserError("deepcad-jax view needs a display (none is set); on a machine "
                    "without one run it under a virtual one: xvfb-run -a deepcad-jax "
                    "view ...")
  viewer, inspect = app.open_view(
      _v(fv, "raw"), _v(fv, "denoised"), _v(fv, "std"), _v(fv, "rois"), _v(fv, "model"),
      show=shot is None, frame=_v(fv, "frame"), pixel=_pixel(_v(fv, "pixel")),
      samples=_v(fv, "samples"))
  if shot is None:
    napari.run()
    return 0
  try:
    app.screenshot(viewer, inspect, shot)
  finally:
    viewer.close()
  print(f"wrote {shot}")
  return 0


COMMANDS = [
    Command("view", "open napari on a raw and denoised movie (linked layers, traces "
            "with bands; --screenshot writes a PNG)", _define_view, _run_view,
            "deepcad-jax view --raw noisy.tif --denoised den.tif --std den_std.tif"),
]
