"""Efficient U-Net (SR stages): conditioning paths, masking, sizes, dtypes, sharding names,
remat, and the paper-scale parameter counts (shape-only)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax import models
from imagen_jax.models.efficient_unet import EfficientUNet, EfficientUNetConfig

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
B, RES, LOW, T = 2, 32, 8, 6


def load_config(file: str, variant: str):
  spec = importlib.util.spec_from_file_location(file, CONFIGS / file)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def _trained_like(abstract_params, seed: int = 0):
  """Random parameters 'as if trained', drawn with numpy for the abstract shapes.

  A fresh network's zero-initialised output convs (ResBlock conv2, attention out,
  conv_out) make it output exactly 0 and block gradients to everything behind them; a
  trained network has no such zeros. Drawing with numpy also avoids initialising with
  JAX, which compiles one RNG kernel per parameter shape (about 15 s here on 2 cores).
  """
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    z = rng.standard_normal(a.shape).astype(np.float32)
    if name == "scale":  # norm scales around 1, biases around 0
      return jnp.asarray(1.0 + 0.1 * z)
    if name == "bias":
      return jnp.asarray(0.1 * z)
    return jnp.asarray(z / math.sqrt(max(math.prod(a.shape[:-1]), 1)))

  return jax.tree_util.tree_map_with_path(draw, abstract_params)


def build(cfg: EfficientUNetConfig, params=None) -> nnx.Module:
  """The model from its abstract shape, with `params` or `_trained_like` ones."""
  abstract = nnx.eval_shape(lambda: EfficientUNet(cfg, rngs=nnx.Rngs(0)))
  graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
  rest = jax.tree.map(lambda a: jax.random.key(0) if jax.dtypes.issubdtype(
      a.dtype, jax.dtypes.prng_key) else jnp.zeros(a.shape, a.dtype), abs_rest)
  return nnx.merge(graphdef, _trained_like(abs_params) if params is None else params, rest)


def make_forward(model: nnx.Module):
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
  return lambda *a: fwd(state, *a)


def make_loss_grad(model: nnx.Module):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p, target, *a):
    out = nnx.merge(graphdef, p, rest)(*a)
    return jnp.mean((out - target) ** 2)

  return jax.jit(jax.value_and_grad(loss)), params


@pytest.fixture(scope="module")
def cfg() -> EfficientUNetConfig:
  # sr256:smoke has both a fused self+text attention and, through it, cross-attention.
  c = EfficientUNetConfig.from_dict(load_config("sr256.py", "smoke").model)
  assert c.cross_attn_levels and c.self_attn_levels
  return c


@pytest.fixture(scope="module")
def model(cfg):
  return build(cfg)


@pytest.fixture(scope="module")
def fwd(model):
  return make_forward(model)


@pytest.fixture(scope="module")
def inputs(cfg):
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(ks[0], (B, RES, RES, cfg.in_channels))
  logsnr = jnp.array([-3.0, 2.0])
  text = jax.random.normal(ks[1], (B, T, cfg.text_dim))
  mask = jnp.arange(T)[None] < jnp.array([[4], [2]])  # 4 and 2 valid tokens
  lowres = jax.random.uniform(ks[2], (B, LOW, LOW, cfg.in_channels), minval=-1, maxval=1)
  aug = jnp.array([-1.0, 5.0])
  return x, logsnr, text, mask, lowres, aug


@pytest.fixture(scope="module")
def out(fwd, inputs):
  return fwd(*inputs)


def _maxdiff(a, b) -> float:
  # numpy, not jnp: eager jnp ops compile a kernel per new shape, seconds on 2 cores.
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_output_shape_and_dtype(out, inputs):
  assert out.shape == inputs[0].shape and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  assert float(np.std(np.asarray(out))) > 1e-3  # not the zero output of a fresh network


def test_output_depends_on_text_lowres_and_aug_level(fwd, inputs, out):
  x, logsnr, text, mask, lowres, aug = inputs
  # Token 0 is unmasked in both examples. (A constant shift would be invisible: the
  # text tokens go through LayerNorm.)
  text2 = text.at[:, 0].set(jax.random.normal(jax.random.PRNGKey(3), text[:, 0].shape))
  assert _maxdiff(fwd(x, logsnr, text2, mask, lowres, aug), out) > 1e-4
  assert _maxdiff(fwd(x, logsnr, text, mask, -lowres, aug), out) > 1e-4
  assert _maxdiff(fwd(x, logsnr, text, mask, lowres, aug + 3.0), out) > 1e-4
  assert _maxdiff(fwd(x, logsnr + 3.0, text, mask, lowres, aug), out) > 1e-4


def test_masked_tokens_are_ignored(fwd, inputs, out):
  x, logsnr, text, mask, lowres, aug = inputs
  noise = 100.0 * jax.random.normal(jax.random.PRNGKey(5), text.shape)
  text2 = jnp.where(mask[..., None], text, noise)
  # Masked keys get exactly zero softmax weight, so equality is limited only by
  # floating-point reassociation across differently compiled inputs.
  assert _maxdiff(fwd(x, logsnr, text2, mask, lowres, aug), out) < 1e-6


def test_fully_masked_text_is_finite_and_text_free(fwd, inputs, out):
  x, logsnr, text, _, lowres, aug = inputs
  none = jnp.zeros((B, T), bool)  # classifier-free guidance's unconditional branch
  u1 = fwd(x, logsnr, text, none, lowres, aug)
  u2 = fwd(x, logsnr, -3.0 * text, none, lowres, aug)
  assert bool(jnp.all(jnp.isfinite(u1)))
  assert _maxdiff(u1, u2) < 1e-6          # no text leaks through
  assert _maxdiff(u1, out) > 1e-4         # and it differs from the conditional output


def test_runs_at_other_resolutions(fwd, inputs):
  # Initialised (and first traced) at 32x32; 48 is not a power of two either.
  x, logsnr, text, mask, lowres, aug = inputs
  res = 48
  xr = jax.random.normal(jax.random.PRNGKey(res), (B, res, res, x.shape[-1]))
  lr = jax.image.resize(lowres, (B, res // 4, res // 4, lowres.shape[-1]), "bilinear")
  y = fwd(xr, logsnr, text, mask, lr, aug)
  assert y.shape == xr.shape and bool(jnp.all(jnp.isfinite(y)))


def test_rejects_indivisible_size(model, inputs):
  x, logsnr, text, mask, lowres, aug = inputs
  with pytest.raises(ValueError, match="divisible"):
    model(x[:, :31, :31], logsnr, text, mask, lowres, aug)


def test_bfloat16_close_to_float32(cfg, model, inputs, out):
  m16 = build(dataclasses.replace(cfg, dtype="bfloat16"), nnx.state(model, nnx.Param))
  y16 = make_forward(m16)(*inputs)
  assert y16.dtype == jnp.float32
  # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op); through ~10
  # layers of convs and attention the errors add up: measured 1.5e-2 of the output's
  # norm. GroupNorm statistics stay float32, so there is no drift beyond that; 5e-2
  # leaves room for other seeds while still catching a wrong cast (errors of order 1).
  y16, y32 = np.asarray(y16), np.asarray(out)
  rel = float(np.linalg.norm(y16 - y32) / np.linalg.norm(y32))
  assert rel < 5e-2, rel


@pytest.fixture(scope="module")
def grads(model, inputs):
  loss_grad, params = make_loss_grad(model)
  target = jax.random.normal(jax.random.PRNGKey(7), inputs[0].shape)
  return loss_grad(params, target, *inputs), target


def test_gradients_finite_and_nonzero_for_all_params(grads):
  (loss, g), _ = grads
  assert np.isfinite(float(loss))
  flat = nnx.to_flat_state(g)
  assert flat
  for path, v in flat:
    arr = np.asarray(v[...] if hasattr(v, "get_metadata") else v)
    assert np.all(np.isfinite(arr)), path
    # With no zero-initialised convs left, every parameter influences the loss.
    assert np.max(np.abs(arr)) > 0.0, path


def test_remat_gives_same_output_and_grads(cfg, model, inputs, out, grads):
  # Remat changes only what the backward pass stores, so compare loss and gradients.
  mr = build(dataclasses.replace(cfg, remat=True), nnx.state(model, nnx.Param))
  (loss, g), target = grads
  loss_grad, params = make_loss_grad(mr)
  loss_r, g_r = loss_grad(params, target, *inputs)
  assert abs(float(loss_r) - float(loss)) < 1e-6
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_r)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 1e-5 * (1.0 + np.max(np.abs(a)))


def test_every_param_has_sharding_names(model):
  params = nnx.state(model, nnx.Param)
  specs = jax.tree.leaves(nnx.get_partition_spec(params))
  flat = nnx.to_flat_state(params)
  assert len(flat) == len(specs) > 0
  for (path, var), spec in zip(flat, specs):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim, path
    assert len(spec) == var[...].ndim, path


def test_from_dict_rejects_bad_configs(cfg):
  d = dataclasses.asdict(cfg)
  assert EfficientUNetConfig.from_dict({**d, "name": "efficient_unet"}) == cfg
  with pytest.raises(ValueError, match="attn_levls"):
    EfficientUNetConfig.from_dict({**d, "attn_levls": (1,)})
  with pytest.raises(ValueError, match="outside"):
    EfficientUNetConfig.from_dict({**d, "cross_attn_levels": (5,)})
  with pytest.raises(ValueError, match="one entry per level"):
    EfficientUNetConfig.from_dict({**d, "num_res_blocks": (1,)})
  with pytest.raises(ValueError, match="dtype"):
    EfficientUNetConfig.from_dict({**d, "dtype": "float16"})


# Exact counts, recorded in the config docstrings; tolerance: the nominal paper sizes.
PAPER = [("sr256.py", "600m", 600e6, 629_448_195), ("sr1024.py", "400m", 400e6, 362_448_131)]
SMALL = [("sr256.py", "emoji", 16_391_171), ("sr256.py", "smoke", 131_811),
         ("sr1024.py", "emoji", 11_372_867), ("sr1024.py", "smoke", 127_715)]


def _abstract(file: str, variant: str):
  c = load_config(file, variant)
  return c, nnx.eval_shape(lambda: models.build_model(c.model, nnx.Rngs(0)))


@pytest.mark.parametrize("file,variant,nominal,exact", PAPER)
def test_paper_scale_param_counts(file, variant, nominal, exact):
  c, abstract = _abstract(file, variant)  # shapes only: no memory for 400-600M params
  n = models.count_params(abstract)
  assert abs(n - nominal) <= 0.1 * nominal, n
  assert n == exact, n
  assert c.model.text_dim == 4096  # T5-XXL
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    assert len(var.get_metadata()["out_sharding"]) == len(var.shape), path


@pytest.mark.parametrize("file,variant,exact", SMALL)
def test_small_param_counts(file, variant, exact):
  c, abstract = _abstract(file, variant)
  assert models.count_params(abstract) == exact
  if variant == "emoji":
    assert 5e6 <= exact <= 20e6 and c.model.text_dim == 384  # MiniLM


def test_sr1024_has_no_self_attention_and_crops_match():
  c = load_config("sr1024.py", "400m")
  assert c.model.self_attn_levels == () and c.model.cross_attn_levels
  assert c.data.crop * c.data.low_resolution // c.data.resolution == 64
  assert c.data.crop % EfficientUNetConfig.from_dict(c.model).size_multiple == 0


# Resolution of each level, and where the 1/sqrt(2) goes. ------------------------------


def _conv_outputs(cfg: EfficientUNetConfig, res: int) -> list[tuple[int, int]]:
  """(output side, output channels) of every convolution of a forward pass at res x res,
  read off the lowered program (shapes only: nothing is compiled or computed)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: EfficientUNet(cfg, rngs=nnx.Rngs(0))))
  args = models.example_inputs({"name": "efficient_unet", **dataclasses.asdict(cfg)}, 1, res,
                               4, lowres=res // 4)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
  text = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a)).lower(state, *abstract).as_text()
  return [(int(m[1]), int(m[3])) for m in re.finditer(
      r"stablehlo\.convolution.*-> tensor<1x(\d+)x(\d+)x(\d+)x", text)]


