"""The benchmark suite: throughput and memory, measured honestly on any device.

Every workload compiles ahead of time (compile time reported separately), warms up,
then times many runs with `block_until_ready`, and reports the median and spread,
voxels/s, achieved FLOP/s (from XLA's cost analysis), peak memory (the device's memory
stats on GPU/TPU, peak RSS on the CPU) and where the numbers came from (device, jax
version, git commit). Where PyTorch is installed, the same network with the same weights
is timed on the same patches in the same run, so CPU and GPU results compare fairly.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepcad_jax import config as config_lib
from deepcad_jax.runtime import parallel, resources
from deepcad_jax.errors import UserError, check_number
from deepcad_jax.denoising.denoiser import Denoiser, denoise
from deepcad_jax.denoising.memory import bytes_per_voxel, compiled_bytes
from deepcad_jax.core.network import LADDER, UNet3D, init_params, param_count
from deepcad_jax.denoising.step import identity_tiles
from deepcad_jax.stream import StreamDenoiser, run_pipeline
from deepcad_jax.denoising.tiling import patch_plan
from deepcad_jax.training.step import compile_step, create_state, make_model
from deepcad_jax.bench.measure import (_compile, _compiled_memory, _flops, _patches,
                                       _random_model, _record, _shape, _starting,
                                       environment, measure)

log = logging.getLogger("deepcad_jax")

# The paper's figures (Li et al. 2022, RTX 3090, PyTorch, batch 1).
PAPER = {"movie": (300, 490, 490), "patch": (150, 150, 150), "overlap": 0.4,
         "patches": 75, "inference_s": 8.0, "acquisition_s": 9.6, "train_step_s": 0.37,
         "tensorrt_fp16_memory_bytes": 701 * 2**20}
QUICK = {"movie": (32, 64, 64), "patch": (16, 32, 32), "overlap": 0.4}
STREAM = {"movie": (600, 512, 512)}  # frames replayed by the stream workload
WORKLOADS = ("quick", "reference", "reference-device", "train-step", "ladder", "scaling",
             "uncertainty", "overhead", "stream")
TILINGS = ("overlap", "exact")  # what `reference` and `overhead` put side by side




def end_to_end(env, movie_shape, patch, overlap, features, dtype, batch_size, repeats,
               name, devices=None, uncertainty: int = 0, members: int = 1,
               tiling: str = "overlap", identity: bool = False) -> dict:
  """Host array in, stitched host array out (what a user waits for).

  A random (Poisson, uint16) movie is denoised by `denoise` with a randomly initialised
  network; the compile time is the engines' ahead-of-time compile time.

  Args:
    env: the environment record (`environment()`).
    movie_shape: the movie's (T, Y, X).
    patch, overlap: the overlap scheme's patch (T, Y, X) and overlap fraction (used
      with `tiling` 'overlap').
    features: the network's width f.
    dtype: compute dtype ('float32' or 'bfloat16').
    batch_size: tiles per network call (0: one per device).
    repeats: timed runs after the untimed warm-up.
    name: the record's workload name.
    devices: the devices to use (default: all).
    uncertainty: K test-time symmetries; the mean and std over K x `members` samples
      (0: plain denoising).
    members: ensemble members M of the random model.
    tiling: 'overlap' (DeepCAD-RT's protocol) or 'exact' (tiles sized from the memory
      budget).
    identity: replace the network by the identity (what the rest costs).

  Returns:
    One record: timing, throughput, the tile plan and the step's compiled memory.
  """
  _starting(name, f"{tiling} tiling of a {_shape(movie_shape)} movie, f={features}"
            + (f", K={uncertainty} M={members}" if uncertainty or members > 1 else "")
            + (", identity network" if identity else ""))
  rng = np.random.default_rng(0)
  movie = rng.poisson(200, movie_shape).astype(np.uint16)
  den = Denoiser(_random_model(features, patch, overlap, members), devices=devices,
                 patch=patch if tiling == "overlap" else None,
                 overlap=overlap if tiling == "overlap" else None, batch_size=batch_size,
                 dtype=dtype, symmetries=uncertainty, tiling=tiling,
                 network=identity_tiles(2 if uncertainty else 0) if identity else None)
  plan = den.plan(movie.shape, movie.dtype, movie.dtype)
  timing = measure(lambda m: denoise(m, den), (movie,), repeats)
  engines = (den.engine, *den.engine._fewer.values())
  timing.compile_s = sum(e.compile_s for e in engines)  # the step, ahead of time
  steps = [c for e in engines for c in e._compiled.values()]
  memory = [m for m in (compiled_bytes(c) for c in steps) if m]
  return _record(name, env, dtype, den.batch_size, timing, features=features,
                 movie=list(movie_shape), patch=list(plan.tile), overlap=plan.overlap,
                 tiling=plan.mode, plan=plan.describe(), patches=plan.tile_count,
                 voxels=int(np.prod(movie_shape)), network_voxels=plan.network_voxels,
                 recompute=plan.recompute, network="identity" if identity else "unet",
                 step_memory_bytes=max(memory) if memory else None)


def stream_throughput(env, movie_shape, features, dtype, batch_size, name, rate=0.0,
                      core_frames=None, lookahead=None) -> dict:
  """A movie replayed through the live pipeline (acquisition, device, writing):
  sustained voxels/s and the latency from a frame's arrival to its denoised output.

  Args:
    env: the environment record (`environment()`).
    movie_shape: the replayed (random, uint16) movie's (frames, Y, X).
    features: the network's width f (random weights).
    dtype: compute dtype ('float32' or 'bfloat16').
    batch_size: tiles per network call (0: one per device).
    name: the record's workload name.
    rate: the replay rate in frames/s (0: as fast as the pipeline takes them).
    core_frames, lookahead: the `StreamDenoiser`'s (None: its defaults).

  Returns:
    One record of a single run: throughput, latencies (all frames and steady state),
    the stream's plan and the frames dropped.
  """
  _starting(name, f"{movie_shape[0]} frames of {_shape(movie_shape[1:])} replayed"
            + (f" at {rate:g} Hz" if rate else " as fast as possible"))
  movie = np.random.default_rng(0).poisson(200, movie_shape).astype(np.uint16)

  class Source:
    dtype = np.dtype(np.uint16)
    frame_shape = tuple(movie_shape[1:])  # lets run_pipeline compile before it starts

    def frames(self, stop):
      t0 = time.perf_counter()
      for i, frame in enumerate(movie):
        if stop.is_set():
          return
        if rate > 0:
          delay = t0 + i / rate - time.perf_counter()
          if delay > 0:
            time.sleep(delay)
        yield frame

  model = _random_model(features, (16, 32, 32), 0.4)
  den = Denoiser(model, batch_size=batch_size, dtype=dtype)
  stream = StreamDenoiser(den, mean=200.0, core_frames=core_frames, lookahead=lookahead)
  with tempfile.TemporaryDirectory() as tmp:
    report = run_pipeline(Source(), stream, os.path.join(tmp, "live.tif"), rate=rate,
                          output_dtype="float32", progress=False)
  lo, hi = stream.latency_frames()
  rec = _record(name, env, dtype, den.batch_size, None, features=features,
                movie=list(movie_shape), frames=report.frames_out, seconds=report.seconds,
                median_s=report.seconds, voxels=report.frames_out * int(
                    np.prod(movie_shape[1:])), latency_median_s=report.latency_median_s,
                latency_p99_s=report.latency_p99_s, startup_frames=report.startup_frames,
                steady_latency_median_s=report.steady_latency_median_s,
                steady_latency_p99_s=report.steady_latency_p99_s, rate_hz=rate,
                plan=stream.describe(),
                tile_frames=stream.B, core_frames=stream.time.core,
                lookahead=stream.lookahead, wait_frames=[lo, hi],
                patch=list(stream.frame_plan(stream.B).tile), dropped=report.dropped)
  rec["runs"] = 1
  return rec


# (K symmetries, M members) timed by the uncertainty workload; K = 0: plain denoising.
UNCERTAINTY_CASES = ((0, 1), (2, 1), (4, 1), (8, 1), (1, 3), (8, 3))


def uncertainty_cost(env, movie_shape, patch, overlap, features, dtype, batch_size,
                     repeats, name) -> list[dict]:
  """What uncertainty costs: plain denoising, K = 2, 4, 8 symmetries, and a 3-member
  ensemble alone (K = 1) and with K = 8 (UNCERTAINTY_CASES).

  Args:
    env, movie_shape, patch, overlap, features, dtype, batch_size, repeats, name: as
      for `end_to_end`.

  Returns:
    One `end_to_end` record per case, with its `uncertainty` (K) and `members` (M).
  """
  return [dict(end_to_end(env, movie_shape, patch, overlap, features, dtype, batch_size,
                          repeats, name, uncertainty=k, members=m), uncertainty=k, members=m)
          for k, m in UNCERTAINTY_CASES]


def network_only(env, n_patches, patch, features, dtype, batch_size, repeats, name,
                 devices=None, spatial=1) -> dict:
  """The same patches already on the device: the network alone, batch by batch.

  Args:
    env: the environment record (`environment()`).
    n_patches: patches timed (random normal), rounded up to whole batches.
    patch: a patch's (T, Y, X).
    features: the network's width f (random weights).
    dtype: compute dtype ('float32' or 'bfloat16').
    batch_size: patches per network call (0: one per device along 'data').
    repeats: timed runs (each over all the batches) after the untimed warm-up.
    name: the record's workload name.
    devices: the devices to use (default: all).
    spatial: devices splitting each patch's Y axis.

  Returns:
    One record: timing, voxels/s of the `n_patches` patches, FLOPs and compiled memory.
  """
  _starting(name, f"network alone, {n_patches} patch(es) of {_shape(patch)}, f={features}"
            + (f", {len(devices)} device(s)" if devices else ""))
  mesh = parallel.data_mesh(devices, spatial)
  parallel.check_spatial(patch[1], spatial)
  n_dev = parallel.device_count(mesh)
  batch_size = batch_size or n_dev
  net = UNet3D(features, dtype=jnp.dtype(dtype))
  params = jax.device_put(init_params(features, 0), parallel.replicated(mesh))
  n_batches = -(-n_patches // batch_size)
  host = _patches(n_batches * batch_size, patch).reshape((n_batches, batch_size) +
                                                           tuple(patch))
  data = [jax.device_put(b, parallel.batch_sharding(mesh)) for b in host]
  apply = jax.jit(lambda p, b: net.apply({"params": p}, b[..., None])[..., 0],
                  in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                  out_shardings=parallel.batch_sharding(mesh))
  compiled, compile_s = _compile(apply, params, data[0])
  flops_per_batch = _flops(compiled)

  def run_all(p, d):
    return [compiled(p, b) for b in d]

  timing = measure(run_all, (params, data), repeats, compile_s)
  return _record(name, env, dtype, batch_size, timing, features=features, patch=list(patch),
                 patches=n_patches, voxels=n_patches * int(np.prod(patch)), spatial=spatial,
                 flops=flops_per_batch * n_batches if flops_per_batch else None,
                 compiled_memory_bytes=_compiled_memory(compiled))


def train_step(env, patch, features, dtype, batch_size, repeats, name, devices=None,
               spatial=1, widths=None) -> dict:
  """One sharded train step (augmentation, forward, backward, Adam) on random pairs.

  Args:
    env: the environment record (`environment()`).
    patch: a pair's (T, Y, X).
    features: the network's width f.
    dtype: compute dtype ('float32' or 'bfloat16').
    batch_size: the global batch of pairs (0: one per device along 'data').
    repeats: timed steps after the untimed warm-up.
    name: the record's workload name.
    devices: the devices to use (default: all).
    spatial: devices splitting each patch's Y axis.
    widths: a network with its own width per layer (e.g. pruned; default uniform).

  Returns:
    One record: timing, voxels/s, FLOPs, compiled memory and the parameter count.
  """
  _starting(name, f"train step on {_shape(patch)} patches, f={features}"
            + (f", {len(devices)} device(s)" if devices else ""))
  cfg = config_lib.from_dict({"model": {"features": features, "dtype": dtype,
                                        "widths": widths},
                              "data": {"patch": [max(8, p // 8 * 8) for p in patch]}})
  mesh = parallel.data_mesh(devices, spatial)
  parallel.check_spatial(patch[1], spatial)
  batch_size = batch_size or parallel.device_count(mesh)
  state = jax.device_put(create_state(cfg), parallel.replicated(mesh))
  step = compile_step(make_model(cfg), mesh)
  batch = jax.device_put({"input": _patches(batch_size, patch, 1),
                          "target": _patches(batch_size, patch, 2)},
                         parallel.batch_sharding(mesh))
  key = jax.random.key(0)
  compiled, compile_s = _compile(step, state, batch, key)
  holder = [state]

  def run(b, k):
    holder[0], metrics = compiled(holder[0], b, k)
    return metrics["loss"]

  timing = measure(run, (batch, key), repeats, compile_s)
  return _record(name, env, dtype, batch_size, timing, features=features,
                 patch=list(patch), voxels=batch_size * int(np.prod(patch)),
                 flops=_flops(compiled), compiled_memory_bytes=_compiled_memory(compiled),
                 parameters=param_count(state.params), spatial=spatial)


def torch_side_by_side(env, patch, features, batch_size, repeats, name) -> list[dict]:
  """The PyTorch twin with the same weights on the same patches (CPU or CUDA).

  Args:
    env: the environment record (`environment()`).
    patch: a patch's (T, Y, X).
    features: the network's width f (float32).
    batch_size: patches per call.
    repeats: timed runs after the untimed warm-up.
    name: the records' prefix ('<name>-torch-forward', '<name>-torch-train-step').

  Returns:
    The forward and train-step records, or [] when PyTorch is not installed.
  """
  try:
    import torch
  except ImportError:
    return []
  from deepcad_jax.export.torch_reference import from_flax_params
  device = "cuda" if torch.cuda.is_available() else "cpu"
  net = from_flax_params(init_params(features, 0), features).to(device)
  x = torch.from_numpy(_patches(batch_size, patch)[:, None]).to(device)
  y = torch.from_numpy(_patches(batch_size, patch, 2)[:, None]).to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def forward():
    with torch.no_grad():
      out = net(x)
    sync()
    return out

  opt = torch.optim.Adam(net.parameters(), lr=5e-5, betas=(0.5, 0.9))

  def step():
    opt.zero_grad()
    d = net(x) - y
    loss = 0.5 * d.abs().mean() + 0.5 * (d * d).mean()
    loss.backward()
    opt.step()
    sync()
    return loss

  records = []
  for kind, fn in (("forward", forward), ("train-step", step)):
    _starting(f"{name}-torch-{kind}", f"PyTorch on {device}, {_shape(patch)} patches")
    timing = measure(lambda: fn(), (), repeats)
    records.append(_record(f"{name}-torch-{kind}", env, "float32", batch_size, timing,
                           framework=f"torch {torch.__version__} ({device}, "
                           f"{torch.get_num_threads()} threads)", features=features,
                           patch=list(patch), voxels=batch_size * int(np.prod(patch))))
  return records


def ladder(env, patch, dtype, batch_size, repeats, name, widths=None) -> list[dict]:
  """The network alone (one patch) and a train step at each width of the ladder.

  Args:
    env, patch, dtype, batch_size, repeats: as for `network_only` and `train_step`.
    name: the records' prefix ('<name>-infer', '<name>-train').
    widths: the features f to time (default LADDER, the paper's 64 ... 8).

  Returns:
    An inference and a training record per width, each with its parameter count.
  """
  records = []
  for f in widths or LADDER:
    inf = network_only(env, 1, patch, f, dtype, batch_size, repeats, f"{name}-infer")
    trn = train_step(env, patch, f, dtype, batch_size, repeats, f"{name}-train")
    for rec in (inf, trn):
      rec["parameters"] = param_count(jax.eval_shape(lambda f=f: init_params(f, 0)))
    records += [inf, trn]
  return records


def scaling(env, patch, features, dtype, batch_per_device, repeats, name) -> list[dict]:
  """The network alone and a train step on 1, 2, 4, ... devices and on all of them.

  Args:
    env, patch, features, dtype, repeats: as for `network_only` and `train_step`.
    batch_per_device: patches per device (0: 1); the global batch grows with the
      devices, and the network alone is timed on two batches.
    name: the records' prefix ('<name>-infer', '<name>-train').

  Returns:
    An inference and a training record per device count, with `devices_used`.
  """
  records = []
  n = 1
  counts = []
  while n <= jax.device_count():
    counts.append(n)
    n *= 2
  if counts[-1] != jax.device_count():
    counts.append(jax.device_count())
  for n in counts:
    devs = jax.devices()[:n]
    bs = (batch_per_device or 1) * n
    inf = network_only(env, 2 * bs, patch, features, dtype, bs, repeats, f"{name}-infer",
                       devices=devs)
    trn = train_step(env, patch, features, dtype, bs, repeats, f"{name}-train", devices=devs)
    for rec in (inf, trn):
      rec["devices_used"] = n
    records += [inf, trn]
  return records


# Host bytes per movie voxel while a benchmark denoises it: the uint16 movie, the float32
# output and the float32 copy the tiles are cut from.
MOVIE_BYTES_PER_VOXEL = 10


def check_request(movie: Sequence[int], patch: Sequence[int], features: int, dtype: str,
                  batch_size: int, repeats: int | None) -> None:
  """Refuse, before anything runs, numbers a benchmark cannot use and shapes or widths
  this machine's memory cannot hold (one sentence each)."""
  check_number("--features", features, at_least=1, whole=True)
  check_number("--batch-size", batch_size, at_least=0, whole=True)
  check_number("--repeats", repeats, at_least=1, whole=True)
  for flag, shape in (("--movie", movie), ("--patch", patch)):
    for axis, size in zip("TYX", shape):
      check_number(f"{flag} ({axis})", size, at_least=8, whole=True,
                   fix="the network pools three times")
  voxels = float(np.prod(np.asarray(movie, np.float64)))
  resources.check_fits(voxels * MOVIE_BYTES_PER_VOXEL, resources.host_available_bytes(),
                       "the host", f"benchmarking a movie of shape {tuple(movie)}",
                       "give a smaller --movie")
  have, where = resources.device_bytes(jax.devices()[:1])
  need = float(np.prod(np.asarray(patch, np.float64))) * max(1, batch_size) * \
      bytes_per_voxel(features, dtype)
  resources.check_fits(need, have, where, f"the network with f={features} on patch "
                       f"{tuple(patch)}", "give a smaller --features or --patch")


def run_workload(workload: str, dtype: str = "float32", batch_size: int = 0,
                 repeats: int | None = None, features: int = 16,
                 with_torch: bool = True, movie: Sequence[int] | None = None,
                 patch: Sequence[int] | None = None, spatial: int = 1,
                 widths: Sequence[int] | None = None) -> list[dict]:
  """Run one named workload; returns its records, each with the environment.

  Args:
    workload: one of WORKLOADS.
    dtype: compute dtype, one of `config.DTYPES`.
    batch_size: patches per call (0: one per device; per device for 'scaling').
    repeats: timed runs (default: the workload's own, 3 to 10; 'stream' runs once).
    features: the network's width f (not the ladder's).
    with_torch: time the PyTorch twin beside ('quick' and 'train-step').
    movie, patch: replace the workload's shapes (e.g. the paper's protocol on a
      smaller movie); `movie` is the replayed movie for 'stream'.
    spatial: devices splitting each patch's Y axis ('reference-device', 'train-step').
    widths: the ladder's features (default the paper's 64 ... 8).
  """
  if workload not in WORKLOADS:
    raise UserError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}.")
  if dtype not in config_lib.DTYPES:
    raise UserError(f"--dtype must be one of {config_lib.DTYPES}; got {dtype!r}.")
  P = dict(PAPER, **{k: tuple(v) for k, v in (("movie", movie), ("patch", patch)) if v})
  q = dict(QUICK, **{k: tuple(v) for k, v in (("movie", movie), ("patch", patch)) if v})
  shapes = q if workload in ("quick", "uncertainty") else dict(
      P, movie=tuple(movie) if movie else STREAM["movie"]) if workload == "stream" else P
  check_request(shapes["movie"], shapes["patch"], features, dtype, batch_size, repeats)
  env = environment()
  P["patches"] = len(patch_plan(P["movie"], P["patch"], P["overlap"]))
  if workload == "quick":
    r = repeats or 3
    n_patches = len(patch_plan(q["movie"], q["patch"], q["overlap"]))
    recs = [end_to_end(env, q["movie"], q["patch"], q["overlap"], features, dtype,
                       batch_size, r, "quick-reference", tiling=t) for t in TILINGS]
    recs += [network_only(env, n_patches, q["patch"], features, dtype, batch_size, r,
                         "quick-reference-device"),
            train_step(env, q["patch"], features, dtype, batch_size, r, "quick-train-step")]
    recs += ladder(env, q["patch"], dtype, batch_size, r, "quick-ladder")
    recs += scaling(env, q["patch"], features, dtype, batch_size, r, "quick-scaling")
    if with_torch:
      recs += torch_side_by_side(env, q["patch"], features, batch_size or 1, r, "quick")
  elif workload == "reference":
    recs = [end_to_end(env, P["movie"], P["patch"], P["overlap"], features, dtype,
                       batch_size, repeats or 5, "reference", tiling=t) for t in TILINGS]
  elif workload == "overhead":
    recs = [end_to_end(env, P["movie"], P["patch"], P["overlap"], features, dtype,
                       batch_size, repeats or 5, "overhead", tiling=t, identity=True)
            for t in TILINGS]
  elif workload == "stream":
    shape = tuple(movie) if movie else STREAM["movie"]
    recs = [stream_throughput(env, shape, features, dtype, batch_size, "stream")]
  elif workload == "reference-device":
    recs = [network_only(env, P["patches"], P["patch"], features, dtype, batch_size,
                         repeats or 10, "reference-device", spatial=spatial)]
    recs[0].update(tiling="overlap", recompute=recs[0]["voxels"] / np.prod(P["movie"]))
    exact = Denoiser(_random_model(features, P["patch"], P["overlap"]), batch_size=batch_size,
                     dtype=dtype, spatial=spatial, tiling="exact").plan(
                         P["movie"], np.uint16, np.uint16)
    rec = network_only(env, exact.tile_count, exact.tile, features, dtype, batch_size,
                       repeats or 10, "reference-device", spatial=spatial)
    rec.update(tiling="exact", recompute=exact.recompute, plan=exact.describe())
    recs.append(rec)
  elif workload == "train-step":
    recs = [train_step(env, P["patch"], features, dtype, batch_size, repeats or 10,
                       "train-step", spatial=spatial)]
    if with_torch:
      recs += torch_side_by_side(env, P["patch"], features, batch_size or 1,
                                 repeats or 5, "train-step")
  elif workload == "ladder":
    recs = ladder(env, P["patch"], dtype, batch_size, repeats or 5, "ladder", widths)
  elif workload == "uncertainty":
    recs = uncertainty_cost(env, q["movie"], q["patch"], q["overlap"], features, dtype,
                            batch_size, repeats or 3, "uncertainty")
  else:
    recs = scaling(env, P["patch"], features, dtype, batch_size, repeats or 5, "scaling")
  for rec in recs:
    rec["environment"] = env
  return recs



