"""File formats: HDF5, Zarr, NWB, suite2p, raw binaries and ScanImage TIFFs in and out.

Every file is made here, small; each reader is checked against the array written, each
round trip (read, denoise, write, read back) against the TIFF path's result.
"""

import os
import sys

import numpy as np
import pytest
import tifffile

from tests.helpers import noisy_movie, write_tiff
from deepcad_jax import cli
from deepcad_jax.data.formats import caiman
from deepcad_jax.data import writers as output_mod
from deepcad_jax.runtime.files import outputs_together
from deepcad_jax.data.formats import zarr_store
from deepcad_jax.data.movie import list_movies, open_movie
from deepcad_jax.data.writers import write_movie
from deepcad_jax.data.spec import MovieSpec
from deepcad_jax.errors import UserError
from deepcad_jax.denoising.denoiser import denoise
from deepcad_jax.denoising.files import denoise_files
from deepcad_jax.data.formats.suite2p import load_ops

h5py = pytest.importorskip("h5py")
zarr = pytest.importorskip("zarr")
pynwb = pytest.importorskip("pynwb")

pytestmark = pytest.mark.formats

SHAPE = (40, 24, 24)


@pytest.fixture(scope="module")
def movie():
  return noisy_movie(SHAPE, seed=1, dtype=np.int16)[0]


@pytest.fixture(scope="module")
def tiff_result(trained_model, movie, tmp_path_factory):
  """The TIFF path's denoised movie: what every other format must give."""
  root = tmp_path_factory.mktemp("tiff")
  src = write_tiff(root / "movie.tif", movie)
  denoise_files(src, str(root / "den.tif"), trained_model, progress=False)
  return open_movie(str(root / "den.tif")).read(0, SHAPE[0])


def one_sentence(error: UserError) -> str:
  text = str(error)
  assert "\n" not in text and text.endswith(".") and "Traceback" not in text
  return text


def run(capsys, *args):
  code = cli.main(["deepcad-jax", *args])
  out, err = capsys.readouterr()
  assert "Traceback" not in err
  return code, out, err


# ---------------------------------------------------------------- HDF5


def test_allen_hdf5_round_trip(trained_model, movie, tiff_result, tmp_path):
  src = tmp_path / "allen.h5"
  with h5py.File(src, "w") as f:
    f.create_dataset("data", data=movie, chunks=(8, 24, 24))
    f["max_projection"] = movie.max(0)
  m = open_movie(str(src))
  assert m.shape == SHAPE and m.dtype == np.int16
  np.testing.assert_array_equal(m.read(5, 9), movie[5:9])
  out = str(tmp_path / "den.h5")
  denoise_files(str(src), out, trained_model, progress=False)  # format follows the input's
  with h5py.File(out, "r") as f:
    data = f["data"]
    assert data.shape == SHAPE and data.dtype == np.float32
    assert data.chunks is not None and data.attrs["axes"] == "TYX"
    np.testing.assert_allclose(data[:], tiff_result, rtol=0, atol=1e-5)


def test_sima_yxt_hdf5_round_trip_to_zarr(trained_model, movie, tiff_result, tmp_path):
  src = tmp_path / "sima.h5"
  with h5py.File(src, "w") as f:
    f.create_dataset("imaging", data=np.moveaxis(movie, 0, -1))  # (y, x, t)
  with pytest.raises(UserError) as e:  # (24, 24, 40) read as TYX would be wrong: say so?
    open_movie(f"{src}[axes=YX]")
  assert "give each of T, Y, X once" in one_sentence(e.value)
  m = open_movie(f"{src}[axes=YXT]")
  assert m.shape == SHAPE
  np.testing.assert_array_equal(m.read(3, 7), movie[3:7])
  out = str(tmp_path / "den.zarr")
  denoise_files(f"{src}[axes=YXT]", out, trained_model, progress=False)
  z = zarr.open(out, mode="r")
  assert z.shape == SHAPE and z.dtype == np.float32
  np.testing.assert_allclose(z[:], tiff_result, rtol=0, atol=1e-5)
  assert [k for k in os.listdir(tmp_path) if k.startswith(".")] == []  # no temporary left


def test_hdf5_bad_dataset_and_axes_are_one_sentence(movie, tmp_path):
  src = tmp_path / "two.h5"
  with h5py.File(src, "w") as f:
    f["a/movie"] = movie
    f["b/movie"] = movie
    f["vol"] = np.stack([movie[:, :8, :8]] * 2, 1)
  with pytest.raises(UserError) as e:
    open_movie(str(src))
  text = one_sentence(e.value)
  assert "several movie-like datasets" in text and "/a/movie (40, 24, 24)" in text
  with pytest.raises(UserError) as e:
    open_movie(f"{src}:/nope")
  text = one_sentence(e.value)
  assert "has no dataset '/nope'" in text and "/b/movie" in text
  with pytest.raises(UserError) as e:
    open_movie(f"{src}:/vol")
  assert "--axes (e.g. --axes TZYX or TCYX)" in one_sentence(e.value)
  with pytest.raises(UserError) as e:
    open_movie(f"{src}:/vol[axes=TYX]")
  assert "name 3 axes but" in one_sentence(e.value)
  np.testing.assert_array_equal(open_movie(f"{src}:/b/movie").read(0, 2), movie[:2])


