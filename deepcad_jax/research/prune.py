"""Structured pruning of a trained network: whole channels out, a smaller U-Net left.

Every 3x3x3 convolution's output channels get an importance score; scores are divided
by their layer's mean so that layers compare, and the least important channels of the
whole network are removed one by one until the parameter count is at most `keep` times
the original. The U-Net stays consistent: an encoder level's output channels are also
the skip half of its decoder's concatenated input, so removing one removes it from
both consumers. The result has its own width per layer (`ModelConfig.widths`), saves
and loads like any model, and fine-tunes with `train --init-from`.

Criteria:
- 'l1': the L1 norm of a channel's kernel and bias (magnitude pruning; no data).
- 'taylor': the first-order Taylor estimate of the loss change when the channel is
  removed, |mean over voxels of activation x gradient| (Molchanov et al. 2017), from the
  training objective on pairs drawn from a movie.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepcad_jax import config as config_lib
from deepcad_jax.model_io.checkpoint import Model
from deepcad_jax.data.movie import Movie, as_movie
from deepcad_jax.errors import UserError, check_number, check_seed
from deepcad_jax.core.losses import loss_fn
from deepcad_jax.core.network import (LAYERS, LEVELS, Conv3D, UNet3D, flops_per_voxel,
                                      network_input, param_count, uniform_widths,
                                      widths_of)
from deepcad_jax.core.normalise import for_movie

log = logging.getLogger("deepcad_jax")

CRITERIA = ("l1", "taylor")
MIN_CHANNELS = 1  # every layer keeps at least this many


def conv_inputs(widths: Sequence[int], in_channels: int = 1
                ) -> dict[tuple[str, str], list[tuple[tuple[str, str] | None, int]]]:
  """For every conv (and 'final'), the producers of its input channels in order:
  [(producing layer or None for the movie, number of channels), ...]."""
  w = dict(zip(LAYERS, widths))
  inputs = {}
  prev: tuple[str, str] | None = None
  for level in range(LEVELS):
    enc = f"encoder_{level}"
    inputs[(enc, "conv1")] = [(prev, in_channels if prev is None else w[prev])]
    inputs[(enc, "conv2")] = [((enc, "conv1"), w[(enc, "conv1")])]
    prev = (enc, "conv2")
  for level in range(LEVELS - 2, -1, -1):
    dec, skip = f"decoder_{level}", (f"encoder_{level}", "conv2")
    inputs[(dec, "conv1")] = [(skip, w[skip]), (prev, w[prev])]
    inputs[(dec, "conv2")] = [((dec, "conv1"), w[(dec, "conv1")])]
    prev = (dec, "conv2")
  inputs[("final", "")] = [(prev, w[prev])]
  return inputs


def parameters(widths: Sequence[int], in_channels: int = 1) -> int:
  """Parameters of the network with these conv widths (kernels and biases)."""
  w = dict(zip(LAYERS, widths))
  total = 0
  for layer, sources in conv_inputs(widths, in_channels).items():
    cin = sum(n for _, n in sources)
    if layer == ("final", ""):
      total += cin + 1
    else:
      total += 27 * cin * w[layer] + w[layer]
  return total


def _layer(params: Any, layer: tuple[str, str]) -> dict:
  module, conv = layer
  return params[module][conv] if conv else params[module]


def l1_scores(params: Any) -> dict[tuple[str, str], np.ndarray]:
  """Per output channel: the L1 norm of its kernel and bias, over the kernel's size."""
  out = {}
  for layer in LAYERS:
    p = _layer(params, layer)
    kernel = np.abs(np.asarray(p["kernel"], np.float64))
    out[layer] = (kernel.sum(axis=(0, 1, 2, 3)) + np.abs(np.asarray(p["bias"]))) / \
        np.prod(kernel.shape[:4])
  return out


