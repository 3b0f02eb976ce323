"""Measuring results: `simulate`, `evaluate`, `traces`, `events`, `calibrate`, `score`.
"""

from __future__ import annotations

import logging

from absl import flags

from deepcad_jax.errors import UserError
import os

from deepcad_jax.cli.flags import (Command, _define_bootstrap, _define_dtype,
                                   _define_formats, _define_model, _define_output,
                                   _given, _movie, _refuse_output_is_input, _require,
                                   _triple, _v, uncertainty_mode)

log = logging.getLogger("deepcad_jax")


def _define_simulate(fv):
  _define_output(fv, "Folder for noisy.tif, clean.tif and info.json.",
                 "Replace existing files.")
  flags.DEFINE_enum("format", "tiff", ["tiff", "hdf5", "zarr", "nwb", "suite2p"],
                    "Format of noisy and clean (noisy.tif, .h5, .zarr, .nwb; suite2p: "
                    "plane folders noisy/ and clean/, int16).", flag_values=fv)
  flags.DEFINE_string("shape", "300,128,128", "Movie shape T,Y,X.", flag_values=fv)
  flags.DEFINE_float("snr", -2.0, "Target SNR of the noisy movie (dB).", flag_values=fv)
  flags.DEFINE_float("photons", None, "Mean photons per voxel instead of --snr.",
                     flag_values=fv)
  flags.DEFINE_integer("neurons", None, "Number of neurons (default: by area).",
                       flag_values=fv)
  flags.DEFINE_integer("vessels", 1, "Number of blood vessels.", flag_values=fv)
  flags.DEFINE_float("frame-rate", 30.0, "Frame rate (Hz).", flag_values=fv)
  flags.DEFINE_float("spike-rate", 0.3, "Mean spike rate per neuron (Hz).", flag_values=fv)
  flags.DEFINE_float("tau-rise", 0.05, "Calcium rise time (s).", flag_values=fv)
  flags.DEFINE_float("tau-decay", 0.4, "Calcium decay time (s).", flag_values=fv)
  flags.DEFINE_float("read-noise", 1.0, "Gaussian read noise (photons).", flag_values=fv)
  flags.DEFINE_float("neuropil-coupling", 0.5, "How much the neuropil follows population "
                     "activity (0: constant background, for the wobble metric).",
                     flag_values=fv)
  flags.DEFINE_float("noise-correlation", 0.0, "Correlation of the noise of x-neighbouring "
                     "pixels, 0 to 0.5 (real two-photon recordings: about 0.1 to 0.4).",
                     flag_values=fv)
  flags.DEFINE_float("gain", 1.0, "Intensity units per photon of the written movies (a "
                     "detector's gain).", flag_values=fv)
  flags.DEFINE_float("offset", 0.0, "Intensity of zero photons (a detector's offset).",
                     flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=fv)


def _run_simulate(fv):
  from deepcad_jax.analysis.simulate import describe as simulation_report, write_simulation
  _require(fv, "output")
  shape = _triple(_v(fv, "shape"), "--shape")
  info = write_simulation(
      _v(fv, "output"), overwrite=_v(fv, "overwrite"), shape=shape, snr_db=_v(fv, "snr"),
      movie_format=_v(fv, "format"),
      neurons=_v(fv, "neurons"), vessels=_v(fv, "vessels"),
      frame_rate=_v(fv, "frame-rate"), spike_rate=_v(fv, "spike-rate"),
      tau_rise=_v(fv, "tau-rise"), tau_decay=_v(fv, "tau-decay"),
      read_noise=_v(fv, "read-noise"), neuropil_coupling=_v(fv, "neuropil-coupling"),
      photons=_v(fv, "photons"), noise_correlation=_v(fv, "noise-correlation"),
      gain=_v(fv, "gain"), offset=_v(fv, "offset"), seed=_v(fv, "seed"))
  print(simulation_report(info))
  return 0


