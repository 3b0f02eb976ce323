"""`deepcad-jax denoise` (files) and `deepcad-jax stream` (a live frame stream).
"""

from __future__ import annotations


from absl import flags

from deepcad_jax.errors import UserError

from deepcad_jax.cli.flags import (FORMATS_HELP, Command, _define_distributed,
                                   _define_dtype, _define_formats, _define_model,
                                   _define_output, _define_run_settings, _given,
                                   _init_distributed, _movie, _output,
                                   _refuse_output_is_input, _require, _triple, _v,
                                   uncertainty_mode)


def _define_denoise(fv):
  _define_model(fv, step=True, para=True)
  flags.DEFINE_boolean("reference-stitching", False, "Reproduce DeepCAD-RT's stitching "
                       "exactly (its kept regions and per-patch intensity rescale).",
                       flag_values=fv)
  flags.DEFINE_string("input", None, "A movie or a folder of them. " + FORMATS_HELP,
                      flag_values=fv)
  _define_output(fv, "Output movie, in the format its name says (.tif, .h5, .zarr, .nwb, "
                 "suite2p:FOLDER), or a folder (same names and formats as the inputs).",
                 "Replace an existing output.")
  _define_formats(fv, output=True)
  flags.DEFINE_enum("tiling", "auto", ["auto", "exact", "overlap"], "exact: seamless, "
                    "equal to one pass over the whole movie; overlap: DeepCAD-RT's "
                    "overlapping patches (--patch, --overlap); auto: exact unless it costs "
                    "more network voxels than overlap within the memory budget.",
                    flag_values=fv)
  flags.DEFINE_string("tile", None, "Exact tiling: the largest tile T,Y,X (multiples of "
                      "8; default: as large as --memory-budget allows).", flag_values=fv)
  flags.DEFINE_string("patch", None, "Overlap tiling: patch T,Y,X (default: the model's; "
                      "selects overlap tiling under --tiling auto).", flag_values=fv)
  flags.DEFINE_float("overlap", None, "Overlap tiling: overlap factor in [0, 1) (default: "
                     "the model's; selects overlap tiling under --tiling auto).",
                     flag_values=fv)
  flags.DEFINE_integer("batch-size", 0, "Tiles per device call (0 = one per device).",
                       flag_values=fv)
  flags.DEFINE_string("output-dtype", None, "Output dtype: float32 (default: the "
                      "network's precision), input (the input's type, rounded), uint16, "
                      "int16...", flag_values=fv)
  flags.DEFINE_enum("brightness", None, ["regional", "model"], "regional (default): "
                    "each region of the output keeps the raw movie's mean (a static "
                    "correction fitted on the movie, smoothing chosen by cross-"
                    "validation); model: the network's output as it is (the default with "
                    "--reference-stitching).", flag_values=fv)
  _define_dtype(fv)
  flags.DEFINE_boolean("blend", False, "Overlap tiling: blend overlaps with linear weights "
                       "instead of cropping.", flag_values=fv)
  _define_run_settings(fv)
  _define_distributed(fv)


def _denoise_config(fv):
  """The `DenoiseConfig` of the denoise flags present in `fv` (checked there)."""
  from deepcad_jax.config import DenoiseConfig
  names = {"patch": "patch", "overlap": "overlap", "batch_size": "batch-size",
           "dtype": "dtype", "tiling": "tiling", "tile": "tile",
           "memory_budget": "memory-budget", "blend": "blend",
           "reference_stitching": "reference-stitching", "spatial": "spatial",
           "symmetries": "uncertainty", "save_samples": "save-samples"}
  values = {field: _v(fv, flag) for field, flag in names.items() if flag in fv}
  if uncertainty_mode(fv) == "calibrated":
    values.update(symmetries=0, save_samples=False)
  elif "uncertainty" in fv:
    values["symmetries"] = uncertainty_mode(fv)
  for field in ("patch", "tile"):
    if values.get(field) is not None:
      values[field] = _triple(values[field], "--" + field)
  return DenoiseConfig(**{k: v for k, v in values.items() if v is not None})