def taylor_scores(model: Model, movie: Movie | np.ndarray, batches: int = 8,
                  seed: int = 0) -> dict[tuple[str, str], np.ndarray]:
  """Per output channel: |mean over voxels of activation x d(loss)/d(activation)|,
  averaged over `batches` training pairs drawn from `movie` (the model's patch)."""
  movie = as_movie(movie)
  cfg = model.config
  pt, py, px = (min(p, n) for p, n in zip(cfg.data.patch, (movie.shape[0] // 2,) +
                                           tuple(movie.shape[1:])))
  pt, py, px = (max(8, p // 8 * 8) for p in (pt, py, px))
  if movie.shape[0] < 2 * pt or min(movie.shape[1:]) < 8:
    raise UserError(f"{movie.name} {movie.shape} is too small for the Taylor criterion "
                    f"(needs {2 * pt} frames of at least 8x8); use --criterion l1 or a "
                    "longer movie.")
  norm = for_movie(movie, cfg.data.normalise, model.scale)
  prior_image = None
  if cfg.model.mean_prior:
    prior_image = norm.to_network(movie.mean_image())
  net = UNet3D(model.features, widths=cfg.model.widths)
  rng = np.random.default_rng(seed)

  def loss_given_masks(masks, x, y, prior):
    def intercept(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      if isinstance(module, Conv3D) and context.method_name == "__call__":
        key = tuple(module.path[-2:])
        if key in masks:
          out = out * masks[key]
      return out
    with nn.intercept_methods(intercept):
      out = net.apply({"params": model.params}, network_input(x, prior))[..., 0]
    return loss_fn(out, y, cfg.train.loss)

  grad = jax.jit(jax.grad(loss_given_masks))
  masks = {layer: jnp.ones(w, jnp.float32) for layer, w in
           zip(LAYERS, widths_of(model.params))}
  total = {layer: np.zeros(m.shape, np.float64) for layer, m in masks.items()}
  for _ in range(batches):
    t0 = int(rng.integers(0, movie.shape[0] - 2 * pt + 1))
    y0 = int(rng.integers(0, movie.shape[1] - py + 1))
    x0 = int(rng.integers(0, movie.shape[2] - px + 1))
    window = norm.to_network(movie.read(t0, t0 + 2 * pt)[:, y0:y0 + py, x0:x0 + px])
    prior = None if prior_image is None else prior_image[None, y0:y0 + py, x0:x0 + px]
    g = grad(masks, window[None, 0::2], window[None, 1::2], prior)
    for layer in total:
      total[layer] += np.abs(np.asarray(g[layer], np.float64))
  return {layer: v / batches for layer, v in total.items()}


def choose_channels(scores: dict[tuple[str, str], np.ndarray], keep: float,
                    in_channels: int = 1) -> dict[tuple[str, str], np.ndarray]:
  """The channels to keep in every layer (sorted indices): the globally least important
  (scores over their layer's mean) go first, until the parameters are at most `keep`
  of the original; every layer keeps at least MIN_CHANNELS."""
  if not 0 < keep <= 1:
    raise UserError(f"--keep is the fraction of parameters to keep, in (0, 1]; got {keep}.")
  widths = [len(scores[layer]) for layer in LAYERS]
  target = keep * parameters(widths, in_channels)
  order = []
  for i, layer in enumerate(LAYERS):
    s = np.asarray(scores[layer], np.float64)
    norm = s / s.mean() if s.mean() > 0 else np.ones_like(s)
    order += [(float(v), i, int(c)) for c, v in enumerate(norm)]
  order.sort()
  removed = [set() for _ in LAYERS]
  current = list(widths)
  for _, i, c in order:
    if parameters(current, in_channels) <= target:
      break
    if current[i] <= MIN_CHANNELS:
      continue
    removed[i].add(c)
    current[i] -= 1
  return {layer: np.array(sorted(set(range(widths[i])) - removed[i]), np.int64)
          for i, layer in enumerate(LAYERS)}


def prune_params(params: Any, keep: dict[tuple[str, str], np.ndarray],
                 in_channels: int = 1) -> Any:
  """The parameters with only the kept channels (every consumer's input sliced too)."""
  widths = widths_of(params)
  out = jax.tree_util.tree_map(np.asarray, params)
  out = {m: dict(v) for m, v in out.items()}
  for layer, sources in conv_inputs(widths, in_channels).items():
    cin = []
    offset = 0
    for producer, n in sources:
      cin.append(np.arange(n) + offset if producer is None else keep[producer] + offset)
      offset += n
    cin = np.concatenate(cin)
    p = dict(_layer(out, layer))
    kernel = np.asarray(p["kernel"])[..., cin, :]
    if layer in keep:
      kernel, p["bias"] = kernel[..., keep[layer]], np.asarray(p["bias"])[keep[layer]]
    p["kernel"] = kernel
    module, conv = layer
    if conv:
      out[module] = {**out[module], conv: p}
    else:
      out[module] = p
  return out


@dataclasses.dataclass
class PruneReport:
  source: str
  criterion: str
  keep: float
  widths_before: tuple[int, ...]
  widths_after: tuple[int, ...]
  parameters_before: int
  parameters_after: int
  flops_before: float          # per voxel
  flops_after: float

  def describe(self, written: str | None = None) -> str:
    """The report's lines for the command line (`written`: where the model went)."""
    lines = [
        f"pruned {self.source} ({self.criterion}, keep {self.keep:g}): "
        f"{self.parameters_before:,} -> {self.parameters_after:,} parameters "
        f"({self.parameters_after / self.parameters_before:.1%}), "
        f"{self.flops_before:,.0f} -> {self.flops_after:,.0f} FLOPs per voxel",
        f"widths (encoder 0..3, then decoder 2..0, two convs each): "
        f"{list(self.widths_before)} -> {list(self.widths_after)}"]
    if written:
      lines.append(f"wrote {written}; fine-tune it: deepcad-jax train --init-from "
                   f"{written} --data ... --workdir ...")
    return "\n".join(lines)


def prune(model: Model, keep: float, criterion: str = "l1",
          data: Movie | np.ndarray | str | None = None, batches: int = 8,
          seed: int = 0) -> tuple[Model, PruneReport]:
  """A smaller model with whole channels removed, and what changed.

  Args:
    model: a trained single network (not an ensemble).
    keep: the fraction of parameters to keep, in (0, 1].
    criterion: 'l1' or 'taylor' (needs `data`).
    data: a movie (path, array or Movie) for the Taylor criterion.
    batches: training pairs the Taylor criterion averages over.
    seed: where those pairs are drawn.
  """
  check_number("--batches", batches, at_least=1, whole=True)
  check_seed("seed", seed)
  if criterion not in CRITERIA:
    raise UserError(f"--criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}.")
  if model.config.model.ensemble > 1:
    raise UserError(f"{model.source} is an ensemble of {model.config.model.ensemble}; "
                    "prune a single network (train one, or export a member).")
  in_channels = model.config.model.in_channels
  before = widths_of(model.params)
  if criterion == "taylor":
    if data is None:
      raise UserError("--criterion taylor needs --data: a movie to draw training pairs "
                      "from (the Taylor estimate uses the loss).")
    scores = taylor_scores(model, as_movie(data) if not isinstance(data, Movie) else data,
                           batches, seed)
  else:
    scores = l1_scores(model.params)
  kept = choose_channels(scores, keep, in_channels)
  params = prune_params(model.params, kept, in_channels)
  after = widths_of(params)
  widths = None if after == uniform_widths(model.features, in_channels) else after
  cfg = config_lib.from_dict({**model.config.to_dict(), "model": {
      **model.config.to_dict()["model"], "widths": widths}})
  meta = model.meta.replace(config=cfg, provenance={
      **model.meta.provenance, "pruned_from": model.source,
      "prune": {"criterion": criterion, "keep": keep, "widths_before": list(before),
                "widths_after": list(after)}})
  pruned = dataclasses.replace(model, params=params, meta=meta,
                               source=f"{model.source} pruned to {keep:g}")
  report = PruneReport(model.source, criterion, keep, before, after,
                       param_count(model.params), param_count(params),
                       flops_per_voxel(before, in_channels),
                       flops_per_voxel(after, in_channels))
  return pruned, report