def test_no_block_runs_at_the_input_resolution(cfg):
  """Paper / Rosetta / imagen-pytorch: every DBlock strides before its blocks, so only
  conv_in, the last upsampling conv and conv_out see the full resolution (before this
  fix level 0's ResBlocks ran there too, at about 4x the FLOPs)."""
  convs = _conv_outputs(cfg, RES)
  full = [c for c in convs if c[0] == RES]
  assert full == [(RES, cfg.level_channels[0]), (RES, cfg.level_channels[0]),
                  (RES, cfg.out_channels)], full
  # Every ResBlock conv runs at a level's size: RES / 2, RES / 4 for the smoke net.
  sizes = {c[0] for c in convs} - {RES}
  assert sizes == {RES // s for s in cfg.level_sizes} == {RES // 2, RES // 4}


def test_strides_set_each_levels_resolution(cfg):
  c = dataclasses.replace(cfg, strides=(2, 1))  # Rosetta's 5-level layout, in small
  assert c.level_sizes == (2, 2) and c.size_multiple == 2
  assert {s for s, _ in _conv_outputs(c, RES)} == {RES, RES // 2}
  with pytest.raises(ValueError, match="strides"):
    dataclasses.replace(cfg, strides=(2, 3))
  with pytest.raises(ValueError, match="strides"):
    dataclasses.replace(cfg, strides=(2,))


def test_skip_scaling_modes(cfg, model, inputs, out):
  """"sum" (default), "unet" and "none" share one parameter tree and differ in output;
  "shortcut" adds a 1x1 conv to every ResBlock whose width does not change."""
  params = nnx.state(model, nnx.Param)
  outs = {}
  for mode in ("unet", "none"):
    m = build(dataclasses.replace(cfg, skip_scaling=mode), params)
    outs[mode] = np.asarray(make_forward(m)(*inputs))
  assert _maxdiff(outs["unet"], out) > 1e-3 and _maxdiff(outs["none"], out) > 1e-3
  assert _maxdiff(outs["unet"], outs["none"]) > 1e-3
  n = models.count_params(params)
  shortcut = nnx.eval_shape(lambda: EfficientUNet(
      dataclasses.replace(cfg, skip_scaling="shortcut"), rngs=nnx.Rngs(0)))
  same_width = sum(1 for lv in list(model.down) + list(model.up) for blk in lv.blocks
                   if blk.skip is None)
  ch_of = lambda blk: blk.conv2.kernel.shape[-1]
  extra = sum(ch_of(blk) ** 2 + ch_of(blk) for lv in list(model.down) + list(model.up)
              for blk in lv.blocks if blk.skip is None)
  assert same_width > 0
  assert models.count_params(shortcut) == n + extra
  with pytest.raises(ValueError, match="skip_scaling"):
    dataclasses.replace(cfg, skip_scaling="sqrt2")


def test_paper_configs_follow_rosetta_shapes():
  """sr1: imagen_sr1_efficientunet_600M.gin; sr2: the block counts and multipliers of
  imagen_sr2_efficientunet_600M.gin (narrowed to 96 channels to be the paper's 400M).
  Attention runs at 1/16 of the resolution in both (16x16 at 256, 64x64 at 1024)."""
  sr1 = EfficientUNetConfig.from_dict(load_config("sr256.py", "600m").model)
  assert (sr1.channels, sr1.channel_mult, sr1.num_res_blocks) == (
      128, (1, 2, 4, 8, 8), (2, 4, 8, 8, 2))
  assert [sr1.level_sizes[i] for i in sr1.self_attn_levels] == [16, 16]
  sr2 = EfficientUNetConfig.from_dict(load_config("sr1024.py", "400m").model)
  assert (sr2.channel_mult, sr2.num_res_blocks) == ((1, 2, 4, 6, 6), (2, 4, 8, 8, 8))
  assert [sr2.level_sizes[i] for i in sr2.cross_attn_levels] == [16]