def _run_denoise(fv):
  from deepcad_jax.model_io.loading import load_model
  from deepcad_jax.denoising.files import denoise_files
  _require(fv, "model", "input", "output")
  _refuse_output_is_input([_given(fv, "output")], [_given(fv, "model", "model")])
  _init_distributed(fv)
  config = _denoise_config(fv)
  model = load_model(_v(fv, "model"), _v(fv, "step"), para=_v(fv, "para"))
  calibrated = uncertainty_mode(fv) == "calibrated"
  if calibrated and _v(fv, "output-dtype") not in (None, "float32"):
    raise UserError("--uncertainty calibrated compares the denoised movie with new draws "
                    "in float32; leave --output-dtype out.")
  also_writes, pending = None, []
  if calibrated:
    from functools import partial
    from deepcad_jax.analysis.uncertainty import files as uncertainty_files
    from deepcad_jax.analysis.uncertainty.bootstrap import check_settings
    from deepcad_jax.denoising.files import output_pairs
    check_settings(_v(fv, "draws"), _v(fv, "bias-probes"))
    also_writes = partial(uncertainty_files.planned_outputs, draws=_v(fv, "draws"),
                          keep_samples=_v(fv, "save-samples"))
    if not _v(fv, "overwrite"):  # outputs a stopped folder run finished, but not their
      pending = uncertainty_files.unfinished(  # uncertainty: asked before any writes
          output_pairs(_movie(fv, "input"), _output(fv, "output")), _v(fv, "draws"),
          _v(fv, "save-samples"))
  brightness = _v(fv, "brightness") or ("model" if config.reference_stitching else
                                         "regional")
  reports = denoise_files(_movie(fv, "input"), _output(fv, "output"), model, config,
                          overwrite=_v(fv, "overwrite"),
                          output_dtype=_v(fv, "output-dtype"), brightness=brightness,
                          also_writes=also_writes)
  for r in reports:
    print(r.describe())
    if calibrated:
      _write_calibrated(fv, model, config, brightness, r.input, r.output)
  if pending:  # skipped by denoise_files (complete); shared out between the processes
    import jax
    done = {r.output for r in reports}
    pending = [p for p in pending if p[1] not in done]
    for src, dst in pending[jax.process_index()::jax.process_count()]:
      print(f"{dst} is complete; its calibrated uncertainty is missing:")
      _write_calibrated(fv, model, config, brightness, src, dst)
  return 0


def _write_calibrated(fv, model, config, brightness: str, movie: str, denoised: str):
  """The calibrated uncertainty of `denoised`, written beside it, and its report line."""
  from deepcad_jax.analysis.uncertainty import files as uncertainty_files
  from deepcad_jax.denoising.denoiser import Denoiser
  paths, record = uncertainty_files.write_calibrated_uncertainty(
      movie, Denoiser(model, config), denoised, denoised,
      overwrite=_v(fv, "overwrite"), draws=_v(fv, "draws"),
      bias_probes=_v(fv, "bias-probes"), keep_samples=_v(fv, "save-samples"),
      brightness=brightness, progress=True)
  print(uncertainty_files.describe(record, paths))


def _define_stream(fv):
  flags.DEFINE_string("model", None, "Model directory or DeepCAD-RT .pth.", flag_values=fv)
  flags.DEFINE_string("source", None, "A TIFF to replay, or a folder to watch for TIFFs "
                      "dropped by the acquisition program (ends on a file named STOP).",
                      flag_values=fv)
  _define_output(fv, "Denoised movie, in the format its name says (the raw frames go "
                 "beside it, *_raw).", "Replace existing outputs.")
  _define_formats(fv, output=True)
  flags.DEFINE_float("rate", 30.0, "Replay rate in frames/s (0 = as fast as possible).",
                     flag_values=fv)
  flags.DEFINE_enum("tiling", None, ["exact", "overlap"], "exact (default): every frame "
                    "equals offline exact denoising; overlap: DeepCAD-RT's batches "
                    "(--batch-frames, --overlap-frames; chosen when either is given).",
                    flag_values=fv)
  flags.DEFINE_integer("core-frames", None, "Exact: frames completed per device call (a "
                       "multiple of 8; default 32). Fewer: lower latency, more compute.",
                       flag_values=fv)
  flags.DEFINE_integer("lookahead", None, "Exact: future frames each frame waits for (a "
                       "multiple of 8, default 48 = the network's halo: exact). Less lowers "
                       "the latency and is no longer exact.", flag_values=fv)
  flags.DEFINE_integer("batch-frames", None, "Overlap: frames per temporal batch (default: "
                       "the model's patch T).", flag_values=fv)
  flags.DEFINE_integer("overlap-frames", None, "Overlap: frames shared by consecutive "
                       "batches (default: from the model's overlap).", flag_values=fv)
  flags.DEFINE_enum("policy", "block", ["block", "drop"], "When processing falls behind: "
                    "block acquisition (no frame lost) or drop frames (counted).",
                    flag_values=fv)
  flags.DEFINE_string("mean", "model", "Normalisation: 'model' (training mean), "
                      "'running', or a number.", flag_values=fv)
  flags.DEFINE_string("mean-image", None, "For a model trained with --mean-prior: the "
                      "mean image to give it (a 2-D TIFF, or a movie whose temporal mean is "
                      "used); default: the running mean of the frames seen so far.",
                      flag_values=fv)
  flags.DEFINE_float("preview-every", 5.0, "Seconds between preview PNGs (0 = none).",
                     flag_values=fv)
  flags.DEFINE_float("idle-timeout", 10.0, "Folder source: end after this many seconds "
                     "without a new file.", flag_values=fv)
  flags.DEFINE_integer("batch-size", 0, "Patches per device call.", flag_values=fv)
  _define_dtype(fv)
  _define_run_settings(fv)
  flags.DEFINE_string("output-dtype", "float32", "Denoised output dtype: float32, input "
                      "(the source's type, rounded), uint16...", flag_values=fv)
  flags.DEFINE_boolean("live", False, "Show raw and denoised side by side in a window "
                       "(needs a display and matplotlib; headless: preview images).",
                       flag_values=fv)


