"""Fluorescence traces of regions of interest, with confidence bands from samples.

The ROIs come from `analysis.rois`. Each is a weighted set of pixels; its trace is the
weighted mean of those pixels in every frame, read from the movie block by block.
dF/F uses a baseline F0 that is either a percentile of the trace or its mean.

The band comes from samples of the whole denoised movie (`denoise --uncertainty
calibrated --save-samples` or `--uncertainty K --save-samples`, or computed here from a
model): each sample gives a whole trace, so the correlation between neighbouring pixels
of one sample is kept (a per-pixel std would ignore it). The band at each frame is a
percentile range across those traces, or, with few samples (band shape 'auto' below
T_BELOW samples, or 't'), Student-t quantiles times the samples' RMS deviation from the
denoised trace: 8 samples cannot place a 5th and 95th percentile.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import logging
import os
from typing import Sequence

import numpy as np

from deepcad_jax.analysis.metrics import student_t_quantile
from deepcad_jax import config as config_lib
from deepcad_jax.analysis.rois import Roi, read_rois
from deepcad_jax.analysis.uncertainty.bootstrap import calibrated_uncertainty
from deepcad_jax.data.movie import Movie, as_movie, open_movie, refuse_to_overwrite
from deepcad_jax.runtime.files import AtomicFile, os_error
from deepcad_jax.errors import UserError
from deepcad_jax.runtime.paths import check_input
from deepcad_jax.denoising import brightness
from deepcad_jax.denoising.denoiser import Denoiser
from deepcad_jax.denoising.step import Channels
from deepcad_jax.runtime.progress import Progress

log = logging.getLogger("deepcad_jax")


# ------------------------------------------------------------------ traces


def block_traces(block: np.ndarray, rois: Sequence[Roi]) -> np.ndarray:
  """(n, Y, X[, C]) frames -> (n, R[, C]) weighted ROI means."""
  flat = block.reshape((block.shape[0], -1) + block.shape[3:])
  return np.stack([np.tensordot(flat[:, r.index].astype(np.float64), r.weight,
                                axes=([1], [0])) for r in rois], axis=1)


def movie_traces(movie, rois: Sequence[Roi]) -> np.ndarray:
  """(T, R) traces of a movie (array, path or Movie), read block by block."""
  movie = as_movie(movie)
  _check_rois(movie, rois)
  return np.concatenate([block_traces(b, rois) for _, b in movie.chunks()]) if \
      movie.shape[0] else np.zeros((0, len(rois)))


def _check_rois(movie: Movie, rois: Sequence[Roi]) -> None:
  size = movie.shape[1] * movie.shape[2]
  for r in rois:
    if r.index.max() >= size:
      raise UserError(f"ROI {r.name!r} lies outside the {movie.shape[1]}x"
                      f"{movie.shape[2]} frames of {movie.name}.")


def parse_f0(spec: str) -> tuple[str, float]:
  """'mean' or 'percentile:P' (0 <= P <= 100)."""
  kind, _, value = str(spec).partition(":")
  if kind == "mean" and not value:
    return "mean", 0.0
  if kind == "percentile":
    try:
      p = float(value or 8)
    except ValueError:
      p = -1.0
    if 0 <= p <= 100:
      return "percentile", p
  raise UserError(f"--f0 takes 'mean' or 'percentile:P' with P in [0, 100]; got {spec!r}.")


def baseline(traces: np.ndarray, f0: str = "percentile:8") -> np.ndarray:
  """F0 along the time axis (-2 of (..., T, R)): a percentile of each trace or its mean."""
  kind, p = parse_f0(f0)
  if kind == "mean":
    return traces.mean(axis=-2, keepdims=True)
  return np.percentile(traces, p, axis=-2, keepdims=True)


def dff(traces: np.ndarray, f0: str = "percentile:8") -> np.ndarray:
  """(F - F0) / F0 for (..., T, R) traces; NaN where F0 is not positive."""
  base = baseline(traces, f0)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(base > 0, (traces - base) / np.where(base > 0, base, 1), np.nan)


@dataclasses.dataclass
class Traces:
  """Per-ROI traces: the denoised F, optionally the raw F and the samples' F."""

  names: list[str]
  pixels: list[int]
  denoised: np.ndarray                 # (T, R)
  raw: np.ndarray | None = None        # (T, R)
  samples: np.ndarray | None = None    # (S, T, R)
  f0: str = "percentile:8"
  band: tuple[float, float] = (5.0, 95.0)
  band_shape: str = "auto"

  def uses_t(self) -> bool:
    """Whether the band is Student-t (few samples, or asked) rather than percentiles."""
    n = 0 if self.samples is None else self.samples.shape[0]
    return self.band_shape == "t" or (self.band_shape == "auto" and n < T_BELOW)

  def band_of(self, values: np.ndarray, centre: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """The band across samples of (S, T, R) values: their percentiles, or (Student-t)
    `centre` +- t quantiles x the samples' RMS deviation from `centre`. The samples of
    an ROI are sums over its pixels of whole sample movies, so the pixels' correlation
    is kept either way."""
    if centre is None or not self.uses_t():
      lo, hi = np.nanpercentile(values, self.band, axis=0)
      return lo, hi
    n = values.shape[0]
    rms = np.sqrt(np.nanmean((values - centre[None]) ** 2, axis=0))
    return (centre + student_t_quantile(self.band[0] / 100, n) * rms,
            centre + student_t_quantile(self.band[1] / 100, n) * rms)

  @property
  def f_band(self) -> tuple[np.ndarray, np.ndarray] | None:
    return None if self.samples is None else self.band_of(self.samples, self.denoised)

  @property
  def dff_band(self) -> tuple[np.ndarray, np.ndarray] | None:
    return None if self.samples is None else self.band_of(
        dff(self.samples, self.f0), dff(self.denoised, self.f0))

  def summary(self) -> dict:
    out = {"rois": len(self.names), "frames": int(self.denoised.shape[0]), "f0": self.f0,
           "band_percentiles": list(self.band),
           "band_shape": "student-t" if self.uses_t() else "percentiles",
           "samples": 0 if self.samples is None else int(self.samples.shape[0])}
    if self.samples is not None:
      lo, hi = self.dff_band
      out["median_dff_band_width"] = float(np.nanmedian(hi - lo))
      flo, fhi = self.f_band
      out["mean_trace_inside_f_band"] = float(np.mean(
          (self.denoised >= flo - 1e-6 * np.abs(flo)) &
          (self.denoised <= fhi + 1e-6 * np.abs(fhi))))
    return out


BAND_SHAPES = ("auto", "percentile", "t")
T_BELOW = 30  # band shape 'auto': Student-t below this many samples, percentiles above


def validate_band(band: Sequence[float] | str) -> tuple[float, float]:
  """(lo, hi) percentiles from two numbers or their text 'LO,HI'."""
  try:
    lo, hi = (float(b) for b in (band.split(",") if isinstance(band, str) else band))
  except ValueError:
    raise UserError(f"--band takes two percentiles LO,HI; got {band!r}.") from None
  if not 0 <= lo < hi <= 100:
    raise UserError(f"--band takes two percentiles LO,HI with 0 <= LO < HI <= 100; got "
                    f"{lo:g},{hi:g}.")
  return lo, hi


def check_band_shape(shape: str) -> str:
  """`shape` if it is one of BAND_SHAPES, else one sentence."""
  if shape not in BAND_SHAPES:
    raise UserError(f"--band-shape is one of {', '.join(BAND_SHAPES)}; got {shape!r}.")
  return shape


def extract(movie, rois: Sequence[Roi], samples: Sequence = (), raw=None,
            f0: str = "percentile:8", band: Sequence[float] = (5, 95),
            progress: bool = False, band_shape: str = "auto") -> Traces:
  """Traces of `movie` (the denoised mean), of each of `samples` (movies of the same
  shape) and of `raw`, for `rois`.

  Args:
    movie: the denoised movie (array, path or `Movie`).
    rois: the regions.
    samples: sample movies of the same shape, for the band (none, or at least 2).
    raw: the raw movie, for raw traces (optional).
    f0: dF/F's baseline: 'mean' or 'percentile:P'.
    band: the band's (lo, hi) percentiles across samples.
    progress: print a progress line.
    band_shape: 'percentile' (the samples' percentiles), 't' (Student-t around the
      denoised trace from the samples' RMS deviation) or 'auto' (t below T_BELOW
      samples).
  """
  movie = as_movie(movie)
  check_band_shape(band_shape)
  parse_f0(f0)
  band = validate_band(band)
  if len(samples) == 1:
    raise UserError("a band needs at least 2 samples; give more --samples.")
  movies = [as_movie(s) for s in samples]
  raw = None if raw is None else as_movie(raw)
  for other in movies + ([raw] if raw is not None else []):
    if other.shape != movie.shape:
      raise UserError(f"{other.name} is {other.shape}, but {movie.name} is {movie.shape}; "
                      "give the samples and raw movie of this denoised movie.")
  bar = Progress(1 + len(movies) + (raw is not None), "movies read", enabled=progress)
  den = movie_traces(movie, rois)
  bar.update(1)
  sample_traces = None
  if movies:
    sample_traces = np.empty((len(movies),) + den.shape)
    for i, s in enumerate(movies):
      sample_traces[i] = movie_traces(s, rois)
      bar.update(2 + i)
  raw_traces = None
  if raw is not None:
    raw_traces = movie_traces(raw, rois)
    bar.update(bar.total)
  return Traces([r.name for r in rois], [r.pixels for r in rois], den, raw_traces,
                sample_traces, f0, band, band_shape)


def extract_with_model(raw, rois: Sequence[Roi], denoiser, f0: str = "percentile:8",
                       band: Sequence[float] = (5, 95), progress: bool = False,
                       band_shape: str = "auto") -> Traces:
  """Traces from a model: `raw` denoised with `denoiser` and the regional brightness
  correction (as `denoise`), every sample reduced to its traces as it comes.

  Args:
    raw: the raw movie (array, path or `Movie`).
    rois: the regions.
    denoiser: a `Denoiser` with `symmetries` (K >= 2, or >= 1 for an ensemble) and
      `save_samples`.
    f0, band, progress, band_shape: as for `extract`.
  """
  raw = as_movie(raw)
  check_band_shape(band_shape)
  _check_rois(raw, rois)
  parse_f0(f0)
  band = validate_band(band)
  if not (denoiser.symmetries and denoiser.save_samples):
    raise UserError("traces from a model need uncertainty samples (symmetries=K) and "
                    "save_samples=True on the Denoiser.")
  measure = brightness.Measure(raw, brightness.patch_frames(denoiser.model.config))
  parts = [block_traces(b, rois) for b in
           measure.through(denoiser.blocks(raw, progress=progress))]
  t = np.concatenate(parts)  # (T, R, channels): predict.Channels
  shift = block_traces(measure.fit().field[None], rois)[0]
  return Traces([r.name for r in rois], [r.pixels for r in rois],
                Channels.mean(t) + shift, movie_traces(raw, rois),
                np.moveaxis(Channels.samples(t), -1, 0) + shift, f0, band, band_shape)


def extract_calibrated(raw, rois: Sequence[Roi], denoiser, draws: int, bias_probes: int,
                       f0: str = "percentile:8", band: Sequence[float] = (5, 95),
                       progress: bool = False, band_shape: str = "auto") -> Traces:
  """Traces from a model with the calibrated uncertainty's samples (plausible truths,
  whole movies): `raw` denoised as `denoise` does and bootstrapped in memory
  (`calibrated_uncertainty`; a recording over the memory is refused in one sentence)."""
  check_band_shape(band_shape)
  parse_f0(f0)
  band = validate_band(band)
  _check_rois(as_movie(raw), rois)
  u = calibrated_uncertainty(raw, denoiser, draws=draws, bias_probes=bias_probes,
                             keep_samples=True, progress=progress)
  return Traces([r.name for r in rois], [r.pixels for r in rois],
                movie_traces(u.estimate, rois), movie_traces(raw, rois),
                np.stack([movie_traces(s, rois) for s in u.samples]), f0, band, band_shape)


# ------------------------------------------------------------------ outputs


CSV_COLUMNS = ("roi", "frame", "raw_F", "F", "F_lo", "F_hi", "raw_dff", "dff", "dff_lo",
               "dff_hi")


def write_csv(traces: Traces, path: str) -> None:
  """One row per (ROI, frame); empty cells where there is no raw movie or no samples."""
  T, R = traces.denoised.shape
  cols = {"F": traces.denoised, "dff": dff(traces.denoised, traces.f0)}
  if traces.raw is not None:
    cols.update(raw_F=traces.raw, raw_dff=dff(traces.raw, traces.f0))
  if traces.samples is not None:
    (cols["F_lo"], cols["F_hi"]), (cols["dff_lo"], cols["dff_hi"]) = \
        traces.f_band, traces.dff_band
  with AtomicFile(path, overwrite=True) as f:
    w = csv.writer(f.text(newline=""))
    w.writerow(CSV_COLUMNS)
    for r, name in enumerate(traces.names):
      for t in range(T):
        w.writerow([name, t] + [_cell(cols[c][t, r]) if c in cols else ""
                                for c in CSV_COLUMNS[2:]])


def _cell(v: float) -> str:
  return "" if not np.isfinite(v) else f"{v:.6g}"


def plot(traces: Traces, path: str, max_rois: int = 12, frame_rate: float | None = None
         ) -> list[str]:
  """A grid of dF/F panels (raw, denoised, band), one per ROI (the first `max_rois`).
  Needs matplotlib; returns the names plotted."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise UserError("the plot needs matplotlib: pip install 'deepcad-jax[plot]' (the CSV "
                    "was written).") from None
  names = traces.names[:max_rois]
  n = len(names)
  cols = 1 if n <= 4 else 2
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 1.9 * rows + 0.6), squeeze=False,
                           sharex=True)
  t = np.arange(traces.denoised.shape[0], dtype=np.float64)
  if frame_rate:
    t = t / frame_rate
  den = dff(traces.denoised, traces.f0)
  raw = dff(traces.raw, traces.f0) if traces.raw is not None else None
  band = traces.dff_band
  for i, name in enumerate(names):
    ax = axes[i // cols][i % cols]
    if raw is not None:
      ax.plot(t, raw[:, i], color="0.7", lw=0.6, label="raw")
    if band is not None:
      ax.fill_between(t, band[0][:, i], band[1][:, i], color="tab:blue", alpha=0.3,
                      lw=0, label=f"band ({traces.band[0]:g}-{traces.band[1]:g}%)")
    ax.plot(t, den[:, i], color="tab:blue", lw=0.9, label="denoised")
    ax.set_ylabel("dF/F")
    ax.set_title(f"ROI {name} ({traces.pixels[i]} px)", fontsize=9, loc="left")
  for j in range(n, rows * cols):
    axes[j // cols][j % cols].axis("off")
  for ax in axes[-1]:
    ax.set_xlabel("time (s)" if frame_rate else "frame")
  axes[0][0].legend(fontsize=7, loc="upper right", ncol=3)
  fig.tight_layout()
  try:
    with AtomicFile(path, overwrite=True) as f:
      fig.savefig(f.open(), dpi=110, format="png")
  finally:
    plt.close(fig)
  return names


def sample_files(spec: str | Sequence[str]) -> list[str]:
  """--samples: a comma-separated list of files, or a glob pattern such as
  'den_sample*.tif' (sorted)."""
  items = [s for s in (spec.split(",") if isinstance(spec, str) else spec) if s]
  files = []
  for item in items:
    matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
    if not matches:
      raise UserError(f"--samples {item} matches no file.")
    files.extend(matches)
  for f in files:
    if not os.path.lexists(f):
      raise UserError(f"sample {f} does not exist.")
    check_input(f, folder=False)
  return files


@dataclasses.dataclass
class TraceReport:
  traces: Traces
  csv: str
  summary: str
  png: str | None          # None when matplotlib is missing
  plotted: list[str]

  def describe(self) -> str:
    """The report's lines for the command line."""
    s = self.traces.summary()
    lo, hi = s["band_percentiles"]
    lines = [f"{s['rois']} ROI(s) x {s['frames']} frames; F0 = {s['f0']}; "
             + (f"band {lo:g}-{hi:g}% ({s['band_shape']}) over {s['samples']} samples, "
                f"median dF/F width "
                f"{s['median_dff_band_width']:.3g}" if s["samples"] else
                "no samples: no band"),
             f"csv: {self.csv}", f"summary: {self.summary}"]
    if self.png:
      lines.append(f"plot: {self.png} ({len(self.plotted)} ROI(s))")
    return "\n".join(lines)


def trace_files(rois: str, output: str, *, movie: str | None = None,
                samples: str | Sequence[str] = (), raw: str | None = None,
                model=None, uncertainty: int | str = "calibrated",
                draws: int = config_lib.UNCERTAINTY_DRAWS,
                bias_probes: int = config_lib.UNCERTAINTY_BIAS_PROBES,
                f0: str = "percentile:8",
                band: Sequence[float] | str = (5, 95), plot_rois: int = 12,
                frame_rate: float | None = None, overwrite: bool = False,
                progress: bool = True, band_shape: str = "auto",
                **denoiser_kwargs) -> TraceReport:
  """Write traces.csv, traces.json and traces.png into the folder `output`.

  Either `movie` (a denoised TIFF) with optional `samples`, or `model` with `raw`: the
  raw movie is then denoised here with the samples of `uncertainty` and their traces
  kept (the movies are not written).

  Args:
    rois: a label TIFF, a JSON file of ROIs or suite2p's stat.npy (`read_rois`).
    output: the folder written (made if missing).
    movie: a denoised movie.
    samples: its sample movies, for the band: files (a list or comma-separated) or a
      glob (`sample_files`).
    raw: the raw movie: raw traces beside `movie`, or what `model` denoises.
    model: a `Model`, model directory or .pth to denoise `raw` with.
    uncertainty: with `model`, 'calibrated' (the calibrated uncertainty's samples, in
      memory: `calibrated_uncertainty`) or K test-time symmetries (2 to 8; 1 to 8 for
      an ensemble; their spread is narrower than the error).
    draws, bias_probes: with 'calibrated', as for `calibrated_uncertainty`.
    f0: dF/F's baseline: 'mean' or 'percentile:P'.
    band: the band's (lo, hi) percentiles, or their text 'LO,HI'.
    plot_rois: the most ROIs plotted.
    frame_rate: frames/s, to plot time in seconds (default: frame numbers).
    overwrite: replace existing outputs.
    progress: print a progress line.
    band_shape: 'auto', 'percentile' or 't' (`extract`).
    **denoiser_kwargs: more `Denoiser` options (with `model`).

  Returns:
    A `TraceReport`: the traces and the paths written (no plot without matplotlib).
  """
  band = validate_band(band)
  paths = {k: os.path.join(output, f"traces.{k}") for k in ("csv", "json", "png")}
  refuse_to_overwrite(paths.values(), overwrite)
  if (movie is None) == (model is None):
    raise UserError("give either --movie (a denoised movie, with --samples for a band) "
                    "or --model with --raw (denoised here, with a band).")
  if model is not None:
    if raw is None:
      raise UserError("--model needs --raw: the movie to denoise.")
    if samples:
      raise UserError("--samples belongs to --movie; with --model the samples are made "
                      "here from --raw (drop --samples, or give --movie instead).")
    raw_movie = open_movie(raw)
    roi_list = read_rois(rois, raw_movie.shape[1:])
    if uncertainty == "calibrated":
      traces = extract_calibrated(raw_movie, roi_list, Denoiser(model, **denoiser_kwargs),
                                  draws, bias_probes, f0, band, progress, band_shape)
    else:
      den = Denoiser(model, symmetries=uncertainty, save_samples=True, **denoiser_kwargs)
      traces = extract_with_model(raw_movie, roi_list, den, f0, band, progress,
                                  band_shape)
  else:
    mean_movie = open_movie(movie)
    roi_list = read_rois(rois, mean_movie.shape[1:])
    files = sample_files(samples) if samples else []
    traces = extract(mean_movie, roi_list, [open_movie(f) for f in files],
                     open_movie(raw) if raw else None, f0, band, progress, band_shape)
  try:
    os.makedirs(output, exist_ok=True)
  except OSError as e:
    raise os_error(e, paths["csv"]) from None
  write_csv(traces, paths["csv"])
  with AtomicFile(paths["json"], overwrite=True) as f:
    json.dump({**traces.summary(), "names": traces.names, "pixels": traces.pixels},
              f.text(), indent=1)
  png, plotted = paths["png"], []
  try:
    plotted = plot(traces, png, plot_rois, frame_rate)
  except UserError as e:
    log.warning("%s", e)
    png = None
  return TraceReport(traces, paths["csv"], paths["json"], png, plotted)