def _define_evaluate(fv):
  flags.DEFINE_string("denoised", None, "The movie to score.", flag_values=fv)
  _define_formats(fv)
  flags.DEFINE_string("reference", None, "Ground truth (e.g. clean.tif).", flag_values=fv)
  flags.DEFINE_string("raw", None, "Optional noisy input, scored too.", flag_values=fv)
  _define_output(fv, "Write the results as JSON here.", "Replace an existing --output "
                 "file.")
  flags.DEFINE_string("std", None, "The *_std.tif of 'denoise --uncertainty': report its "
                      "calibration.", flag_values=fv)
  flags.DEFINE_string("uncertainty", None, "Deprecated: the old name of --std (kept for "
                      "one release).", flag_values=fv)


def _run_evaluate(fv):
  from deepcad_jax.analysis.metrics import describe, evaluate_files
  _require(fv, "denoised", "reference")
  std = _v(fv, "std")
  if _v(fv, "uncertainty") is not None:
    if std is not None:
      raise UserError("give the std file once, with --std (--uncertainty is its old name).")
    log.warning("evaluate --uncertainty FILE is deprecated; use --std FILE (the same file). "
                "--uncertainty will take a number of samples, as in the other commands.")
    std = _v(fv, "uncertainty")
  _refuse_output_is_input([_given(fv, "output", "file")],
                          [_given(fv, "denoised"), _given(fv, "reference"), _given(fv, "raw"),
                           _given(fv, "std", path=std)])
  results = evaluate_files(_movie(fv, "denoised"), _movie(fv, "reference"),
                           _movie(fv, "raw"), std, _v(fv, "output"),
                           overwrite=_v(fv, "overwrite"))
  print(describe(results, _v(fv, "output")))
  return 0


def _define_traces(fv):
  _define_formats(fv)
  flags.DEFINE_string("rois", None, "ROIs: a label TIFF (0 = background), a JSON of "
                      "polygons/masks/pixels, or suite2p's stat.npy.", flag_values=fv)
  _define_output(fv, "Folder for traces.csv, traces.json, traces.png.",
                 "Replace existing results.")
  flags.DEFINE_string("movie", None, "The denoised movie (the samples' mean).",
                      flag_values=fv)
  flags.DEFINE_string("samples", None, "Sample movies for the band: comma-separated files "
                      "or a glob, e.g. 'den_sample*.tif' (from denoise --save-samples).",
                      flag_values=fv)
  flags.DEFINE_string("raw", None, "The raw movie (plotted; with --model, denoised here).",
                      flag_values=fv)
  flags.DEFINE_string("model", None, "Instead of --movie/--samples: denoise --raw with "
                      "this model and keep only the samples' traces.", flag_values=fv)
  flags.DEFINE_string("uncertainty", "calibrated", "With --model, the samples: "
                      "'calibrated' (the calibrated uncertainty's plausible truths, "
                      "docs/trust.md; the recording is held in memory) or K test-time "
                      "symmetries (times the ensemble's members; too narrow for an error "
                      "bar).", flag_values=fv)
  _define_bootstrap(fv)
  flags.DEFINE_string("f0", "percentile:8", "Baseline of dF/F: 'percentile:P' or 'mean'.",
                      flag_values=fv)
  flags.DEFINE_string("band", "5,95", "Percentiles across samples that bound the band.",
                      flag_values=fv)
  flags.DEFINE_enum("band-shape", "auto", ["auto", "percentile", "t"], "percentile: the "
                    "samples' percentiles; t: Student-t around the trace from the samples' "
                    "RMS deviation (right for a few samples, e.g. the 8 of denoise "
                    "--uncertainty calibrated --save-samples); auto: t below 30 samples.",
                    flag_values=fv)
  flags.DEFINE_integer("plot-rois", 12, "ROIs drawn in traces.png (the first N).",
                       flag_values=fv)
  flags.DEFINE_float("frame-rate", None, "Frames per second, for a time axis in seconds.",
                     flag_values=fv)


