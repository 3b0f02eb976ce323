import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import noisy_movie, tiny_config, write_tiff
from deepcad_jax import UNet3D, UserError, cli, denoise, load_model
from deepcad_jax import train
from deepcad_jax.model_io.convert import read_para, read_state_dict, to_flax_params
from deepcad_jax.denoising.denoiser import denoise_with
from deepcad_jax.denoising.tiling import overlap_plan
from deepcad_jax.core.network import param_count

torch = pytest.importorskip("torch", reason="parity tests need PyTorch "
                            "(pip install torch==2.13.0)")
from deepcad_jax.export.torch_reference import Network_3D_Unet, from_flax_params  # noqa: E402

pytestmark = pytest.mark.torch


def _save(model_or_state, path):
  state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else \
      model_or_state
  torch.save(state, path)
  return str(path)


@pytest.mark.parametrize("features,shape", [(4, (16, 24, 20)), (16, (19, 33, 26))])
def test_parity_with_pytorch(tmp_path, features, shape):
  torch.manual_seed(features)
  net = Network_3D_Unet(features).eval()
  pth = _save(net, tmp_path / "model.pth")
  params, f = to_flax_params(read_state_dict(pth))
  assert f == features
  assert param_count(params) == sum(p.numel() for p in net.parameters())
  x = np.random.default_rng(0).normal(size=(2, 1) + shape).astype(np.float32)
  with torch.no_grad():
    expected = net(torch.from_numpy(x)).numpy()[:, 0]
  got = np.asarray(jax.jit(UNet3D(features).apply)({"params": params},
                                                    x[:, 0, ..., None]))[..., 0]
  assert np.max(np.abs(got - expected)) <= 1e-4


def test_flax_weights_round_trip_to_pytorch():
  from deepcad_jax.core.network import init_params
  params = init_params(4, 0)
  net = from_flax_params(params, 4)
  x = np.random.default_rng(1).normal(size=(1, 1, 16, 16, 16)).astype(np.float32)
  with torch.no_grad():
    expected = net(torch.from_numpy(x)).numpy()[:, 0]
  got = np.asarray(jax.jit(UNet3D(4).apply)({"params": params}, x[:, 0, ..., None]))[..., 0]
  assert np.max(np.abs(got - expected)) <= 1e-4


def test_dataparallel_prefix_is_stripped(tmp_path):
  net = Network_3D_Unet(4)
  state = {f"module.{k}": v for k, v in net.state_dict().items()}
  params, f = to_flax_params(read_state_dict(_save(state, tmp_path / "dp.pth")))
  np.testing.assert_array_equal(
      params["final"]["bias"], net.state_dict()["Generator.final_conv.bias"].numpy())


def test_wrong_missing_and_misshaped_keys_are_named(tmp_path):
  state = Network_3D_Unet(4).state_dict()
  extra = dict(state, **{"Generator.extra.weight": torch.zeros(3)})
  with pytest.raises(UserError, match="unexpected key.*Generator.extra.weight"):
    to_flax_params(read_state_dict(_save(extra, tmp_path / "extra.pth")))
  missing = {k: v for k, v in state.items() if "decoders.1" not in k}
  with pytest.raises(UserError, match="lacks 4 expected key.*decoders.1"):
    to_flax_params(read_state_dict(_save(missing, tmp_path / "missing.pth")))
  bad = dict(state, **{"Generator.final_conv.weight": torch.zeros(1, 5, 1, 1, 1)})
  with pytest.raises(UserError, match=r"final_conv.weight has shape \(1, 5, 1, 1, 1\)"):
    to_flax_params(read_state_dict(_save(bad, tmp_path / "bad.pth")))


def test_a_pickle_that_calls_a_function_is_refused_without_running_it(tmp_path):
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    zf.writestr("archive/version", "3\n")
  with pytest.raises(UserError, match=r"asks to load (posix|os)\.system.*refusing"):
    read_state_dict(str(path))
  assert not marker.exists()


def test_truncated_and_legacy_files_get_clear_errors(tmp_path):
  good = _save(Network_3D_Unet(4), tmp_path / "good.pth")
  data = open(good, "rb").read()
  cut = tmp_path / "cut.pth"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(UserError, match="truncated"):
    read_state_dict(str(cut))
  legacy = tmp_path / "legacy.pth"
  torch.save(Network_3D_Unet(4).state_dict(), legacy, _use_new_zipfile_serialization=False)
  with pytest.raises(UserError, match="legacy"):
    read_state_dict(str(legacy))


def test_para_yaml_is_parsed_safely(tmp_path):
  para = tmp_path / "para.yaml"
  para.write_text("patch_x: 150\npatch_y: 128\npatch_t: 160\noverlap_factor: 0.25\n"
                  "fmap: 4\nlr: 5.0e-05\nb1: 0.5\nb2: 0.999\n"
                  "datasets_path: !!python/object/apply:os.system ['echo hi']\n")
  assert read_para(str(para)) == {"patch_x": 150, "patch_y": 128, "patch_t": 160,
                                  "overlap_factor": 0.25, "fmap": 4, "lr": 5e-05,
                                  "b1": 0.5, "b2": 0.999}


def test_scale_factor_from_para_is_applied(tmp_path):
  torch.manual_seed(3)
  net = Network_3D_Unet(4).eval()
  folder = tmp_path / "m"
  folder.mkdir()
  pth = _save(net, folder / "model.pth")
  (folder / "para.yaml").write_text("patch_x: 16\npatch_y: 16\npatch_t: 16\n"
                                    "overlap_factor: 0.25\nscale_factor: 4\n")
  movie = np.random.default_rng(0).poisson(40, (16, 16, 16)).astype(np.float32)
  model = load_model(pth)
  assert model.config.data.scale == 4.0
  got = denoise(movie, model, output_dtype="float32", brightness="model")
  x = (movie - movie.mean(dtype=np.float64)) / 4  # the reference: x / s - mean(x / s)
  with torch.no_grad():
    expected = net(torch.from_numpy(x[None, None].astype(np.float32))).numpy()[0, 0]
  np.testing.assert_allclose(got, expected * 4 + movie.mean(dtype=np.float64), atol=2e-3)