def test_large_hdf5_is_read_in_pieces(movie, tmp_path):
  src = tmp_path / "big.h5"
  with h5py.File(src, "w") as f:
    f.create_dataset("data", data=movie, chunks=(4, 24, 24))
  m = open_movie(str(src))
  asked = []
  array = m._layout.array

  class Spy:
    shape, dtype = array.shape, array.dtype

    def __getitem__(self, index):
      asked.append(index[0])
      return array[index]

  m._layout.array = Spy()
  frame_bytes = 24 * 24 * 2
  blocks = list(m.chunks(max_bytes=6 * frame_bytes))
  assert len(blocks) == 7 and all(len(b) <= 6 for _, b in blocks)
  np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), movie)
  assert all(s.stop - s.start <= 6 for s in asked)  # never the whole file at once
  assert m.mean() == pytest.approx(float(movie.mean()))


def test_volumetric_hdf5_is_split_into_planes(trained_model, movie, tmp_path):
  src = tmp_path / "vol.h5"
  vol = np.stack([movie, movie[::-1]], 1)  # (T, Z, Y, X)
  with h5py.File(src, "w") as f:
    f["data"] = vol
    f["data"].dims[0].label, f["data"].dims[1].label = "t", "z"
    f["data"].dims[2].label, f["data"].dims[3].label = "y", "x"
  parts = list_movies(str(src))  # the dimension labels say the axes
  assert parts == [f"{src}[plane=0]", f"{src}[plane=1]"]
  np.testing.assert_array_equal(open_movie(parts[1]).read(0, 40), movie[::-1])
  with pytest.raises(UserError) as e:
    open_movie(str(src))
  assert "recording of 2 planes; give one" in one_sentence(e.value)
  reports = denoise_files(str(src), str(tmp_path / "den.h5"), trained_model,
                          progress=False)
  out = str(tmp_path / "den.h5")  # one file, the input's layout, a slice per plane
  assert [r.output for r in reports] == [f"{out}[plane=0]", f"{out}[plane=1]"]
  with h5py.File(out, "r") as f:
    assert f["data"].shape == (40, 2, 24, 24) and f["data"].attrs["axes"] == "TZYX"
    assert [d.label for d in f["data"].dims] == ["t", "z", "y", "x"]
  for r in reports:
    assert open_movie(r.output).shape == SHAPE
  # a plane asked for alone is a movie of its own, named as before
  one = denoise_files(f"{src}[plane=1]", str(tmp_path / "one.h5"), trained_model,
                      progress=False)
  assert os.path.basename(one[0].output) == "one_plane1.h5"
  np.testing.assert_allclose(open_movie(one[0].output).read(0, 40),
                             open_movie(reports[1].output).read(0, 40), rtol=0, atol=1e-5)
  # TIFF holds one movie per file: one file per plane, as before
  tifs = denoise_files(str(src), str(tmp_path / "den.tif"), trained_model, progress=False)
  assert [os.path.basename(r.output) for r in tifs] == ["den_plane0.tif", "den_plane1.tif"]


# ---------------------------------------------------------------- split recordings, one output

VOL = (12, 2, 2, 16, 16)   # (T, Z, C, Y, X)
VOL_KW = dict(patch=(8, 16, 16), tiling="overlap", overlap=0.25)


@pytest.fixture(scope="module")
def volume():
  return np.random.default_rng(3).integers(0, 500, VOL).astype(np.int16)


@pytest.fixture(scope="module")
def planes_alone(trained_model, volume):
  """Each plane and channel denoised on its own: what a one-file output must hold."""
  return {(z, c): denoise(volume[:, z, c], trained_model, **VOL_KW)
          for z in range(2) for c in range(2)}


