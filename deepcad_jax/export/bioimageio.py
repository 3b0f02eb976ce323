"""The bioimage.io format: a BioImage Model Zoo package (model spec 0.5) with the ONNX
graph and the PyTorch state dict as weights, test tensors, a cover, documentation and
citations.
"""

from __future__ import annotations

import errno
import io
import logging
import os
from importlib import metadata
from typing import Sequence

import numpy as np
import tifffile

from deepcad_jax.data.movie import as_movie, refuse_to_overwrite
from deepcad_jax.runtime.files import AtomicFile, check_space, os_error, temporary_folder
from deepcad_jax.errors import UserError
from deepcad_jax.analysis.simulate import simulate
from deepcad_jax.denoising.tiling import ceil_to, reach_by_residue
from deepcad_jax.data.png import png_bytes
from deepcad_jax.export.network import ExportReport, Network, _need, forward, relative_rms
from deepcad_jax.export.onnx import ONNX_OPSET, onnx_model, run_onnx
from deepcad_jax.export.pth import torch_state_dict, write_torch_state_dict

log = logging.getLogger("deepcad_jax")


# bioimage.io tools may cut tiles anywhere (not on the pooling grid), so the halo is the
# network's whole reach (51 voxels), rounded up to a multiple of 8: 56.
HALO = ceil_to(max(max(r) for r in reach_by_residue()))


BIOIMAGEIO_MIN = ceil_to(2 * HALO + 1)  # smallest input per axis: a multiple of 8 above
                                        # 2 x HALO (120)


_CITATIONS = (
    ("Li, X., Li, Y., Zhou, Y. et al. Real-time denoising enables high-sensitivity "
     "fluorescence time-lapse imaging beyond the shot-noise limit. Nat. Biotechnol. "
     "(2022).", "10.1038/s41587-022-01450-8"),
    ("Li, X., Zhang, G., Wu, J. et al. Reinforcing neuron extraction and spike inference "
     "in calcium imaging using deep self-supervised denoising. Nat. Methods 18, "
     "1395-1400 (2021).", "10.1038/s41592-021-01225-0"),
)


def cover_image(raw: np.ndarray, denoised: np.ndarray, zoom: int = 2) -> bytes:
  """PNG of one raw frame beside the same frame denoised (2:1), with the denoised
  frame's 0.5-99.5 percentile contrast on both."""
  lo, hi = np.percentile(denoised, [0.5, 99.5])
  both = np.concatenate([raw, denoised], axis=1).astype(np.float64)
  scaled = np.clip((both - lo) / max(hi - lo, 1e-12), 0, 1) * 255
  image = np.round(scaled).astype(np.uint8)
  return png_bytes(np.repeat(np.repeat(image, zoom, 0), zoom, 1))


def _sample_movie(sample: str, size: int):
  movie = as_movie(sample)
  if min(movie.shape) < size:
    raise UserError(f"{sample} is {movie.shape}; a bioimage.io test input needs at least "
                    f"{size} frames of {size}x{size} pixels, so give a larger --sample.")
  return movie


