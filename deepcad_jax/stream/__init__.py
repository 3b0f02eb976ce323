"""Live denoising of a frame stream, as DeepCAD-RT's real-time mode, on any JAX device.

`StreamDenoiser` takes frames as they arrive (`push`) and hands back denoised frames in
order (`pull`). It cuts time with the same `tiling.AxisTiling` and (y, x) with the same
`tiling.TilePlan` as offline denoising, and runs each temporal tile through the same
`engine.Engine` and compiled predict step. Every pushed frame comes out exactly once.

- exact (default): tiles of `halo + core_frames + lookahead` frames every `core_frames`
  frames, each keeping its `core_frames` (the first keeps its halo too), and at the end
  one tile aligned to the end of the stream padded to a multiple of 8. With
  `lookahead` = the halo (48 frames, the default) every frame equals one forward pass
  over the whole recording, so the stream equals offline `denoise` exactly; a frame
  leaves `core_frames + lookahead` frames after it arrived at the latest, plus compute.
  A shorter `lookahead` (a multiple of 8) lowers that latency and gives up exactness
  near the end of each core (measured in docs/streaming.md).
- overlap: DeepCAD-RT's batches of `batch_frames` every `batch_frames - overlap_frames`
  frames, the centre kept, tiled in (y, x) with the model's patch and overlap; equal to
  offline `denoise` with the overlap scheme.

`run_pipeline` runs the paper's three stages in parallel threads joined by bounded
queues: acquisition (a `FrameSource`), processing (the device), and output (writing raw
and denoised TIFFs, previews). When the processing stage cannot keep up, the acquisition
queue fills and the `policy` decides, visibly: 'block' (back-pressure: acquisition
waits, frames are late but none is lost) or 'drop' (frames that find the queue full are
dropped, counted and reported; the raw movie keeps them, the denoised one does not).

This module is the public face of the live mode; the parts live in its modules `denoiser`
(`StreamDenoiser`), `sources` (frame sources), `pipeline` (the three stages), `files`
(the files written) and `view` (previews, live window).
"""

from deepcad_jax.stream.denoiser import CORE_FRAMES, STREAM_TILINGS, StreamDenoiser
from deepcad_jax.stream.files import raw_path
from deepcad_jax.stream.pipeline import Pipeline, StreamReport, run_pipeline
from deepcad_jax.stream.sources import FolderSource, FrameSource, ReplaySource, open_source
from deepcad_jax.stream.view import LiveView, display_available, write_png, write_preview

__all__ = ["CORE_FRAMES", "STREAM_TILINGS", "FolderSource", "FrameSource", "LiveView",
           "Pipeline", "ReplaySource", "StreamDenoiser", "StreamReport",
           "display_available", "open_source", "raw_path", "run_pipeline", "write_png",
           "write_preview"]