def test_hdf5_tzcyx_is_written_back_as_one_tzcyx_file(trained_model, volume, planes_alone,
                                                       tmp_path):
  src = tmp_path / "rec.h5"
  with h5py.File(src, "w") as f:
    f.create_dataset("imaging", data=volume).attrs["axes"] = "TZCYX"
  out = str(tmp_path / "den.h5:/denoised")
  reports = denoise_files(str(src), out, trained_model, progress=False, **VOL_KW)
  assert len(reports) == 4 and sorted(os.listdir(tmp_path)) == ["den.h5", "rec.h5"]
  with h5py.File(tmp_path / "den.h5", "r") as f:
    data = f["denoised"]
    assert data.shape == VOL and data.dtype == np.float32 and data.attrs["axes"] == "TZCYX"
    assert data.chunks[1:3] == (1, 1)  # a plane's frames are written without the others
    for (z, c), alone in planes_alone.items():
      np.testing.assert_allclose(data[:, z, c], alone, rtol=0, atol=1e-5)
  back = list_movies(str(tmp_path / "den.h5"))  # read back as the input was
  assert back == [f"{tmp_path / 'den.h5'}[plane={z},channel={c}]" for z in (0, 1)
                  for c in (0, 1)]


def test_zarr_keeps_its_axis_order_and_ome_zarr_is_an_ome_image(trained_model, volume,
                                                                planes_alone, tmp_path):
  src = str(tmp_path / "rec.zarr")
  ctzyx = np.transpose(volume, (2, 0, 1, 3, 4))  # stored (C, T, Z, Y, X), as xarray names
  arr = zarr.create_array(store=src, shape=ctzyx.shape, chunks=(1, 4, 1, 16, 16),
                          dtype=np.int16)
  arr[:] = ctzyx
  arr.attrs["_ARRAY_DIMENSIONS"] = ["c", "t", "z", "y", "x"]
  out = str(tmp_path / "den.zarr")
  denoise_files(src, out, trained_model, progress=False, **VOL_KW)
  z = zarr.open(out, mode="r")
  assert z.shape == ctzyx.shape and z.attrs["axes"] == "CTZYX"
  for (p, c), alone in planes_alone.items():
    np.testing.assert_allclose(z[c, :, p], alone, rtol=0, atol=1e-5)
  # OME-Zarr: time, channel, space (0.5 in a format 3 store, 0.4 in a format 2 store)
  for fmt, version in ((3, "0.5"), (2, "0.4")):
    ome = str(tmp_path / f"den{fmt}.ome.zarr")
    denoise_files(src, f"{ome}[zarr_format={fmt}]", trained_model, progress=False,
                  **VOL_KW)
    group = zarr.open_group(ome, mode="r")
    attrs = dict(group.attrs)
    image = (attrs["ome"] if fmt == 3 else attrs)["multiscales"][0]
    assert (attrs["ome"]["version"] if fmt == 3 else image["version"]) == version
    assert [a["name"] for a in image["axes"]] == ["t", "c", "z", "y", "x"]
    assert group["0"].metadata.zarr_format == fmt and group["0"].shape == (12, 2, 2, 16, 16)
    for (p, c), alone in planes_alone.items():
      np.testing.assert_allclose(group["0"][:, c, p], alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(open_movie(f"{ome}[plane=1,channel=0]").read(0, 12),
                               planes_alone[(1, 0)], rtol=0, atol=1e-5)
  assert [k for k in os.listdir(tmp_path) if k.startswith(".")] == []


def test_one_file_appears_only_when_every_plane_is_written(tmp_path):
  frames = np.ones((3, 4, 4), np.float32)
  out = str(tmp_path / "v.h5")
  recording = ("TZYX", (3, 2, 4, 4))
  with output_mod.SplitOutputs() as split:
    with outputs_together(split.writer(
        f"{out}[plane=0]", (4, 4), np.float32, frames=3, recording=recording)) as ws:
      ws[0].write(frames)
    assert not os.path.exists(out)  # plane 0 is complete, the file is not
    with outputs_together(split.writer(
        f"{out}[plane=1]", (4, 4), np.float32, frames=3, recording=recording)) as ws:
      ws[0].write(2 * frames)
  with h5py.File(out, "r") as f:
    np.testing.assert_array_equal(f["data"][:, 1], 2 * frames)
  # a plane that fails removes the whole file, and nothing of it is left
  with pytest.raises(ZeroDivisionError):
    with output_mod.SplitOutputs() as split:
      with outputs_together(split.writer(
          f"{tmp_path / 'w.h5'}[plane=0]", (4, 4), np.float32, frames=3,
          recording=recording)) as ws:
        ws[0].write(frames)
      with outputs_together(split.writer(
          f"{tmp_path / 'w.h5'}[plane=1]", (4, 4), np.float32, frames=3,
          recording=recording)) as ws:
        ws[0].write(frames[:1])
        1 / 0
  # a run that ends with a plane never written is a bug, said so, and leaves nothing
  with pytest.raises(RuntimeError, match="not every plane and channel was written"):
    with output_mod.SplitOutputs() as split:
      with outputs_together(split.writer(
          f"{tmp_path / 'x.h5'}[plane=0]", (4, 4), np.float32, frames=3,
          recording=recording)) as ws:
        ws[0].write(frames)
  assert sorted(os.listdir(tmp_path)) == ["v.h5"]


# ---------------------------------------------------------------- ScanImage TIFF


def write_scanimage(path, frames, planes, channels, metadata=True):
  """A ScanImage-like TIFF: frames interleaved (time, plane, channel), the frame data
  in the Software tag as ScanImage 2016+ writes it in a non-BigTIFF file."""
  software = (f"SI.hChannels.channelSave = [{';'.join(str(c + 1) for c in range(channels))}]"
              f"\nSI.hStackManager.numSlices = {planes}\nSI.hFastZ.enable = true\n"
              "SI.hRoiManager.scanFrameRate = 30\n")
  tifffile.imwrite(path, frames, photometric="minisblack", metadata=None,
                   software=software if metadata else None)
  return str(path)


def test_scanimage_interleaved_tiff_is_undone(trained_model, tmp_path):
  rng = np.random.default_rng(0)
  data = rng.integers(0, 500, (12, 2, 2, 16, 16)).astype(np.int16)  # (T, Z, C, Y, X)
  src = write_scanimage(tmp_path / "si.tif", data.reshape(-1, 16, 16), 2, 2)
  parts = list_movies(src)
  assert parts == [f"{src}[plane={z},channel={c}]" for z in (0, 1) for c in (0, 1)]
  for z in (0, 1):
    for c in (0, 1):
      m = open_movie(f"{src}[plane={z},channel={c}]")
      assert m.shape == (12, 16, 16)
      np.testing.assert_array_equal(m.read(3, 9), data[3:9, z, c])
  # the same frames without metadata: --planes/--channels say the interleaving
  bare = write_scanimage(tmp_path / "bare.tif", data.reshape(-1, 16, 16), 2, 2,
                         metadata=False)
  assert open_movie(bare).shape == (48, 16, 16)
  np.testing.assert_array_equal(
      open_movie(f"{bare}[planes=2,channels=2,plane=1,channel=0]").read(0, 12),
      data[:, 1, 0])
  out = tmp_path / "out"
  out.mkdir()
  reports = denoise_files(src, str(out), trained_model, progress=False, patch=(8, 16, 16),
                          tiling="overlap", overlap=0.25)
  assert sorted(os.listdir(out)) == [f"si_plane{z}_ch{c}.tif" for z in (0, 1)
                                     for c in (0, 1)]
  assert all(open_movie(r.output).shape == (12, 16, 16) for r in reports)


# ---------------------------------------------------------------- Zarr


def test_zarr_written_in_chunks_round_trip(trained_model, movie, tiff_result, tmp_path):
  store = str(tmp_path / "rec.zarr")
  root = zarr.open_group(store, mode="w")
  create = root.create_array if hasattr(root, "create_array") else root.create_dataset
  arr = create("raw", shape=SHAPE, chunks=(8, 12, 12), dtype=np.int16)
  for t in range(0, SHAPE[0], 8):  # written chunk by chunk, as an acquisition would
    arr[t:t + 8] = movie[t:t + 8]
  m = open_movie(store)
  assert m.shape == SHAPE and m.dtype == np.int16 and m.name == f"{store}:/raw"
  blocks = list(m.chunks(max_bytes=10 * 24 * 24 * 2))
  assert len(blocks) == 4
  np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), movie)
  out = str(tmp_path / "den.zarr")
  denoise_files(store, out, trained_model, progress=False)
  back = open_movie(out)
  assert back.shape == SHAPE and back.dtype == np.float32
  np.testing.assert_allclose(back.read(0, 40), tiff_result, rtol=0, atol=1e-5)
  with pytest.raises(UserError) as e:
    open_movie(f"{store}:/missing")
  assert "has no dataset '/missing'" in one_sentence(e.value)


