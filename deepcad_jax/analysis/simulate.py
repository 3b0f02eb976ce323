"""Synthetic two-photon calcium movies with ground truth (a small NAOMi in spirit).

Neurons are soft ellipsoidal somata with a dim nucleus (GCaMP is cytosolic); the
neuropil is a smooth random field that follows the population activity slowly; optional
vessels cast dark stripes. Each neuron fires Poisson spikes; calcium is the spike train
convolved with a GCaMP-like kernel (1 - exp(-t/rise)) * exp(-t/decay). The clean movie is
scaled to a photon level chosen so that, after Poisson shot noise plus Gaussian read
noise, the noisy movie has the requested SNR (dB, as the paper defines it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import numpy as np

from deepcad_jax.runtime import resources
from deepcad_jax.data.metadata import MovieMetadata
from deepcad_jax.data.movie import refuse_to_overwrite
from deepcad_jax.data.writers import MovieWriter, output_space
from deepcad_jax.runtime.files import AtomicFile, check_space, os_error, outputs_together
from deepcad_jax.errors import UserError, check_number, check_seed
from deepcad_jax.analysis.metrics import snr_db


@dataclasses.dataclass(frozen=True)
class SimulationParams:
  shape: tuple[int, int, int] = (300, 128, 128)  # (T, Y, X)
  snr_db: float = -2.0           # target SNR of the noisy movie against the clean one
  photons: float | None = None   # mean photons per voxel instead (then snr_db is ignored)
  neurons: int | None = None     # default: about one per 300 pixels
  soma_radius: float = 5.0       # pixels
  vessels: int = 1
  frame_rate: float = 30.0       # Hz
  spike_rate: float = 0.3        # Hz per neuron
  tau_rise: float = 0.05         # s (GCaMP6f-like)
  tau_decay: float = 0.4         # s
  dff_per_spike: float = 1.0     # peak dF/F of one spike
  neuropil: float = 0.3          # neuropil brightness relative to a resting soma
  neuropil_coupling: float = 0.5  # how much the neuropil follows population activity
                                  # (0: a constant background, e.g. to measure wobble)
  read_noise: float = 1.0        # Gaussian read noise, in photons
  noise_correlation: float = 0.0  # correlation of the noise of x-neighbouring pixels
                                  # (0 to 0.5; e.g. 0.36 as an amplifier's bandwidth)
  gain: float = 1.0              # intensity units per photon of the written movies
  offset: float = 0.0            # intensity of zero photons (a camera's or ADC's offset)
  seed: int = 0

  def __post_init__(self):
    t, y, x = self.shape
    if t < 2 or y < 8 or x < 8:
      raise UserError(f"simulated shape {self.shape} is too small; use at least "
                      "2 frames of 8x8 pixels.")
    check_number("--snr", self.snr_db, at_most=100)
    check_number("--neurons", self.neurons, at_least=1, whole=True)
    check_number("--vessels", self.vessels, at_least=0, whole=True)
    check_number("--frame-rate", self.frame_rate, above=0)
    check_number("--spike-rate", self.spike_rate, at_least=0, below=self.frame_rate,
                 fix="at most one spike per frame (--frame-rate)")
    check_number("--tau-rise", self.tau_rise, above=0)
    check_number("--tau-decay", self.tau_decay, above=0)
    check_number("--read-noise", self.read_noise, at_least=0)
    check_number("--neuropil-coupling", self.neuropil_coupling)
    check_seed("--seed", self.seed)
    if self.photons is not None and not (np.isfinite(self.photons) and self.photons > 0):
      raise UserError(f"--photons must be a positive number; got {self.photons}.")
    if not 0 <= self.noise_correlation <= 0.5:
      raise UserError(f"the noise correlation of neighbouring pixels must be in [0, 0.5]; "
                      f"got {self.noise_correlation}.")
    if not (np.isfinite(self.gain) and self.gain > 0 and np.isfinite(self.offset)):
      raise UserError(f"the gain must be positive and the offset finite; got gain "
                      f"{self.gain}, offset {self.offset}.")


# Peak bytes per voxel while simulating (float32 clean and noisy movies, Poisson counts
# as int64, float64 read noise, and the float64 copies the SNR takes), plus one float32
# footprint image per neuron.
BYTES_PER_VOXEL = 40


def check_memory(p: SimulationParams, where: str = "") -> None:
  """Refuses a simulation that cannot fit the host's available memory."""
  t, y, x = p.shape
  n = p.neurons if p.neurons is not None else max(1, (y * x) // 300)
  need = BYTES_PER_VOXEL * float(t) * y * x + 4.0 * n * y * x
  resources.check_fits(need, resources.host_available_bytes(), "this machine",
                       f"{where}simulating a movie of shape {tuple(p.shape)} "
                       f"({float(t) * y * x:.3g} voxels, {n} neurons)",
                       "use a smaller --shape (or fewer --neurons)")


def gcamp_kernel(frame_rate: float, tau_rise: float, tau_decay: float) -> np.ndarray:
  """Calcium response to one spike, peak 1, sampled at the frame rate."""
  t = np.arange(int(np.ceil(8 * tau_decay * frame_rate)) + 2) / frame_rate
  k = (1 - np.exp(-t / tau_rise)) * np.exp(-t / tau_decay)
  return k / k.max()


def _smooth_field(rng, shape, scale: float) -> np.ndarray:
  """A smooth positive random field in [0, 1] (Gaussian low-pass of white noise)."""
  f = np.fft.rfft2(rng.normal(size=shape))
  ky = np.fft.fftfreq(shape[0])[:, None]
  kx = np.fft.rfftfreq(shape[1])[None, :]
  f *= np.exp(-(ky**2 + kx**2) * (scale**2) * 2 * np.pi**2)
  field = np.fft.irfft2(f, s=shape)
  return (field - field.min()) / (np.ptp(field) + 1e-12)


def _somata(rng, n, shape, radius):
  """(n, Y, X) soma footprints with a dim nucleus, soft edges."""
  yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
  footprints = np.zeros((n,) + shape, np.float32)
  for i in range(n):
    cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
    ry, rx = radius * rng.uniform(0.8, 1.25, size=2)
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dy * np.cos(theta) + dx * np.sin(theta)) / ry
    v = (-dy * np.sin(theta) + dx * np.cos(theta)) / rx
    d = np.sqrt(u**2 + v**2)
    soma = 1 / (1 + np.exp((d - 1) / 0.12))
    nucleus = 1 / (1 + np.exp((d - 0.45) / 0.08))
    footprints[i] = soma * (1 - 0.7 * nucleus) * rng.uniform(0.6, 1.0)
  return footprints


