"""Denoising whole recordings: choose a tile plan, run it on the devices, write frames.

A `Denoiser` holds a model compiled for inference. For each movie it picks a
`tiling.TilePlan` (exact by default where that is not more compute than DeepCAD-RT's
overlap scheme; see `Denoiser.plan`) and an `Engine` runs it: the movie is read one
window of frames at a time (a temporal slab, or a few when several devices share the
work), each window goes to the device once in its own dtype, and the compiled
`step.predict_step` does everything else there (normalisation, tiles, network,
stitching, dtype conversion). While the device computes window k, the host reads window
k+1 and writes window k-1's frames, so memory holds a few windows, never the movie.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepcad_jax.runtime import parallel, resources
from deepcad_jax.runtime.files import format_bytes
from deepcad_jax.model_io.checkpoint import Model
from deepcad_jax.config import DenoiseConfig
from deepcad_jax.data.movie import Movie, as_movie
from deepcad_jax.errors import UserError
from deepcad_jax.model_io.loading import load_model
from deepcad_jax.core.network import uniform_widths
from deepcad_jax.core import normalise
from deepcad_jax.core.normalise import Normalisation
from deepcad_jax.denoising.step import Channels, TileFn, reflect_index, tile_network
from deepcad_jax.denoising.tiling import (GRID, HALO, TilePlan, choose_exact_tile,
                                          exact_plan, overlap_plan)
from deepcad_jax.denoising.engine import Engine, Frames
from deepcad_jax.denoising import brightness as brightness_lib
from deepcad_jax.denoising.memory import bytes_per_voxel, compiled_bytes, memory_budget
from deepcad_jax.denoising.outputs import (DenoiseStats, resolve_output_dtype,
                                           sample_path, std_path)

__all__ = ["Denoiser", "as_denoiser", "denoise", "denoise_with", "resolve_model",
           "whole_movie_forward"]

log = logging.getLogger("deepcad_jax")

# ------------------------------------------------------------------ the denoiser


def resolve_model(model: Model | str | os.PathLike) -> Model:
  if isinstance(model, Model):
    return model
  if isinstance(model, Denoiser):
    raise UserError("a Denoiser was given where a model is expected; pass it as the "
                    "model argument of denoise() instead.")
  return load_model(os.fspath(model))


def _settings(name: str, doc: str) -> property:
  """A read-only view of one `DenoiseConfig` field on the `Denoiser`."""
  return property(lambda self: getattr(self.config, name), doc=doc)


class Denoiser:
  """A model ready to denoise: an immutable handle, compiled once per tile layout and
  reused for every movie.

  Args:
    model: a `Model`, a model directory or a DeepCAD-RT .pth.
    config: how to run it (`config.DenoiseConfig`: tiling, tile, memory budget, batch
      size, dtype, uncertainty symmetries...; default: the model's own settings).
    devices: the devices to use (default: all).
    network: a stand-in for the model's network on tiles (tests, benchmarks).
    **options: `DenoiseConfig` fields that replace `config`'s, e.g.
      `Denoiser(model, tiling="exact", symmetries=4)`.

  The overlap scheme's patch and overlap default to the model's inference or training
  patch and overlap; the exact tile to the largest the memory budget holds (a share of
  an accelerator's memory, DEVICE_MEMORY_SHARE, or of RAM on CPUs, HOST_MEMORY_SHARE).
  `with_params` gives a handle on other parameters of the same network that reuses what
  is compiled.
  """

  def __init__(self, model: Model | str | os.PathLike, config: DenoiseConfig | None = None,
               *, devices: Sequence[jax.Device] | None = None,
               network: TileFn | None = None, **options: Any):
    config = DenoiseConfig() if config is None else config
    if not isinstance(config, DenoiseConfig):
      raise TypeError(f"Denoiser's second argument is a DenoiseConfig, not "
                      f"{type(config).__name__}; give settings by name (patch=...).")
    if options:
      unknown = sorted(set(options) - {f.name for f in dataclasses.fields(DenoiseConfig)})
      if unknown:
        renamed = " (uncertainty is now symmetries)" if "uncertainty" in unknown else ""
        raise TypeError(f"Denoiser got unknown option(s) {', '.join(unknown)}{renamed}; "
                        "its options are DenoiseConfig's fields.")
      config = dataclasses.replace(config, **options)
    model = resolve_model(model)
    config.check_model(model.config.model)
    put = functools.partial(object.__setattr__, self)
    put("model", model)
    put("config", config)
    put("patch", tuple(config.patch or model.config.infer.patch or model.patch))
    put("overlap", model.overlap if config.overlap is None else config.overlap)
    put("mesh", parallel.data_mesh(devices, config.spatial))
    if network is None:
      network = tile_network(
          model.features, config.dtype, members=model.config.model.ensemble,
          ensemble_impl=model.config.model.ensemble_impl, symmetries=config.symmetries,
          keep_samples=config.save_samples, widths=model.config.model.widths,
          std_scale=float((model.meta.calibration or {}).get("std_scale", 1.0)))
    put("network", network)
    put("engine", Engine(network, model.params, self.mesh, config.batch_size,
                         scale=float(model.scale)))
    if config.tiling == "overlap" or config.reference_stitching:
      parallel.check_spatial(self.patch[1], config.spatial)
    put("_plans", {})  # (shape, dtypes) -> TilePlan; plans do not depend on parameters

  def __setattr__(self, name: str, value: Any) -> None:
    raise AttributeError(f"a Denoiser is immutable (setting {name!r}); build another, or "
                         "use with_params() for other parameters of the same network.")

  def with_params(self, params: Any) -> Denoiser:
    """This denoiser on other parameters of the same network (e.g. a later training
    step): a new handle that reuses the compiled steps and the tile plans."""
    other = copy.copy(self)
    object.__setattr__(other, "model", self.model.with_params(params))
    object.__setattr__(other, "engine", self.engine.with_params(params))
    return other

  dtype = _settings("dtype", "Compute dtype.")
  tiling = _settings("tiling", "'auto', 'exact' or 'overlap'.")
  tile = _settings("tile", "Exact tiling's largest tile, or None (from the budget).")
  memory_budget = _settings("memory_budget", "Bytes per device for exact tiles, or None.")
  blend = _settings("blend", "Blend the overlap scheme's patches.")
  reference_stitching = _settings("reference_stitching", "DeepCAD-RT's stitching.")
  spatial = _settings("spatial", "Devices splitting each tile's Y axis.")
  symmetries = _settings("symmetries", "K test-time symmetries for uncertainty (0: off).")
  save_samples = _settings("save_samples", "Keep every sample beside mean and std.")

  @property
  def batch_size(self) -> int:
    """Tiles per network call (resolved: a multiple of the devices)."""
    return self.engine.batch_size

  @property
  def explicit_overlap(self) -> bool:
    """Whether the overlap scheme's patch or overlap was asked for."""
    return self.config.overlap_scheme_asked

  @property
  def samples(self) -> int:
    """Samples per voxel with uncertainty: K symmetries x M ensemble members."""
    return self.symmetries * self.model.config.model.ensemble

  @property
  def channels(self) -> int:
    """Values per output voxel: 0 (plain frames), 2 (mean, std) or 2 + samples."""
    if not self.symmetries:
      return 0
    return 2 + (self.samples if self.save_samples else 0)

  def extra_outputs(self, output: str) -> list[str]:
    """The files written beside `output`, one per channel after the first."""
    if not self.channels:
      return []
    return [std_path(output)] + [sample_path(output, i) for i in range(self.channels - 2)]

  # -- plans --------------------------------------------------------------------

  def overlap_plan(self, shape: Sequence[int]) -> TilePlan:
    return overlap_plan(shape, self.patch, self.overlap, self.reference_stitching,
                        self.blend)

  def exact_plan(self, shape: Sequence[int], budget_scale: float = 1.0) -> TilePlan:
    return exact_plan(shape, self.exact_tile(shape, budget_scale), HALO, GRID * self.spatial)

  def exact_tile(self, shape: Sequence[int], budget_scale: float = 1.0
                 ) -> tuple[int, int, int]:
    """Exact tiling's largest tile (T, Y, X) for a movie of `shape`: `tile`, or the
    largest that `budget_scale` times the memory budget holds."""
    if self.tile is not None:
      return self.tile
    return choose_exact_tile(shape, self._voxel_budget() * budget_scale, HALO,
                             GRID * self.spatial, self._window_cost(shape))

  def _voxel_budget(self) -> float:
    """Tile voxels one device call may hold within the memory budget."""
    budget = memory_budget(list(self.mesh.devices.flat), self.memory_budget)
    params = sum(np.asarray(p).nbytes for p in jax.tree_util.tree_leaves(
        self.model.params))
    n_data = parallel.device_count(self.mesh)
    per_device_tiles = max(1, self.batch_size // n_data) / self.spatial
    bpv = self._bytes_per_voxel()
    return max(0.0, budget - 2 * params) / (bpv * per_device_tiles)

  def _bytes_per_voxel(self) -> float:
    cfg = self.model.config.model
    widths = cfg.widths or uniform_widths(self.model.features, cfg.in_channels)
    width = max(widths[0], widths[1], widths[-1], widths[-2])  # full resolution
    return bytes_per_voxel(width, self.dtype, cfg.in_channels, max(1, self.samples),
                           self.channels)

  def _window_cost(self, shape: Sequence[int]):
    """Voxel-equivalents of the buffers that scale with the window, not the tile: the
    raw and normalised window and the output window."""
    bpv = self._bytes_per_voxel()
    padded = [-(-n // GRID) * GRID for n in shape]
    per_frame = padded[1] * padded[2] * (16 + 8 * max(1, self.channels))

    def cost(tile):
      return tile[0] * per_frame / bpv
    return cost

  def plan(self, shape: Sequence[int], movie_dtype: Any = np.float32,
           out_dtype: Any = np.float32) -> TilePlan:
    """The tile plan for a movie of `shape` (see `tiling` and the class docstring).

    Exact tiles sized from the memory budget are checked against XLA's analysis of the
    compiled step (compiled here for `movie_dtype` and `out_dtype`, the run reuses it)
    and shrunk until they fit.
    """
    shape = tuple(int(n) for n in shape)
    key = (shape, np.dtype(movie_dtype).name, np.dtype(out_dtype).name)
    if key in self._plans:
      return self._plans[key]
    overlap = None
    if self.reference_stitching or self.tiling == "overlap" or (
        self.tiling == "auto" and (self.blend or self.explicit_overlap)):
      plan = self.overlap_plan(shape)
    else:
      overlap = self.overlap_plan(shape) if self.tiling == "auto" else None
      try:
        plan = self._fitted_exact_plan(shape, movie_dtype, out_dtype)
      except UserError as e:
        if overlap is None:
          raise
        log.info("overlap tiling for %s: %s", "x".join(map(str, shape)), e)
        plan = overlap
      if overlap is not None and plan.network_voxels > overlap.network_voxels:
        log.info("overlap tiling for %s: exact tiling would put %.2fx the movie through "
                 "the network within the memory budget, the overlap scheme %.2fx "
                 "(--tiling exact forces it; --memory-budget raises the budget).",
                 "x".join(map(str, shape)), plan.recompute, overlap.recompute)
        plan = overlap
    parallel.check_spatial(plan.tile[1], self.spatial)
    self._check_batch(plan)
    self._plans[key] = plan
    return plan

  def _check_batch(self, plan: TilePlan) -> None:
    """Refuse, before anything is compiled, a --batch-size whose tiles cannot fit one
    device's memory budget (every call holds the whole batch)."""
    if self.engine.default_batch:
      return
    n_data = parallel.device_count(self.mesh)
    per_device = max(1, self.batch_size // n_data) / self.spatial
    params = sum(np.asarray(p).nbytes for p in jax.tree_util.tree_leaves(
        self.model.params))
    need = per_device * float(np.prod(plan.tile)) * self._bytes_per_voxel() + 2 * params
    budget = memory_budget(list(self.mesh.devices.flat), self.memory_budget)
    if need > budget:
      raise UserError(f"--batch-size {self.batch_size}: {per_device:g} tiles of "
                      f"{'x'.join(map(str, plan.tile))} per device and call need about "
                      f"{format_bytes(need)}, over the memory budget of "
                      f"{format_bytes(budget)} per device; lower --batch-size (0: one "
                      "tile per device) or raise --memory-budget.")

  def _fitted_exact_plan(self, shape, movie_dtype, out_dtype) -> TilePlan:
    """The exact plan; with tiles from the budget, shrunk until the compiled step fits."""
    scale = 1.0
    for _ in range(4):
      plan = self.exact_plan(shape, scale)
      if self.tile is not None:
        return plan
      _, compiled = self.engine.prepare(plan, movie_dtype, out_dtype=out_dtype,
                                        channels=self.channels,
                                        prior=self.model.config.model.mean_prior)
      need = compiled_bytes(compiled)
      budget = memory_budget(list(self.mesh.devices.flat), self.memory_budget)
      if need is None or need <= budget:
        return plan
      log.info("exact tiles of %s need %.2f GB per device by XLA's analysis, over the "
               "%.2f GB budget; using smaller tiles.", "x".join(map(str, plan.tile)),
               need / 1e9, budget / 1e9)
      scale *= 0.9 * budget / need
    raise UserError(f"exact tiles for a {'x'.join(map(str, shape))} movie do not fit the "
                    f"memory budget of {budget / 1e9:.2f} GB per device; raise "
                    "--memory-budget or use --tiling overlap.")

  def prior_for(self, movie: Movie, prior: np.ndarray | None = None) -> np.ndarray | None:
    """The mean image a mean-prior model is given: `prior`, or the movie's own."""
    if not self.model.config.model.mean_prior:
      return None
    image = movie.mean_image() if prior is None else np.asarray(prior, np.float32)
    if tuple(image.shape) != tuple(movie.shape[1:]):
      raise UserError(f"the mean image is {tuple(image.shape)} but {movie.name} has "
                      f"frames of {movie.shape[1]}x{movie.shape[2]}; give the mean image "
                      "of this recording.")
    return image

  # -- running ------------------------------------------------------------------

  def normalisation(self, movie: Movie, mean: float | None = None,
                    scale: float | None = None) -> Normalisation:
    """How `movie` is normalised for this model (`normalise.for_movie`): its own
    mean and, for a model normalised by spread, its own spread; a `mean` given comes
    with the model's scale, a `scale` given is used as it is."""
    data = self.model.config.data
    return normalise.for_movie(movie, data.normalise, self.model.scale, mean, scale)

  def frames(self, movie: Movie, *, out_dtype: Any = np.float32,
             stats: DenoiseStats | None = None, mean: float | None = None,
             progress: bool = False, prior: np.ndarray | None = None,
             slabs: tuple[int, int] | None = None, scale: float | None = None
             ) -> Iterator[Frames]:
    """The denoised movie as consecutive `Frames` in `out_dtype` (rounded, clipped).

    Args:
      movie: the noisy movie (a `Movie`, array or path).
      out_dtype: the frames' dtype.
      stats: a `DenoiseStats` filled in as it runs.
      mean: the movie's mean intensity (default: computed from the movie).
      progress: print a progress line.
      prior: the mean image for a mean-prior model (default: the movie's own).
      slabs: only the plan's slabs [a, b) (default all; see `Engine.run`).
      scale: the movie's scale (default: `normalisation`).
    """
    movie = as_movie(movie)
    norm = self.normalisation(movie, mean, scale)
    plan = self.plan(movie.shape, movie.dtype, out_dtype)
    return self.engine.run(movie, plan, mean=float(norm.mean), scale=float(norm.scale),
                           prior=self.prior_for(movie, prior),
                           out_dtype=out_dtype, channels=self.channels, slabs=slabs,
                           stats=stats, progress=progress)

  def blocks(self, movie: Movie, stats: DenoiseStats | None = None, mean=None,
             progress: bool = False, prior: np.ndarray | None = None,
             slabs: tuple[int, int] | None = None, scale: float | None = None
             ) -> Iterator[np.ndarray]:
    """Denoised float32 blocks of frames, in order ((n, Y, X, channels) with
    uncertainty: [mean, std, samples...]).

    Args:
      movie, stats, mean, progress, prior, slabs, scale: as for `frames`.
    """
    for f in self.frames(movie, stats=stats, mean=mean, progress=progress, prior=prior,
                         slabs=slabs, scale=scale):
      yield f.data if f.extras is None else Channels.join(f.data, f.extras)


INFER_FIX = ("lower --memory-budget or --batch-size, give a smaller --tile, or use "
             "--tiling overlap with a smaller --patch")


def as_denoiser(model: Model | str | os.PathLike | Denoiser,
                config: DenoiseConfig | None = None, devices=None, **options: Any
                ) -> Denoiser:
  """`model` as a `Denoiser`: built with `config`, `options` (DenoiseConfig fields)
  and `devices`, or the Denoiser given, which already holds its settings (then giving
  settings again is refused rather than half-used)."""
  if not isinstance(model, Denoiser):
    return Denoiser(model, config, devices=devices, **options)
  if options or devices is not None or config is not None:
    given = sorted(options) + (["devices"] if devices is not None else []) + (
        ["config"] if config is not None else [])
    raise UserError(f"a Denoiser already holds its settings; give {', '.join(given)} "
                    "when building it, not again here.")
  return model


@resources.device_memory("denoising", INFER_FIX)
def denoise(movie: Any, model: Model | str | Denoiser, config: DenoiseConfig | None = None,
            *, output_dtype: Any = None, devices: Sequence[jax.Device] | None = None,
            progress: bool = False, brightness: str = "regional", **options: Any
            ) -> np.ndarray | tuple[np.ndarray, ...]:
  """Denoise a (T, Y, X) movie (array, path or Movie) with a trained model.

  Args:
    movie: the noisy movie.
    model: a `Model`, a model directory, a DeepCAD-RT .pth or a `Denoiser` (which holds
      its own settings; then give no config or options).
    config: how to run the model (`config.DenoiseConfig`; default: the model's own).
    output_dtype: None (float32, the network's precision), 'input' (the input's dtype,
      rounded and clipped on the device) or a dtype.
    devices: the devices to use (default: all).
    progress: print a progress line.
    brightness: 'regional' (each region of the output keeps the raw movie's mean:
      `brightness.py`, fitted on this movie) or 'model' (the network's output as it is).
    **options: `DenoiseConfig` fields that replace `config`'s: tiling, tile,
      memory_budget, batch_size, dtype, symmetries, save_samples, patch, overlap, blend,
      reference_stitching, spatial.

  Returns:
    The denoised movie in the input's shape; with `symmetries` = K, (mean, std) over K
    test-time symmetries (times the ensemble's members), std float32; `save_samples`
    adds a third item, the float32 samples (S, T, Y, X).
  """
  movie = as_movie(movie)
  mode = brightness_lib.check_mode(brightness)
  den = as_denoiser(model, config, devices, **options)
  out_dtype = resolve_output_dtype(output_dtype, movie.dtype)
  out = np.empty(movie.shape, out_dtype)
  extra = np.empty((den.channels - 1,) + movie.shape, np.float32) if den.channels else None
  if mode == "model":
    blocks = ((f.data, f.extras) for f in den.frames(movie, out_dtype=out_dtype,
                                                     progress=progress))
  else:
    store = np.empty(movie.shape + ((den.channels,) if den.channels else ()), np.float32)
    correction = brightness_lib.fit(movie, den.blocks(movie, progress=progress),
                                    den.model.config, store)
    log.info("%s: %s", movie.name, correction.describe())
    blocks = brightness_lib.correct(brightness_lib.chunks(store), correction, out_dtype)
  start = 0
  for data, extras in blocks:
    out[start:start + len(data)] = data
    if extra is not None:
      extra[:, start:start + len(data)] = np.moveaxis(extras, -1, 0)
    start += len(data)
  if extra is None:
    return out
  return (out, extra[0]) if len(extra) == 1 else (out, extra[0], extra[1:])


def denoise_with(movie: Any, tile_fn: TileFn, plan: TilePlan, *, params: Any = None,
                 mean: float | None = None, batch_size: int = 0, devices=None,
                 channels: int = 0, out_dtype: Any = np.float32) -> np.ndarray:
  """Any network on normalised tiles (`tile_fn(params, tiles, prior)`) applied to a
  movie with `plan`: the inference engine without a model (tests, research on tiling).

  Args:
    movie: the movie (array, path or `Movie`).
    tile_fn: the network on normalised tiles (`step.TileFn`).
    plan: the tile plan for the movie's shape.
    params: `tile_fn`'s parameters.
    mean: the movie's mean intensity (default: computed from the movie).
    batch_size: tiles per call (0: one per device).
    devices: the devices to use (default: all).
    channels: values per output voxel that `tile_fn` gives (0: plain frames).
    out_dtype: the output's dtype.

  Returns:
    The denoised movie in `out_dtype` (float32 by default), (T, Y, X), or
    (T, Y, X, channels) with `channels`.
  """
  movie = as_movie(movie)
  mean = movie.mean() if mean is None else float(mean)
  engine = Engine(tile_fn, params, parallel.data_mesh(devices), batch_size)
  parts = [f.data if f.extras is None else Channels.join(f.data, f.extras)
           for f in engine.run(movie, plan, mean=mean, channels=channels,
                               out_dtype=out_dtype)]
  return np.concatenate(parts)


def whole_movie_forward(movie: np.ndarray, den: Denoiser, mean: float | None = None,
                        prior: np.ndarray | None = None) -> np.ndarray:
  """The denoiser's network applied once to the whole movie, padded (reflected) to a
  multiple of 8 on every axis and cropped back: what exact tiling must reproduce.
  float32, mean added back; for tests and the seam measurement (needs the whole movie
  in memory)."""
  movie = np.asarray(movie, np.float32)
  norm = den.normalisation(as_movie(movie), mean)
  shape = movie.shape
  padded = tuple(-(-n // GRID) * GRID for n in shape)
  idx = [reflect_index(np.arange(p), n) for p, n in zip(padded, shape)]
  x = norm.to_network(movie)[idx[0]][:, idx[1]][:, :, idx[2]]
  p = None
  image = den.prior_for(as_movie(movie), prior)
  if image is not None:
    p = norm.to_network(image)[idx[1]][:, idx[2]][None]
  out = jax.jit(den.network)(den.engine.params, jnp.asarray(x[None]),
                             None if p is None else jnp.asarray(p))
  out = np.asarray(out)[0, :shape[0], :shape[1], :shape[2]]
  if out.ndim == 3:
    return norm.from_network(out)
  return Channels.join(norm.from_network(Channels.mean(out)), np.concatenate(
      [norm.spread_from_network(Channels.std(out))[..., None],
       norm.from_network(Channels.samples(out))], axis=-1))