def _test_movie(movie, mean: float, size: int) -> tuple[np.ndarray, str]:
  """A (size, size, size) block: the centre of `movie` (a sample Movie), or without one
  a simulated calcium movie brought to the normalisation mean; with a sentence saying
  which."""
  if movie is not None:
    t0, y0, x0 = ((n - size) // 2 for n in movie.shape)
    block = movie.read(t0, t0 + size)[:, y0:y0 + size, x0:x0 + size]
    return block.astype(np.float32), f"the centre of {os.path.basename(movie.name)}"
  noisy, _, _ = simulate(shape=(size, size, size), seed=0)
  if mean > 0:  # at the model's intensity; whole counts where that is bright enough
    noisy = noisy * np.float32(mean / max(float(noisy.mean()), 1e-12))
    noisy = np.round(noisy) if mean >= 10 else noisy  # (whole counts compress better)
  else:
    noisy = noisy - np.float32(noisy.mean() - mean)
  return noisy.astype(np.float32), "a simulated calcium-imaging movie (deepcad-jax simulate)"


def _package_readme(net: Network, mean: float, what_input: str, parity: float | None,
                    weights: Sequence[str]) -> str:
  f, s = net.features, net.scale
  member = f" (member {net.member} of an ensemble)" if net.member is not None else ""
  measured = (f"ONNX Runtime reproduced that output with a relative RMS difference of "
              f"{parity:.1e}." if parity is not None else "")
  return f"""# DeepCAD-RT denoiser (f={f}), exported by deepcad-jax

A DeepCAD-RT 3D U-Net{member} for self-supervised denoising of fluorescence
time-lapse movies (two-photon calcium imaging and similar). It was trained (or
converted from a DeepCAD-RT .pth) with deepcad-jax and exported with
`deepcad-jax export --format bioimageio`. Source model: `{net.model.source}`.

## Network

Four levels of width {f}, {2 * f}, {4 * f}, {8 * f}; two 3x3x3 convolutions with bias
and ReLU per level; 2x2x2 max pooling; nearest upsampling to the skip's size; a final
1x1x1 convolution to one channel. Weights: {', '.join(weights)}.

## Input and output

One tensor `raw` with axes (batch, channel, time, y, x), one channel: a stretch of the
movie. Each of time, y and x must be at least {BIOIMAGEIO_MIN} and a multiple of 8 beyond
that. The network sees about +-51 voxels around each output voxel, so tiles overlap by a
halo of {HALO} on every axis. The output `denoised` has the input's shape.

Preprocessing subtracts {mean:g} (the mean intensity of the training data) and divides
by {s:g} (DeepCAD-RT's `scale_factor`); postprocessing undoes both. DeepCAD-RT and
`deepcad-jax denoise` subtract each movie's own mean instead, so recordings whose mean
differs much from {mean:g} are best denoised there.

## Validation

The package's test input is {what_input}; the test output is what the JAX network
(deepcad-jax) computes from it.
{measured}

The model was trained self-supervised on noisy recordings, without ground truth: check
its results on a movie of the kind it was trained on, for example against a simulated
movie with known ground truth (`deepcad-jax simulate` and `deepcad-jax evaluate`),
before relying on it.

## Citation

Please cite DeepCAD-RT (Li et al., Nature Biotechnology 2022,
doi:10.1038/s41587-022-01450-8) and DeepCAD (Li et al., Nature Methods 2021,
doi:10.1038/s41592-021-01225-0).
"""


def _bioimageio_error(e: Exception) -> UserError:
  text = " ".join(str(e).split())
  return UserError(f"the bioimage.io description is not valid ({text[:300]}); check "
                   "--name, --author and --license.")


def _disk_error(e: BaseException, output: str) -> UserError | None:
  """The sentence of a file-system error that a library wrapped (bioimage.io's
  validation reads the files it was given: a full disk is not invalid metadata)."""
  seen = e
  while seen is not None:
    if isinstance(seen, OSError):
      return os_error(seen, output)
    seen = seen.__cause__ or seen.__context__
  text = str(e)
  for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
    if os.strerror(code) in text:
      return os_error(OSError(code, os.strerror(code)), output)
  return None


def export_bioimageio(net: Network, output: str, *, mean: float | None = None,
                      sample: str | None = None, name: str | None = None,
                      authors: Sequence[str] = (), license: str = "CC-BY-4.0",
                      opset: int = ONNX_OPSET, overwrite: bool = False) -> ExportReport:
  """A BioImage Model Zoo package (zip, model spec 0.5) at `output`.

  Args:
    net: the network (from `network(model, "bioimageio")`).
    output: the .zip to write.
    mean: the intensity subtracted before the network (default: the training data's
      mean, which a converted .pth does not record: then the mean of `sample`).
    sample: a TIFF movie whose centre becomes the test input and the cover (default: a
      simulated movie).
    name, authors, license: the package's metadata (SPDX license id).
    opset: ONNX opset of the ONNX weights.
    overwrite: replace an existing `output`.
  """
  refuse_to_overwrite([output], overwrite)
  if mean is None:
    mean = net.model.mean
  movie = None if sample is None else _sample_movie(sample, BIOIMAGEIO_MIN)
  if mean is None and movie is not None:
    mean = movie.mean()
  if mean is None:
    raise UserError(f"{net.model.source} does not record the mean intensity of its "
                    "training data (a converted DeepCAD-RT .pth); give it with --mean, "
                    "or give --sample with a typical recording.")
  spec = _need("bioimageio.spec", "bioimage.io export")
  log.info("building the bioimage.io package: a %d^3 test input through the network and "
           "ONNX Runtime, the weights, then the format's validation...", BIOIMAGEIO_MIN)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  from bioimageio.spec.model import v0_5 as bm
  from bioimageio.spec.model.v0_5 import AxisId, TensorId
  model_onnx = onnx_model(net, opset)
  # room for the package's files (in a temporary folder beside it) and the package
  check_space([(output, 4 * model_onnx.ByteSize() + 2**22)])
  mean, s, size = float(mean), net.scale, BIOIMAGEIO_MIN
  raw, what_input = _test_movie(movie, mean, size)
  x = raw[None, None]
  gain, offset = np.float32(1 / s), np.float32(-mean / s)
  normalised = x * gain + offset
  y = forward(net, normalised) if net.uniform else run_onnx(model_onnx, normalised)
  out = (y * np.float32(s) + np.float32(mean)).astype(np.float32)
  parity = None
  try:
    parity = relative_rms(run_onnx(model_onnx, normalised), y) if net.uniform else None
  except UserError:
    pass
  if parity is not None and not parity <= 1e-5:
    raise UserError(f"ONNX Runtime and JAX disagree on this model (relative RMS "
                    f"{parity:.2e} > 1e-5); nothing was written.")

  with temporary_folder(os.path.dirname(os.path.abspath(output)), "bioimageio") as tmp:
    def path(name: str, data: bytes) -> str:
      full = os.path.join(tmp, name)
      with open(full, "wb") as fh:
        fh.write(data)
      return full

    def npy(name: str, array: np.ndarray) -> str:
      buffer = io.BytesIO()
      np.save(buffer, array)
      return path(name, buffer.getvalue())

    def tiff(name: str, frames: np.ndarray) -> str:
      full = os.path.join(tmp, name)
      tifffile.imwrite(full, frames, photometric="minisblack", compression="zlib",
                       metadata={"axes": "TYX"})
      return full

    weights_names = ["ONNX (opset %d)" % opset]
    onnx_file = path("deepcad_rt.onnx", model_onnx.SerializeToString())
    # The state dict is the original; the ONNX graph is built from the same tensors.
    parent = "pytorch_state_dict" if net.uniform else None
    weights = {"onnx": bm.OnnxWeightsDescr(source=onnx_file, opset_version=opset,
                                           parent=parent)}
    if net.uniform:
      pth = os.path.join(tmp, "deepcad_rt.pth")
      write_torch_state_dict(torch_state_dict(net.params), pth)
      arch_src = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              "torch_reference.py")
      with open(arch_src, "rb") as fh:
        arch = path("deepcad_rt_network.py", fh.read())
      weights["pytorch_state_dict"] = bm.PytorchStateDictWeightsDescr(
          source=pth, pytorch_version=bm.Version(_torch_version()),
          architecture=bm.ArchitectureFromFileDescr(
              source=arch, callable=bm.Identifier("Network_3D_Unet"),
              kwargs={"f_maps": net.features}))
      weights_names.append("PyTorch state dict (DeepCAD-RT's keys)")
    t = size // 2
    cover = path("cover.png", cover_image(raw[t], out[0, 0, t]))
    samples = slice(t - 4, t + 4)  # a few frames for people to look at
    sample_in = tiff("sample_input.tif", raw[samples])
    sample_out = tiff("sample_output.tif", out[0, 0, samples])
    readme = path("README.md", _package_readme(net, mean, what_input, parity,
                                               weights_names).encode())
    size_param = bm.ParameterizedSize(min=size, step=8)
    ref = lambda axis: bm.SizeReference(tensor_id=TensorId("raw"), axis_id=AxisId(axis))
    preprocessing = [bm.EnsureDtypeDescr(kwargs=bm.EnsureDtypeKwargs(dtype="float32"))]
    postprocessing = []
    if gain != 1 or offset != 0:
      preprocessing.append(bm.ScaleLinearDescr(kwargs=bm.ScaleLinearKwargs(
          gain=float(gain), offset=float(offset))))
      postprocessing.append(bm.ScaleLinearDescr(kwargs=bm.ScaleLinearKwargs(
          gain=float(s), offset=mean)))
    postprocessing.append(bm.EnsureDtypeDescr(kwargs=bm.EnsureDtypeKwargs(dtype="float32")))
    f = net.features
    try:
      descr = bm.ModelDescr(
          name=name or f"DeepCAD-RT denoiser f{f} (deepcad-jax)",
          description=(f"DeepCAD-RT 3D U-Net (width {f}) for self-supervised denoising "
                       "of fluorescence time-lapse movies such as two-photon calcium "
                       "imaging; exported by deepcad-jax."),
          authors=[bm.Author(name=a) for a in (authors or ["unknown"])],
          cite=[bm.CiteEntry(text=text, doi=bm.Doi(doi)) for text, doi in _CITATIONS],
          license=license, documentation=bm.FileDescr(source=readme),
          covers=[bm.FileDescr(source=cover)],
          tags=["denoising", "self-supervised", "3d", "unet", "deepcad-rt",
                "calcium-imaging", "two-photon", "fluorescence-light-microscopy",
                "onnx", "pytorch"],
          inputs=[bm.InputTensorDescr(
              id=TensorId("raw"), description="noisy movie stretch (T, Y, X)",
              axes=[bm.BatchAxis(), bm.ChannelAxis(channel_names=[bm.Identifier("raw")]),
                    bm.TimeInputAxis(size=size_param),
                    bm.SpaceInputAxis(id=AxisId("y"), size=size_param),
                    bm.SpaceInputAxis(id=AxisId("x"), size=size_param)],
              test_tensor=bm.FileDescr(source=npy("test_input.npy", x)),
              sample_tensor=bm.FileDescr(source=sample_in),
              data=bm.IntervalOrRatioDataDescr(type="float32"),
              preprocessing=preprocessing)],
          outputs=[bm.OutputTensorDescr(
              id=TensorId("denoised"), description="denoised movie stretch",
              axes=[bm.BatchAxis(),
                    bm.ChannelAxis(channel_names=[bm.Identifier("denoised")]),
                    bm.TimeOutputAxisWithHalo(size=ref("time"), halo=HALO),
                    bm.SpaceOutputAxisWithHalo(id=AxisId("y"), size=ref("y"), halo=HALO),
                    bm.SpaceOutputAxisWithHalo(id=AxisId("x"), size=ref("x"), halo=HALO)],
              test_tensor=bm.FileDescr(source=npy("test_output.npy", out)),
              sample_tensor=bm.FileDescr(source=sample_out),
              data=bm.IntervalOrRatioDataDescr(type="float32"),
              postprocessing=postprocessing)],
          weights=bm.WeightsDescr(**weights),
          config={"deepcad_jax": {
              "features": f, "scale_factor": s, "mean": mean, "source": net.model.source,
              "member": net.member, "test_input": what_input}})
    except Exception as e:  # pydantic's ValidationError: the metadata given is invalid
      if isinstance(e, UserError):
        raise
      raise _disk_error(e, output) or _bioimageio_error(e) from None
    package = AtomicFile(output, overwrite=True)
    try:
      package.open()  # the package is saved over this run's own temporary file
      spec.save_bioimageio_package(descr, output_path=package.temp)
      package.commit()
    except BaseException as e:
      package.abort()
      if isinstance(e, OSError):
        raise os_error(e, output) from None
      if isinstance(e, ValueError) and not isinstance(e, UserError):
        raise _disk_error(e, output) or _bioimageio_error(e) from None
      raise
  report = ExportReport("bioimageio", os.path.abspath(output), [os.path.abspath(output)],
                        os.path.getsize(output), f)
  if parity is not None:
    report.parity[f"onnxruntime vs JAX, relative RMS on the test input {x.shape}"] = parity
  report.notes += [f"weights: {', '.join(weights_names)}",
                   f"normalisation: (x - {mean:g}) / {s:g}; test input: {what_input}",
                   f"check it with: bioimageio test {output}"]
  return report


def _torch_version() -> str:
  """The installed PyTorch's version (for the package's metadata), else 1.6 (the
  oldest that reads the zip format the state dict is written in)."""
  try:
    return metadata.version("torch").split("+")[0]
  except metadata.PackageNotFoundError:
    return "1.6"
