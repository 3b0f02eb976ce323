"""Untrusted files: crafted .pth, stat.npy and ops.npy files are refused with one sentence
that names the file (never a crash, an out-of-bounds read or code run), and a short run
of the fuzzer (tests/robustness/fuzz_loaders.py) finds nothing."""

import copy
import datetime
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from deepcad_jax import UserError
from tests.robustness import fuzz_loaders as fl
from deepcad_jax.model_io.convert import read_state_dict
from deepcad_jax.analysis.rois import read_rois, read_suite2p_stat
from deepcad_jax.data.formats.suite2p import load_ops


FUZZ = fl.__file__  # the fuzzer's quick seeded run (its long run: see its docstring)


def _refused(path, match, read=read_state_dict):
  with pytest.raises(UserError, match=match) as info:
    read(str(path))
  message = str(info.value)
  assert str(path) in message and "\n" not in message
  return message


def _pth(tmp_path, name="m.pth", change=None, **kwargs):
  tensors, storages = fl.pth_seed()
  if change:
    change(tensors, storages)
  return fl.write_pth(tmp_path / name, tensors, storages, **kwargs)


def _expected(storage, offset, size, stride):
  """The tensor torch would build, element by element (an independent reference)."""
  data = np.frombuffer(storage.data, fl.STORAGE_DTYPES[storage.kind])
  out = np.empty(size, data.dtype)
  for idx in np.ndindex(*size):
    out[idx] = data[offset + sum(i * s for i, s in zip(idx, stride))]
  return out


# ------------------------------------------------------------------ .pth


def test_every_tensor_layout_torch_saves_is_copied_exactly(tmp_path):
  tensors, storages = fl.pth_seed()
  state = read_state_dict(_pth(tmp_path))
  assert set(state) == set(tensors)
  for key, t in tensors.items():
    s = storages[t.storage]
    expected = _expected(s, t.offset, t.size, t.stride)
    got = state[key]
    if s.kind == "BFloat16Storage":
      got = got.view(np.uint16)
    if s.kind == "BoolStorage":
      expected = expected != 0
    assert got.shape == expected.shape and np.array_equal(got, expected), key
  assert not np.shares_memory(state["tied_a"], state["tied_b"])  # copies, not views