def _run_traces(fv):
  from deepcad_jax.analysis.traces import trace_files
  _require(fv, "rois", "output")
  _refuse_output_is_input(
      [_given(fv, "output", "file", os.path.join(_v(fv, "output"), name))
       for name in ("traces.csv", "traces.json", "traces.png")],
      [_given(fv, "rois", "file"), _given(fv, "movie"), _given(fv, "raw"),
       _given(fv, "model", "model")])
  r = trace_files(_v(fv, "rois"), _v(fv, "output"), movie=_movie(fv, "movie"),
                  samples=_v(fv, "samples") or (), raw=_movie(fv, "raw"), model=_v(fv, "model"),
                  uncertainty=uncertainty_mode(fv), draws=_v(fv, "draws"),
                  bias_probes=_v(fv, "bias-probes"), f0=_v(fv, "f0"), band=_v(fv, "band"),
                  plot_rois=_v(fv, "plot-rois"), frame_rate=_v(fv, "frame-rate"),
                  overwrite=_v(fv, "overwrite"), band_shape=_v(fv, "band-shape"))
  print(r.describe())
  return 0


def _define_events(fv):
  flags.DEFINE_string("raw", None, "The raw (noisy) movie.", flag_values=fv)
  _define_formats(fv)
  flags.DEFINE_string("denoised", None, "Its denoised version.", flag_values=fv)
  _define_output(fv, "Folder for z_map.tif, events.csv, events.json.",
                 "Replace existing results.")
  flags.DEFINE_float("threshold", 6.0, "Standardised excess (z) that flags an event.",
                     flag_values=fv)
  flags.DEFINE_string("box", "3,5,5", "Averaging box T,Y,X.", flag_values=fv)


def _run_events(fv):
  from deepcad_jax.analysis.events import check_files
  _require(fv, "raw", "denoised", "output")
  _refuse_output_is_input(
      [_given(fv, "output", "file", os.path.join(_v(fv, "output"), name))
       for name in ("z_map.tif", "events.csv", "events.json")],
      [_given(fv, "raw"), _given(fv, "denoised")])
  report = check_files(_movie(fv, "raw"), _movie(fv, "denoised"), _v(fv, "output"),
                       _v(fv, "threshold"), _triple(_v(fv, "box"), "--box"),
                       _v(fv, "overwrite"))
  print(report.describe())
  return 0


def _define_calibrate(fv):
  flags.DEFINE_string("model", None, "Model directory to calibrate.", flag_values=fv)
  flags.DEFINE_string("noisy", None, "A noisy movie with known ground truth.", flag_values=fv)
  flags.DEFINE_string("clean", None, "Its ground truth (e.g. from simulate).", flag_values=fv)
  flags.DEFINE_integer("uncertainty", 8, "Test-time symmetries K, as for denoise.",
                       flag_values=fv)
  flags.DEFINE_boolean("overwrite", False, "Replace the model's calibration.json.",
                       flag_values=fv)
  flags.DEFINE_boolean("accept-uncorrelated", False, "Store the scale even when the std "
                       "does not track the error (correlation below 0.1); with a warning.",
                       flag_values=fv)


def _run_calibrate(fv):
  from deepcad_jax.analysis.calibrate import calibrate, describe as calibration_report
  _require(fv, "model", "noisy", "clean")
  record = calibrate(_v(fv, "model"), _v(fv, "noisy"), _v(fv, "clean"),
                     _v(fv, "uncertainty"), overwrite=_v(fv, "overwrite"),
                     accept_uncorrelated=_v(fv, "accept-uncorrelated"))
  print(calibration_report(record, _v(fv, "model")))
  return 0


def _define_score(fv):
  _define_model(fv, "Model directory or .pth.", step=True)
  flags.DEFINE_string("movie", None, "A movie (TIFF).", flag_values=fv)
  flags.DEFINE_string("frames", None, "Frames a:b to score (frames training never saw; "
                      "e.g. -100: for the last 100; default: the model's held-out frames "
                      "when it was trained on this movie, else all).", flag_values=fv)
  flags.DEFINE_string("json", None, "Also write the report as JSON here.", flag_values=fv)
  flags.DEFINE_boolean("overwrite", False, "Replace an existing --json file.",
                       flag_values=fv)
  _define_dtype(fv)