def _vessel_mask(rng, n, shape) -> np.ndarray:
  """Multiplicative shadow of `n` gently curved vessels."""
  mask = np.ones(shape, np.float32)
  yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
  for _ in range(n):
    y0, angle = rng.uniform(0, shape[0]), rng.uniform(-0.5, 0.5)
    width = rng.uniform(2.0, 4.0)
    bend = rng.uniform(-0.002, 0.002)
    centre = y0 + np.tan(angle) * xx + bend * (xx - shape[1] / 2)**2
    mask *= 1 - 0.8 * np.exp(-((yy - centre) / width)**2)
  return mask


def photon_scale(clean: np.ndarray, snr: float, read_noise: float) -> float:
  """Scale s so that Poisson(s*c) + N(0, read_noise^2) has the expected SNR `snr` dB.

  SNR = s^2 sum c^2 / (s sum c + N read_noise^2); solved for s.
  """
  a = float(np.sum(clean.astype(np.float64)**2))
  b = float(np.sum(clean, dtype=np.float64))
  r = 10 ** (snr / 10)
  c = clean.size * read_noise**2
  return (r * b + np.sqrt((r * b)**2 + 4 * a * r * c)) / (2 * a)


def correlate_along_x(noise: np.ndarray, r: float) -> np.ndarray:
  """Noise whose x-neighbours correlate by `r` (<= 0.5), of the same variance:
  (n[x] + k n[x-1]) / sqrt(1 + k^2) with k / (1 + k^2) = r."""
  k = (1 - np.sqrt(1 - 4 * r * r)) / (2 * r)
  shifted = np.concatenate([noise[..., -1:], noise[..., :-1]], axis=-1)
  return ((noise + k * shifted) / np.sqrt(1 + k * k)).astype(np.float32)