@pytest.mark.torch
def test_the_reader_matches_torch_on_files_torch_writes(tmp_path):
  torch = pytest.importorskip("torch")
  base = torch.arange(40, dtype=torch.float32)
  saved = {"view": base.reshape(5, 8)[1:4, ::2], "t": base.reshape(5, 8).t(),
           "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3),
           "mask": torch.tensor([True, False, True]),
           "bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).t()}
  torch.save(saved, tmp_path / "views.pth")
  got = read_state_dict(str(tmp_path / "views.pth"))
  for key, value in saved.items():
    np.testing.assert_array_equal(got[key].astype(np.float32), value.float().numpy())
  ours = _pth(tmp_path)  # and torch reads the files the fuzzer starts from
  for key, value in torch.load(ours, weights_only=True).items():
    np.testing.assert_array_equal(read_state_dict(ours)[key].astype(np.float32),
                                  value.float().numpy())


@pytest.mark.parametrize("offset,size,stride", [
    (9, (1614,), (-1,)),            # reads 1,613 values before the storage
    (9, (2,), (-2**40,)),           # points at unmapped memory: a segfault
    (0, (3,), (-1,)),
])
def test_negative_strides_are_refused_before_any_read(tmp_path, offset, size, stride):
  def change(tensors, storages):
    tensors["view"] = fl.Tensor("3", offset, size, stride)
  _refused(_pth(tmp_path, change=change), r"has a tensor with strides .*-.*; copy the "
           r"\.pth again")


@pytest.mark.parametrize("offset,size,stride,match", [
    (0, (10**9,), (0,), "overlap"),
    (0, (2, 2), (1, 1), "overlap"),
    (0, (3, 3), (2, 1), "overlap"),
    (0, (11,), (1,), "reaches past the 10 elements of storage 3"),
    (9, (2,), (1,), "reaches past"),
    (10, (1,), (1,), "reaches past"),
    (0, (3, 4), (4, 1), "reaches past"),
    (0, (2, 5), (5, 2), "interleave"),
    (-1, (2,), (1,), "offset -1"),
    (0, (2, 2), (1,), r"shape \(2, 2\) with strides \(1,\)"),
    (0, (1.5,), (1,), "shape"),
    (True, (2,), (1,), "offset True"),
    (0, (2,) * 40, (1,) * 40, "shape"),
    (0, (0, 2**61), (1, 1), "too large"),
    (11, (0,), (1,), "empty tensor at offset 11"),
])
def test_out_of_range_and_overlapping_tensors_are_refused(tmp_path, offset, size, stride,
                                                          match):
  def change(tensors, storages):
    tensors["view"] = fl.Tensor("3", offset, size, stride)
  _refused(_pth(tmp_path, change=change), match)


def test_gapped_and_permuted_views_are_accepted(tmp_path):
  def change(tensors, storages):
    tensors["view"] = fl.Tensor("3", 1, (3, 2), (1, 5))   # a transposed slice
  state = read_state_dict(_pth(tmp_path, change=change))
  data = np.frombuffer(fl.pth_seed()[1]["3"].data, "<f4")
  np.testing.assert_array_equal(state["view"], [[data[1], data[6]], [data[2], data[7]],
                                                [data[3], data[8]]])


@pytest.mark.parametrize("kind", ["str:ComplexFloatStorage", "str:", "ComplexFloatStorage",
                                  "QInt8Storage", 7])
def test_an_unknown_storage_type_is_one_sentence(tmp_path, kind):
  def change(tensors, storages):
    storages["3"].kind = kind
  _refused(_pth(tmp_path, change=change),
           r"storage type|asks to load torch\.\w+, which a state_dict does not need")


def test_damaged_storages_and_archives_name_the_file(tmp_path):
  def longer(tensors, storages):
    storages["3"].numel = 11
  _refused(_pth(tmp_path, "a.pth", longer), "storage 3 shorter than it claims")

  def renamed(tensors, storages):
    storages["3"].key = "99"
  _refused(_pth(tmp_path, "b.pth", renamed), "missing archive/data/99")

  def twice(tensors, storages):
    storages["4"].key = "3"
  _refused(_pth(tmp_path, "c.pth", twice), "describes storage 3 in two different ways")

  tensors, storages = fl.pth_seed()
  entries = fl.pth_entries(fl.pth_pickle(tensors, storages), storages)
  for method, name, ok in [(zipfile.ZIP_DEFLATED, "deflated.pth", True),
                           (zipfile.ZIP_BZIP2, "bzip2.pth", False)]:
    (tmp_path / name).write_bytes(fl.pth_zip(entries, lambda i, n: method))
    if ok:
      assert set(read_state_dict(str(tmp_path / name))) == set(tensors)
    else:
      _refused(tmp_path / name, "compressed in a way torch never writes")
  bomb = [(n, b"\0" * 2**23 if n.endswith("data/3") else d) for n, d in entries]
  (tmp_path / "bomb.pth").write_bytes(fl.pth_zip(
      bomb, lambda i, n: zipfile.ZIP_DEFLATED if n.endswith("data/3") else 0))
  _refused(tmp_path / "bomb.pth", "compressed in a way torch never writes")
  data = (tmp_path / "a.pth").read_bytes()
  (tmp_path / "flipped.pth").write_bytes(data[:300] + bytes([data[300] ^ 1]) + data[301:])
  _refused(tmp_path / "flipped.pth", "damaged")


def test_state_set_on_a_tensor_and_odd_roots_are_refused(tmp_path):
  def build(tensors, storages):
    tensors["view"].state = {"x": 1}
  _refused(_pth(tmp_path, "a.pth", build), "sets state on a value")

  def int_key(tensors, storages):
    tensors[7] = tensors.pop("view")
  _refused(_pth(tmp_path, "b.pth", int_key), "does not hold a state_dict of tensors")
  nested = _pth(tmp_path, "c.pth", root=lambda od: {"state_dict": od})
  assert "view" in read_state_dict(nested)


def _inject(pk: bytes, code: bytes) -> bytes:
  return pk[:2] + code + b"0" + pk[2:]  # after PROTO: call, then POP


@pytest.mark.parametrize("fmt", ["pth", "stat", "ops"])
def test_pickled_code_never_runs(tmp_path, monkeypatch, fmt):
  fired = tmp_path / "fired"
  fired.mkdir()
  (tmp_path / "fuzz_canary.py").write_text(
      f"def fire(*a):\n  open({str(fired / 'fire')!r}, 'w').close()\n")
  (tmp_path / "fuzz_canary_import.py").write_text(
      f"open({str(fired / 'import')!r}, 'w').close()\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  seeds = fl.Seeds()
  for i, (target, args) in enumerate(fl.payloads(str(fired))):
    code = fl.enc_call(target, args)
    path = tmp_path / f"evil{i}.{'pth' if fmt == 'pth' else 'npy'}"
    if fmt == "pth":
      path.write_bytes(fl.pth_zip([(n, _inject(d, code) if n.endswith("data.pkl") else d)
                                   for n, d in seeds.entries]))
      read = read_state_dict
    else:
      raw = seeds.npy[fmt][3]
      start = raw.index(b"\n") + 1
      path.write_bytes(raw[:start] + _inject(raw[start:], code))
      read = read_suite2p_stat if fmt == "stat" else load_ops
    _refused(path, rf"asks to load {target[0]}\.{target[1]}, which .* refusing it", read)
  assert not list(fired.iterdir()) and "fuzz_canary_import" not in sys.modules


def test_memo_bombs_and_deep_nesting_are_refused(tmp_path):
  seeds = fl.Seeds()
  bomb = seeds.pkl[:2] + b"Nr\xfe\xff\xff\xff0" + seeds.pkl[2:]  # memo index 2**32 - 2
  path = tmp_path / "bomb.pth"
  path.write_bytes(fl.pth_zip([(n, bomb if n.endswith("data.pkl") else d)
                               for n, d in seeds.entries]))
  _refused(path, "memo index 4294967294")
  raw = seeds.npy["ops"][3]
  start = raw.index(b"\n") + 1
  pk = raw[start:]
  at = pk.index(b"K\x01", pk.index(b"nplanes"))  # the value of ops["nplanes"]
  deep = pk[:at] + b"]" * 100000 + b"a" * 99999 + pk[at + 2:]
  (tmp_path / "deep.npy").write_bytes(raw[:start] + deep)
  _refused(tmp_path / "deep.npy", "nests values more than 64 deep", load_ops)


# ------------------------------------------------------------------ suite2p


def _save(path, value, protocol=4):
  with open(path, "wb") as f:
    f.write(fl.npy_bytes(value, protocol=protocol))
  return str(path)


@pytest.mark.parametrize("protocol", [3, 4])
def test_stat_npy_from_numpy_1_and_2_is_read(tmp_path, protocol):
  stat = fl.stat_seed()
  got = read_suite2p_stat(_save(tmp_path / "stat.npy", stat, protocol))
  assert len(got) == 3
  for a, b in zip(got, stat):
    assert set(a) == set(b)
    np.testing.assert_array_equal(a["ypix"], b["ypix"])
    assert a["lam"].dtype == np.float32 and a["npix"] == b["npix"]
  assert len(read_rois(str(tmp_path / "stat.npy"), fl.FRAME_SHAPE)) == 3


def test_stat_npy_object_arrays_from_raw_bytes_are_refused(tmp_path):
  stat = fl.stat_seed()

  def pointers(v):  # an object array whose "items" are raw bytes: pointers, if believed
    return fl._array_call(v, spec="O8", dstate=(3, "|", None, None, None, -1, -1, 63),
                          data=np.full(v.size, 0x41414141, np.uint64).tobytes())
  tree, _ = fl._tree(stat, 0, pointers)
  path = tmp_path / "stat.npy"
  path.write_bytes(fl.npy_bytes(stat, fl.dumps(tree, 3)))
  _refused(path, "object array .* whose items are not a list", read_suite2p_stat)


@pytest.mark.parametrize("key,value,match", [
    ("lam", np.ones(2, np.float32), "malformed 'lam'"),
    ("ypix", np.array(["a", "b", "c", "d", "e"]), "malformed 'ypix'"),
    ("xpix", np.zeros((5, 1), np.int32), "malformed 'xpix'"),
    ("ypix", np.array([1.0, np.nan, 2, 3, 4]), "malformed 'ypix'"),
    ("overlap", [True], "malformed 'overlap'"),
])
def test_stat_entries_are_checked(tmp_path, key, value, match):
  stat = fl.stat_seed()
  stat[0][key] = value
  _refused(_save(tmp_path / "stat.npy", stat), match, read_suite2p_stat)


@pytest.mark.parametrize("protocol", [3, 4])
def test_load_ops_reads_what_suite2p_saves(tmp_path, protocol):
  expected = fl.ops_seed().item()
  ops = load_ops(_save(tmp_path / "ops.npy", fl.ops_seed(), protocol))
  assert set(ops) == set(expected)
  for key, value in expected.items():
    got = ops[key]
    assert type(got) is type(value), key
    if isinstance(value, np.ndarray):
      assert got.dtype == value.dtype and got.flags.f_contiguous == value.flags.f_contiguous
      np.testing.assert_array_equal(got, value)
    else:
      assert got == value, key
  assert ops["date_proc"].utcoffset() == datetime.timedelta(hours=1)


def test_load_ops_refuses_what_is_not_one_plane_s_ops(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    load_ops(str(tmp_path / "missing.npy"))
  np.save(tmp_path / "plain.npy", np.zeros(3))
  _refused(tmp_path / "plain.npy", "is not suite2p's ops.npy .* float64", load_ops)
  two = np.empty(2, object)
  two[0], two[1] = {"a": 1}, {"b": 2}
  _refused(_save(tmp_path / "ops1.npy", two), "holds 2 item", load_ops)

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))
  np.save(tmp_path / "evil.npy", {"x": Evil()}, allow_pickle=True)
  _refused(tmp_path / "evil.npy", r"asks to load (posix|os)\.system.*refusing", load_ops)
  bad_day = copy.deepcopy(fl.ops_seed())
  bad_day.item()["date_proc"] = fl.Call(fl.Global("datetime", "datetime"),
                                        (b"\x07\xe8\x02\x1f\x00\x00\x00\x00\x00\x00",))
  (tmp_path / "day.npy").write_bytes(fl.npy_bytes(bad_day, fl.dumps(fl._tree(
      bad_day, -1, None)[0], 3)))
  _refused(tmp_path / "day.npy", "invalid datetime", load_ops)  # February 31st
  text = fl.ops_seed()
  text.item()["bad"] = fl._array_call(np.array(["ab"]), data=b"\xff" * 8)  # > U+10FFFF
  (tmp_path / "text.npy").write_bytes(fl.npy_bytes(text, fl.dumps(fl._tree(
      text, -1, None)[0], 3)))
  _refused(tmp_path / "text.npy", "not valid unicode", load_ops)


# ------------------------------------------------------------------ the fuzzer


def test_a_short_fuzz_run_finds_nothing(tmp_path):
  out = tmp_path / "fuzz.json"
  proc = subprocess.run([sys.executable, FUZZ, "--cases", "240", "--seed", "7", "--json",
                         str(out), "--quiet"], capture_output=True, text=True, timeout=300)
  summary = json.loads(out.read_text())
  assert proc.returncode == 0, (summary["failures"], proc.stderr[-2000:])
  assert summary["cases"] == 240 and summary["failed"] == 0
  assert summary["canary_self_test"] == [8, 8]  # the canary does see plain pickle.loads
  for fmt in ("pth", "stat", "ops"):
    assert summary["by_format"][fmt].get("ok") and summary["by_format"][fmt].get("refused")