def _run_stream(fv):
  from deepcad_jax.model_io.loading import load_model
  from deepcad_jax.data.movie import read_mean_image, refuse_to_overwrite
  from deepcad_jax.denoising.denoiser import Denoiser
  from deepcad_jax.stream import (ReplaySource, StreamDenoiser, open_source, raw_path,
                                  run_pipeline)
  _require(fv, "model", "source", "output")
  if uncertainty_mode(fv) == "calibrated":
    raise UserError("--uncertainty calibrated needs the whole recording; denoise the "
                    "stream's output file afterwards, or give a number K here.")
  output = _output(fv, "output")
  raw = raw_path(output)
  _refuse_output_is_input(
      [_given(fv, "output"), _given(fv, "output", path=raw)],
      [_given(fv, "model", "model"), _given(fv, "source"), _given(fv, "mean-image")])
  refuse_to_overwrite((output, raw), _v(fv, "overwrite"))
  source = open_source(_movie(fv, "source"), _v(fv, "rate"), _v(fv, "idle-timeout"))
  image = _v(fv, "mean-image")
  den = Denoiser(load_model(_v(fv, "model")), _denoise_config(fv))
  refuse_to_overwrite(den.extra_outputs(output), _v(fv, "overwrite"))
  stream = StreamDenoiser(den, _v(fv, "batch-frames"), _v(fv, "overlap-frames"),
                          tiling=_v(fv, "tiling"), core_frames=_v(fv, "core-frames"),
                          lookahead=_v(fv, "lookahead"), mean=_v(fv, "mean"),
                          mean_image=read_mean_image(image) if image else None)
  view, preview_every = None, _v(fv, "preview-every")
  if _v(fv, "live"):
    from deepcad_jax.stream import LiveView, display_available
    if display_available():
      view = LiveView()
    else:
      preview_every = preview_every or 5.0
      print(f"no display: writing preview images every {preview_every:g} s instead of a "
            "live window.")
  r = run_pipeline(source, stream, output, policy=_v(fv, "policy"), raw_output=raw,
                   rate=_v(fv, "rate") if isinstance(source, ReplaySource) else 0.0,
                   output_dtype=_v(fv, "output-dtype"), preview_every_s=preview_every,
                   on_output=view.update if view else None,
                   on_idle=view.draw if view else None, overwrite=_v(fv, "overwrite"))
  print(r.describe())
  return 0


COMMANDS = [
    Command("denoise", "denoise a TIFF movie or folder with a trained model",
            _define_denoise, _run_denoise,
            "deepcad-jax denoise --model runs/rt --input movie.tif --output den.tif"),
    Command("stream", "denoise a live frame stream (replayed TIFF or watched folder)",
            _define_stream, _run_stream,
            "deepcad-jax stream --model runs/rt --source movie.tif --output live.tif "
            "--rate 30"),
]