def simulate(params: SimulationParams | None = None, **overrides: Any
             ) -> tuple[np.ndarray, np.ndarray, dict]:
  """(noisy, clean, info): float32 movies (T, Y, X) in photons, and what was made."""
  p = dataclasses.replace(params or SimulationParams(), **overrides)
  check_memory(p)
  rng = np.random.default_rng(p.seed)
  t, y, x = p.shape
  n = p.neurons if p.neurons is not None else max(1, (y * x) // 300)
  footprints = _somata(rng, n, (y, x), p.soma_radius)

  spikes = rng.random((n, t)) < p.spike_rate / p.frame_rate
  kernel = gcamp_kernel(p.frame_rate, p.tau_rise, p.tau_decay)
  calcium = np.stack([np.convolve(s.astype(np.float32), kernel)[:t] for s in spikes])
  amplitude = p.dff_per_spike * rng.uniform(0.6, 1.4, size=(n, 1))
  traces = (1 + amplitude * calcium).astype(np.float32)  # F / F0 per neuron

  neuropil_map = p.neuropil * (0.5 + 0.5 * _smooth_field(rng, (y, x), 12.0))
  population = calcium.mean(0) if n else np.zeros(t)
  neuropil_trace = 1 + p.neuropil_coupling * (population - population.mean())
  vessels = _vessel_mask(rng, p.vessels, (y, x))

  clean = (traces.T @ footprints.reshape(n, -1)).reshape(t, y, x)
  clean += neuropil_trace[:, None, None].astype(np.float32) * neuropil_map[None]
  clean *= vessels[None]
  clean = clean.astype(np.float32)
  if clean.min() < 0:  # the neuropil follows a population far above its mean
    raise UserError(f"with --spike-rate {p.spike_rate:g} and --neuropil-coupling "
                    f"{p.neuropil_coupling:g} the simulated neuropil becomes negative; "
                    "lower either.")

  scale = photon_scale(clean, p.snr_db, p.read_noise) if p.photons is None else \
      p.photons / float(clean.mean(dtype=np.float64))
  clean *= np.float32(scale)
  noisy = rng.poisson(clean).astype(np.float32)
  noisy += rng.normal(0, p.read_noise, size=noisy.shape).astype(np.float32)
  if p.noise_correlation > 0:
    noisy = clean + correlate_along_x(noisy - clean, p.noise_correlation)
  snr = snr_db(noisy, clean)  # in photons: an offset would change the clean power
  mean_photons = float(clean.mean())
  if p.gain != 1 or p.offset != 0:
    clean = clean * np.float32(p.gain) + np.float32(p.offset)
    noisy = noisy * np.float32(p.gain) + np.float32(p.offset)
  info = {"params": dataclasses.asdict(p), "neurons": n, "photon_scale": scale,
          "mean_photons": mean_photons, "snr_db": snr,
          "spikes": int(spikes.sum())}
  return noisy, clean, info


# Where the movies go for each output format (suite2p: a plane folder each, int16).
MOVIE_NAMES = {"tiff": "{}.tif", "hdf5": "{}.h5", "zarr": "{}.zarr", "nwb": "{}.nwb",
               "suite2p": "suite2p:{}"}


def write_simulation(folder: str, overwrite: bool = False, movie_format: str = "tiff",
                     **kwargs: Any) -> dict:
  """Simulate and write noisy.tif, clean.tif (float32, with the frame interval; or
  another `movie_format`: hdf5, zarr, nwb, suite2p) and info.json into `folder`; the
  three appear together, once complete."""
  if movie_format not in MOVIE_NAMES:
    raise UserError(f"simulate writes {', '.join(MOVIE_NAMES)}; got {movie_format!r}.")
  name = MOVIE_NAMES[movie_format]
  paths = {k: (name.format(os.path.join(folder, k)) if k != "info" else
               os.path.join(folder, "info.json")) for k in ("noisy", "clean", "info")}
  refuse_to_overwrite(paths.values(), overwrite)
  params = SimulationParams(**kwargs)
  check_memory(params, f"{folder}: ")
  check_space([output_space(paths[k], params.shape, np.float32)
               for k in ("noisy", "clean")])
  noisy, clean, info = simulate(params)
  made, above = [], os.path.abspath(folder)
  while not os.path.isdir(above) and os.path.dirname(above) != above:
    made.append(above)  # folders this run creates: removed again if it fails
    above = os.path.dirname(above)
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise os_error(e, paths["noisy"]) from None
  info.update(noisy=paths["noisy"], clean=paths["clean"])
  metadata = MovieMetadata(kind="tiff", frame_interval=1.0 / params.frame_rate)
  try:
    with outputs_together() as files:
      for key, movie in (("noisy", noisy), ("clean", clean)):
        files.append(MovieWriter(paths[key], movie.shape[1:], np.float32,
                                 frames=len(movie), metadata=metadata,
                                 overwrite=overwrite))
        files[-1].write(movie)
      files.append(AtomicFile(paths["info"], overwrite=overwrite))
      json.dump(info, files[-1].text(), indent=1)
  except BaseException:
    for path in made:  # deepest first; only if left empty
      with contextlib.suppress(OSError):
        os.rmdir(path)
    raise
  return info


def describe(info: dict) -> str:
  """What `write_simulation` wrote, in a line for the command line."""
  shape = tuple(info["params"]["shape"])
  return (f"wrote {info['noisy']} and {info['clean']}: {shape}, SNR "
          f"{info['snr_db']:.2f} dB, {info['mean_photons']:.3g} photons/voxel")