def test_ome_zarr_axes_come_from_the_metadata(movie, tmp_path):
  store = str(tmp_path / "image.ome.zarr")
  root = zarr.open_group(store, mode="w")
  create = root.create_array if hasattr(root, "create_array") else root.create_dataset
  vol = np.stack([movie, movie + 1], 0)  # (C, T, Y, X)
  create("0", shape=vol.shape, chunks=(1, 8, 24, 24), dtype=vol.dtype)[:] = vol
  root.attrs["multiscales"] = [{"version": "0.4", "axes": [
      {"name": "c", "type": "channel"}, {"name": "t", "type": "time"},
      {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
      "datasets": [{"path": "0"}]}]
  parts = list_movies(store)
  assert parts == [f"{store}[channel=0]", f"{store}[channel=1]"]
  np.testing.assert_array_equal(open_movie(parts[1]).read(0, 40), movie + 1)


def test_zarr_streamed_with_unknown_length_and_no_compression(tmp_path):
  frames = np.arange(7 * 8 * 8, dtype=np.float32).reshape(7, 8, 8)
  out = str(tmp_path / "s.zarr")
  with output_mod.MovieWriter(f"{out}[compression=none]", None, np.float32) as w:
    for t in range(7):
      w.write(frames[t])
      assert not os.path.exists(out)  # no finished name until complete
  np.testing.assert_array_equal(open_movie(out).read(0, 7), frames)


def test_missing_extra_is_named(monkeypatch, tmp_path):
  monkeypatch.setattr(zarr_store, "zarr", None)
  monkeypatch.setitem(sys.modules, "zarr", None)  # `import zarr` fails
  os.makedirs(tmp_path / "x.zarr")
  with pytest.raises(UserError) as e:
    open_movie(str(tmp_path / "x.zarr"))
  assert 'pip install "deepcad-jax[zarr]"' in one_sentence(e.value)


# ---------------------------------------------------------------- NWB


def make_nwb(path, movie, rate=15.0):
  from datetime import datetime, timezone
  from pynwb import NWBHDF5IO, NWBFile
  from pynwb.file import Subject
  from pynwb.ophys import OpticalChannel, TwoPhotonSeries
  nwb = NWBFile(session_description="two-photon session", identifier="rec-1",
                session_start_time=datetime(2024, 5, 1, tzinfo=timezone.utc),
                lab="test lab", subject=Subject(subject_id="mouse-7", species="Mus musculus"))
  device = nwb.create_device(name="2p scope")
  plane = nwb.create_imaging_plane(
      name="plane0", optical_channel=OpticalChannel(name="green", description="GCaMP",
                                                    emission_lambda=510.0),
      imaging_rate=rate, description="L2/3", device=device, excitation_lambda=920.0,
      indicator="GCaMP6s", location="V1")
  nwb.add_acquisition(TwoPhotonSeries(name="TwoPhotonSeries", data=movie,
                                      imaging_plane=plane, rate=rate, unit="a.u."))
  with NWBHDF5IO(str(path), "w") as io:
    io.write(nwb)
  return str(path)


def test_nwb_round_trip_copies_the_metadata(trained_model, movie, tiff_result, tmp_path):
  src = make_nwb(tmp_path / "rec.nwb", movie)
  m = open_movie(src)
  assert m.shape == SHAPE and m.dtype == np.int16
  assert m.metadata.frame_interval == pytest.approx(1 / 15)
  np.testing.assert_array_equal(m.read(0, 40), movie)
  out = str(tmp_path / "den.nwb")
  denoise_files(src, out, trained_model, progress=False)
  with pynwb.NWBHDF5IO(out, "r") as io:
    nwb = io.read()
    assert nwb.session_description == "two-photon session" and nwb.lab == "test lab"
    assert nwb.subject.subject_id == "mouse-7" and nwb.identifier != "rec-1"
    assert "TwoPhotonSeries" not in nwb.acquisition  # the raw movie is not copied
    series = nwb.processing["ophys"]["TwoPhotonSeries_denoised"]
    assert series.rate == 15.0 and series.imaging_plane.indicator == "GCaMP6s"
    assert series.data.shape == SHAPE and series.data.dtype == np.float32
    np.testing.assert_allclose(series.data[:], tiff_result, rtol=0, atol=1e-5)
  acq = str(tmp_path / "acq.nwb")
  denoise_files(src, f"{acq}[nwb_group=acquisition]", trained_model, progress=False)
  # suite2p's reader takes the TwoPhotonSeries of acquisition: the only one there
  back = open_movie(acq)
  assert back.name == f"{acq}:acquisition/TwoPhotonSeries_denoised"
  np.testing.assert_allclose(back.read(0, 40), tiff_result, rtol=0, atol=1e-5)


def test_nwb_errors_and_new_file(movie, tmp_path):
  src = make_nwb(tmp_path / "rec.nwb", movie)
  with pytest.raises(UserError) as e:
    open_movie(f"{src}:Nope")
  text = one_sentence(e.value)
  assert "no imaging series named 'Nope'" in text and "acquisition/TwoPhotonSeries" in text
  out = str(tmp_path / "new.nwb")  # from a TIFF: a new NWB file with one series
  write_movie(out, movie.astype(np.float32))
  with pynwb.NWBHDF5IO(out, "r") as io:
    series = io.read().processing["ophys"]["denoised"]
    np.testing.assert_array_equal(series.data[:], movie)


# ---------------------------------------------------------------- suite2p, raw


def test_suite2p_plane_folder_in_and_out(trained_model, movie, tiff_result, tmp_path):
  plane = tmp_path / "suite2p" / "plane0"
  plane.mkdir(parents=True)
  movie.tofile(plane / "data.bin")
  np.save(plane / "ops.npy", np.array({"Ly": 24, "Lx": 24, "nframes": 40, "fs": 30.0},
                                      dtype=object), allow_pickle=True)
  m = open_movie(str(plane))
  assert m.shape == SHAPE and m.dtype == np.int16
  assert m.metadata.frame_interval == pytest.approx(1 / 30)
  np.testing.assert_array_equal(m.read(10, 20), movie[10:20])
  out = tmp_path / "den" / "plane0"
  denoise_files(str(plane), str(out), trained_model, progress=False)
  data = np.memmap(out / "data.bin", np.int16, "r")
  ops = load_ops(str(out / "ops.npy"))  # readable by the restricted unpickler
  for key in ("Ly", "Lx", "nframes", "reg_file", "meanImg", "fs", "yrange", "xrange",
              "do_registration"):
    assert key in ops
  assert (ops["Ly"], ops["Lx"], ops["nframes"], ops["do_registration"]) == (24, 24, 40, 0)
  assert ops["reg_file"] == str(out / "data.bin")
  frames = data.reshape(ops["nframes"], ops["Ly"], ops["Lx"])  # (T, Y, X), C order
  # by default the scale makes the largest |value| 32767: int16's range, nothing clipped
  scale = ops["deepcad_scale"]
  assert scale == pytest.approx(32767 / np.abs(tiff_result).max(), rel=1e-5)
  assert np.abs(frames).max() == 32767 and ops["deepcad_clipped"] == 0
  np.testing.assert_allclose(frames / scale, tiff_result, rtol=0, atol=0.5 / scale + 1e-6)
  assert ops["meanImg"].shape == (24, 24)
  # suite2p >= 1.0 finds a plane folder by db.npy, settings.npy and data.bin
  db = load_ops(str(out / "db.npy"))
  settings = load_ops(str(out / "settings.npy"))
  assert settings["run"]["do_registration"] == 0 and settings["fs"] == pytest.approx(30.0)
  assert (db["Ly"], db["Lx"], db["nframes"], db["nchannels"]) == (24, 24, 40, 1)
  assert db["reg_file"] == str(out / "data.bin") and db["keep_movie_raw"] is False
  # suite2p's layout: save_path0 / save_folder / plane0
  assert os.path.join(db["save_path0"], db["save_folder"], "plane0") == str(out)
  assert db["data_path"] and db["db_path"] == str(out / "db.npy")
  os.remove(out / "ops.npy")  # a folder described by db.npy alone reads the same
  again = open_movie(str(out))
  np.testing.assert_array_equal(again.read(0, 40), frames)


def test_suite2p_scale_is_reported_and_clipping_too(tmp_path, caplog):
  frames = np.full((3, 8, 8), 40000.0, np.float32)
  frames[0, 0, 0] = -2.0
  with caplog.at_level("INFO", logger="deepcad_jax"):
    write_movie(str(tmp_path / "auto" / "plane0"), frames)  # the default: int16's range
  assert "uses int16's range" in caplog.text and "x 0.819" in caplog.text
  ops = load_ops(str(tmp_path / "auto" / "plane0" / "ops.npy"))
  assert ops["deepcad_clipped"] == 0 and ops["deepcad_scale"] == pytest.approx(32767 / 40000)
  assert not [n for n in os.listdir(tmp_path / "auto" / "plane0") if "partial" in n]
  out = str(tmp_path / "plane0")
  caplog.clear()
  with caplog.at_level("WARNING", logger="deepcad_jax"):
    write_movie(f"{out}[scale=1]", frames)  # a scale given: streamed, clipped, said
  assert "did not fit int16 and were clipped" in caplog.text and "[scale=0.819]" in caplog.text
  ops = load_ops(os.path.join(out, "ops.npy"))
  assert ops["deepcad_clipped"] == 191
  write_movie(f"suite2p:{tmp_path / 'half'}[scale=0.5]", frames)
  np.testing.assert_array_equal(open_movie(str(tmp_path / "half")).read(0, 3),
                                np.rint(frames * 0.5))


def test_raw_binary_needs_its_shape(movie, tmp_path):
  path = str(tmp_path / "movie.dat")
  movie.tofile(path)
  with pytest.raises(UserError) as e:
    open_movie(path)
  assert "raw:movie.bin[shape=" in one_sentence(e.value)
  with pytest.raises(UserError) as e:
    open_movie(f"raw:{path}[shape=41x24x24,dtype=int16]")
  assert "40 frames of (24, 24) would fit" in one_sentence(e.value)
  m = open_movie(f"raw:{path}[shape=40x24x24,dtype=int16]")
  np.testing.assert_array_equal(m.read(0, 40), movie)


def caiman_decode(path):
  """d1, d2, d3, order and T from a memmap name, as CaImAn's load_memmap reads them
  (caiman.paths.decode_mmap_filename_dict: the last field of each name, T last)."""
  parts = os.path.splitext(os.path.basename(path))[0].split("_")[1:]
  found = {}
  for field in ("d1", "d2", "d3", "order", "frames"):
    for i in range(len(parts) - 1, -1, -1):
      if parts[i] == field:
        found[field] = parts[i + 1] if field == "order" else int(parts[i + 1])
        break
  found["T"] = int(parts[-1]) if parts[-1] != "" else found["frames"]
  return found


def test_caiman_memmap_out_and_in(trained_model, movie, tiff_result, tmp_path,
                                  monkeypatch):
  monkeypatch.setattr(caiman, "CHUNK_BYTES", 40 * 4 * 50)  # 50 pixels per block: 12 blocks
  src = write_tiff(tmp_path / "movie.tif", movie)
  denoise_files(src, str(tmp_path / "den.mmap"), trained_model, progress=False)
  name = "den_d1_24_d2_24_d3_1_order_C_frames_40.mmap"
  assert sorted(os.listdir(tmp_path)) == [name, "movie.tif"]  # no temporary file left
  path = str(tmp_path / name)
  info = caiman_decode(path)
  assert (info["d1"], info["d2"], info["d3"], info["order"], info["T"]) == \
      (24, 24, 1, "C", 40)
  # as CaImAn reads it: load_memmap's memmap, then np.reshape(Yr.T, [T] + dims, order="F")
  yr = np.memmap(path, dtype=np.float32, mode="r", shape=(24 * 24 * 1, 40), order="C")
  images = np.reshape(yr.T, [40, 24, 24], order="F")
  np.testing.assert_allclose(images, tiff_result, rtol=0, atol=1e-5)
  np.testing.assert_allclose(yr[24 * 3 + 5], tiff_result[:, 5, 3], rtol=0, atol=1e-5)
  back = open_movie(path)  # and read like any movie
  assert back.shape == SHAPE and back.dtype == np.float32
  np.testing.assert_allclose(back.read(7, 19), tiff_result[7:19], rtol=0, atol=1e-5)
  # caiman:NAME, and a name that already holds the (right) shape
  write_movie(f"caiman:{tmp_path / 'sub' / 'Yr'}", movie[:5])
  assert os.listdir(tmp_path / "sub") == ["Yr_d1_24_d2_24_d3_1_order_C_frames_5.mmap"]
  with pytest.raises(UserError) as e:
    write_movie(str(tmp_path / "x_d1_24_d2_24_d3_1_order_C_frames_6.mmap"), movie[:5])
  assert "another shape" in one_sentence(e.value) and "x.mmap" in str(e.value)
  with pytest.raises(UserError) as e:  # a stream's length is unknown: the name cannot say it
    output_mod.MovieWriter(str(tmp_path / "s.mmap"), (24, 24), np.float32)
  assert "frame count" in one_sentence(e.value)
  bad = tmp_path / "renamed.mmap"
  bad.write_bytes(b"\0" * 16)
  with pytest.raises(UserError) as e:
    open_movie(str(bad))
  assert "name gives its shape" in one_sentence(e.value)


def test_a_caiman_output_that_resolves_to_the_input_is_refused(trained_model, movie,
                                                               tmp_path):
  src = write_tiff(tmp_path / "movie.tif", movie)
  denoise_files(src, str(tmp_path / "den.mmap"), trained_model, progress=False)
  path = tmp_path / "den_d1_24_d2_24_d3_1_order_C_frames_40.mmap"
  before = path.read_bytes()
  with pytest.raises(UserError) as e:  # den.mmap is written as that same file
    denoise_files(str(path), str(tmp_path / "den.mmap"), trained_model, overwrite=True,
                  progress=False)
  assert "is the input file" in one_sentence(e.value)
  assert path.read_bytes() == before


def test_caiman_memmap_of_a_volume_is_read_as_planes(tmp_path):
  vol = np.arange(5 * 3 * 4 * 2, dtype=np.float32).reshape(5, 3, 4, 2)  # (T, d1, d2, d3)
  path = tmp_path / "Yr_d1_3_d2_4_d3_2_order_F_frames_5.mmap"
  # save_memmap: transpose to (d1, d2, d3, T), Fortran-reshape to pixels x frames
  yr = np.reshape(np.transpose(vol, (1, 2, 3, 0)), (24, 5), order="F")
  np.asfortranarray(yr).T.tofile(path)  # order F: frame by frame
  assert list_movies(str(path)) == [f"{path}[plane=0]", f"{path}[plane=1]"]
  np.testing.assert_array_equal(open_movie(f"{path}[plane=1]").read(1, 4), vol[1:4, ..., 1])


def test_zarr_format_2_store_in_and_out(movie, tmp_path):
  src = str(tmp_path / "xr.zarr")  # as xarray writes it: format 2, _ARRAY_DIMENSIONS
  arr = zarr.create_array(store=src, shape=(24, 24, 40), chunks=(24, 24, 8),
                          dtype=np.int16, zarr_format=2)
  arr[:] = np.moveaxis(movie, 0, -1)
  arr.attrs["_ARRAY_DIMENSIONS"] = ["y", "x", "time"]
  assert os.path.exists(os.path.join(src, ".zarray"))
  np.testing.assert_array_equal(open_movie(src).read(0, 40), movie)
  out = str(tmp_path / "out.zarr")
  write_movie(f"{out}:/den[zarr_format=2,compression=gzip]", movie.astype(np.float32))
  assert sorted(os.listdir(out)) == [".zattrs", ".zgroup", "den"]
  z = zarr.open_group(out, mode="r")["den"]
  assert z.metadata.zarr_format == 2 and z.metadata.compressor.codec_id == "gzip"
  np.testing.assert_array_equal(open_movie(f"{out}:/den").read(0, 40), movie)
  with pytest.raises(UserError) as e:
    MovieSpec.parse(f"{out}[zarr_format=4]")
  assert "zarr_format=2" in one_sentence(e.value)


def test_spec_text_round_trips():
  for text in ("rec.h5:/imaging/data[axes=YXT]", "suite2p:out/plane0[scale=0.5]",
               "raw:m.bin[shape=10x4x4,dtype=uint16,offset=8]", "rec.nwb:TwoPhotonSeries",
               "si.tif[planes=2,channels=2,plane=1,channel=0]"):
    assert str(MovieSpec.parse(text)) == text
  with pytest.raises(UserError, match="unknown option 'frames'"):
    MovieSpec.parse("a.h5[frames=3]")


# ---------------------------------------------------------------- CLI


def test_cli_train_and_denoise_take_other_formats(capsys, movie, tmp_path):
  src = tmp_path / "sima.h5"
  with h5py.File(src, "w") as f:
    f["imaging"] = np.moveaxis(movie, 0, -1)
  run_dir = str(tmp_path / "run")
  code, _, err = run(capsys, "train", "--config", "tiny", "--data", str(src), "--axes",
                     "YXT", "--workdir", run_dir, "--epochs", "1", "--pairs-per-epoch", "4",
                     "--batch-size", "4")
  assert code == 0, err
  out = str(tmp_path / "den.nwb")
  code, _, err = run(capsys, "denoise", "--model", run_dir, "--input", str(src), "--axes",
                     "YXT", "--output", out, "--nwb-acquisition")
  assert code == 0, err
  assert open_movie(out).shape == SHAPE
  code, _, err = run(capsys, "denoise", "--model", run_dir, "--input", f"{src}:/nope",
                     "--output", str(tmp_path / "y.h5"))
  assert code == 2 and "has no dataset '/nope'" in err and "/imaging (24, 24, 40)" in err
  # one movie's axes in its own spec (the --axes flag applies to every movie flag)
  code, text, err = run(capsys, "evaluate", "--denoised", out, "--reference",
                        f"{src}[axes=YXT]")
  assert code == 0, err
  assert "snr" in text.lower()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_outputs_store_every_chunk_and_are_read_back(tmp_path, zarr_format):
  """A movie of zeros (every chunk equal to the fill value) is written with all its
  chunks, so that the missing-chunk check reads it back; a store with a chunk removed
  is refused."""
  zeros = np.zeros(SHAPE, np.float32)
  path = str(tmp_path / "zeros.zarr")
  write_movie(f"{path}[zarr_format={zarr_format}]", zeros)
  movie = open_movie(path)
  assert movie.shape == SHAPE and not movie.read(0, SHAPE[0]).any()
  chunks = [p for p in (tmp_path / "zeros.zarr").rglob("*")
            if p.is_file() and not p.name.startswith((".z", "zarr.json"))]
  assert chunks
  chunks[0].unlink()
  with pytest.raises(UserError, match=r"zeros\.zarr has 1 of its \d+ chunks missing"):
    open_movie(path)


@pytest.mark.parametrize("order", [">", "<"])
def test_big_endian_files_are_read_in_native_order(tmp_path, movie, order):
  """TIFF, HDF5 and raw files in either byte order give the same native frames."""
  data = movie.astype(np.dtype(np.int16).newbyteorder(order))
  tifffile.imwrite(tmp_path / "m.tif", data, byteorder=order, photometric="minisblack")
  with h5py.File(tmp_path / "m.h5", "w") as f:
    f["data"] = data
  data.tofile(tmp_path / "m.bin")
  for name in ("m.tif", "m.h5", f"raw:{tmp_path / 'm.bin'}[shape=40x24x24,dtype={order}i2]"):
    got = open_movie(name if name.startswith("raw:") else str(tmp_path / name))
    frames = got.read(0, SHAPE[0])
    assert got.dtype == np.int16 and frames.dtype.isnative, name
    np.testing.assert_array_equal(frames, movie)