def _reference_stitch(movie, net, patch, overlap):
  """DeepCAD-RT's test loop, written out: coordinates, later write wins, rescale."""
  mean = movie.mean(dtype=np.float64)
  x = movie.astype(np.float32) - np.float32(mean)
  out = np.zeros_like(x)
  dims = []
  for n, p in zip(movie.shape, patch):
    gap = int(p * (1 - overlap))
    cut = (p - gap) / 2
    num = int(np.ceil((n - p + gap) / gap))
    coords = []
    for i in range(num):
      init = gap * i if i != num - 1 else n - p
      if num == 1:
        coords.append((init, 0, p, 0, p))
      elif i == 0:
        coords.append((init, 0, int(p - cut), 0, int(p - cut)))
      elif i == num - 1:
        coords.append((init, int(n - p + cut), n, int(cut), p))
      else:
        coords.append((init, int(gap * i + cut), int(gap * i + p - cut), int(cut),
                       int(p - cut)))
    dims.append(coords)
  for cy in dims[1]:          # the reference's loop order: y, then x, then t
    for cx in dims[2]:
      for ct in dims[0]:
        sl = tuple(slice(c[0], c[0] + p) for c, p in zip((ct, cy, cx), patch))
        res = np.asarray(net(x[sl][None]))[0]
        local = tuple(slice(c[3], c[4]) for c in (ct, cy, cx))
        glob = tuple(slice(c[1], c[2]) for c in (ct, cy, cx))
        o, r = res[local] + np.float32(mean), x[sl][local] + np.float32(mean)
        out[glob] = o * np.float32(np.sqrt(np.sum(r, dtype=np.float64) /
                                           np.sum(o, dtype=np.float64))) - np.float32(mean)
  return out + np.float32(mean)


@pytest.mark.parametrize("shape,patch,overlap", [((40, 50, 45), (16, 16, 16), 0.25),
                                                 ((33, 37, 29), (16, 24, 16), 0.5),
                                                 ((30, 45, 45), (16, 15, 15), 0.1)])
def test_reference_stitching_reproduces_the_reference_loop(shape, patch, overlap):
  movie = np.random.default_rng(0).poisson(30, shape).astype(np.float32)

  def net(batch):  # a non-trivial position-dependent "network"
    b = np.asarray(batch)
    return 0.5 * b + 0.01 * np.cumsum(b, axis=-1)

  def tile_fn(params, tiles, prior):  # the same on the device
    return 0.5 * tiles + 0.01 * jnp.cumsum(tiles, axis=-1)

  expected = _reference_stitch(movie, net, patch, overlap)
  one = jax.devices()[:1]
  got = denoise_with(movie, tile_fn, overlap_plan(shape, patch, overlap, reference=True),
                     batch_size=2, devices=one)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
  plain = denoise_with(movie, tile_fn, overlap_plan(shape, patch, overlap), batch_size=2,
                       devices=one)
  assert not np.allclose(plain, expected, atol=1e-2)  # the default does not rescale


def test_convert_cli_then_denoise_and_fine_tune(capsys, tmp_path):
  torch.manual_seed(0)
  net = Network_3D_Unet(4)
  folder = tmp_path / "deepcad_rt_model"
  folder.mkdir()
  pth = _save(net, folder / "E_01_Iter_0100.pth")
  (folder / "para.yaml").write_text("patch_x: 24\npatch_y: 24\npatch_t: 16\n"
                                    "overlap_factor: 0.25\nfmap: 4\n")
  out_dir = str(tmp_path / "converted")
  assert cli.main(["deepcad-jax", "convert", "--pth", pth, "--output", out_dir]) == 0
  out = capsys.readouterr().out
  assert "features=4" in out and "(16, 24, 24)" in out and "para.yaml" in out
  assert cli.main(["deepcad-jax", "convert", "--pth", pth, "--output", out_dir]) == 2
  assert "already holds a model" in capsys.readouterr().err

  movie, _ = noisy_movie((40, 30, 30))
  src = write_tiff(tmp_path / "movie.tif", movie)
  from_dir = denoise(movie, out_dir, output_dtype="float32")
  from_pth = denoise(movie, pth, output_dtype="float32")
  np.testing.assert_allclose(from_dir, from_pth, rtol=1e-6, atol=1e-4)
  assert load_model(pth).config.infer.patch == (16, 24, 24)
  code = cli.main(["deepcad-jax", "denoise", "--model", pth, "--input", src, "--output",
                   str(tmp_path / "den.tif"), "--reference-stitching"])
  assert code == 0, capsys.readouterr().err

  result = train(src, str(tmp_path / "tuned"), tiny_config(**{"model.features": 8,
                                                              "train.epochs": 1}),
                 init_from=out_dir, devices=jax.devices()[:1], progress=False)
  assert result.meta["features"] == 4 and result.step == 16
  code = cli.main(["deepcad-jax", "train", "--config", "tiny", "--data", src, "--workdir",
                   str(tmp_path / "tuned2"), "--epochs", "1", "--init-from", pth,
                   "--batch-size", "4"])
  assert code == 0, capsys.readouterr().err
  assert load_model(str(tmp_path / "tuned2")).features == 4