def _run_score(fv):
  from deepcad_jax.model_io.loading import load_model
  from deepcad_jax.data.movie import open_movie, refuse_to_overwrite
  from deepcad_jax.denoising.denoiser import Denoiser
  from deepcad_jax.analysis.score import default_frames, parse_frames, score
  _require(fv, "model", "movie")
  _refuse_output_is_input([_given(fv, "json", "file")],
                          [_given(fv, "model", "model"), _given(fv, "movie")])
  if _v(fv, "json"):
    refuse_to_overwrite([_v(fv, "json")], _v(fv, "overwrite"))
  movie = open_movie(_v(fv, "movie"))
  model = load_model(_v(fv, "model"), _v(fv, "step"))
  frames = parse_frames(_v(fv, "frames"), movie.shape[0], movie.name) if _v(
      fv, "frames") else default_frames(model, movie)
  den = Denoiser(model, dtype=_v(fv, "dtype"), tiling="exact")
  result = score(den, movie, frames)
  print(result.describe(den.model.source))
  if _v(fv, "json"):
    result.write_json(_v(fv, "json"), overwrite=_v(fv, "overwrite"))
    print(f"report: {_v(fv, 'json')}")
  return 0


def _define_audit(fv):
  _define_model(fv, "Model directory or .pth to audit.")
  _define_formats(fv)
  flags.DEFINE_string("movie", None, "The raw recording whose statistics make the "
                      "control scenes.", flag_values=fv)
  _define_output(fv, "Folder for the maps, audit.json and audit.png.",
                 "Replace existing results.")
  flags.DEFINE_integer("frames", 256, "Frames of each control scene (at most the "
                       "recording's).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the control scenes' noise.", flag_values=fv)
  flags.DEFINE_float("threshold", 6.0, "z threshold of the invented-events check.",
                     flag_values=fv)


def _run_audit(fv):
  from deepcad_jax.analysis.audit import audit_files
  _require(fv, "model", "movie", "output")
  result = audit_files(_v(fv, "model"), _movie(fv, "movie"), _v(fv, "output"),
                       frames=_v(fv, "frames"), seed=_v(fv, "seed"),
                       threshold=_v(fv, "threshold"), overwrite=_v(fv, "overwrite"))
  print(result.describe())
  return 0


COMMANDS = [
    Command("traces", "ROI traces and dF/F with confidence bands from uncertainty samples",
            _define_traces, _run_traces,
            "deepcad-jax traces --movie den.tif --samples 'den_sample*.tif' --raw movie.tif "
            "--rois rois.json --output traces/"),
    Command("events", "find where denoising removed more than noise (rare events)",
            _define_events, _run_events,
            "deepcad-jax events --raw movie.tif --denoised den.tif --output check/"),
    Command("audit", "how much structure a model invents: static and flat control "
            "scenes made from a recording", _define_audit, _run_audit,
            "deepcad-jax audit --model runs/rt --movie movie.tif --output audit/"),
    Command("calibrate", "fit the uncertainty scale of a model on data with ground truth",
            _define_calibrate, _run_calibrate,
            "deepcad-jax calibrate --model runs/rt --noisy sim/noisy.tif --clean "
            "sim/clean.tif"),
    Command("score", "held-out self-supervised score of a model on frames it never saw",
            _define_score, _run_score,
            "deepcad-jax score --model runs/rt --movie movie.tif --frames -300:"),
    Command("simulate", "write a synthetic calcium movie with its ground truth",
            _define_simulate, _run_simulate,
            "deepcad-jax simulate --output sim/ --shape 300,128,128 --snr -2"),
    Command("evaluate", "score a denoised movie against a reference (SNR, correlations)",
            _define_evaluate, _run_evaluate,
            "deepcad-jax evaluate --denoised den.tif --reference sim/clean.tif"),
]
