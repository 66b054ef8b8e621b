"""Base U-Net: shapes, text conditioning and masking, bf16, gradients, sharding names,
remat, and the parameter counts of every configs/base64.py variant (shape-only)."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.models import layers
from imagen_jax.models.unet import UNet, UNetConfig

CONFIG_FILE = pathlib.Path(__file__).parents[2] / "configs" / "base64.py"

# Exact counts, also written in configs/base64.py: a change to the architecture shows here.
PARAM_COUNTS = {"smoke": 798_115, "emoji": 11_409_219, "500m": 548_759_555,
                "2b": 2_155_545_603}
NOMINAL = {"500m": 500e6, "2b": 2e9}


def model_config(variant: str) -> UNetConfig:
  spec = importlib.util.spec_from_file_location("_test_base64", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return UNetConfig.from_dict(module.get_config(variant).model)


def count_params(state) -> int:
  return sum(x.size for x in jax.tree.leaves(state))


@pytest.fixture(scope="module")
def cfg() -> UNetConfig:
  return model_config("smoke")


@pytest.fixture(scope="module")
def model_params(cfg):
  """A model, its fresh params, and a perturbed copy of them.

  The output conv and every attention output start at zero, so a fresh model outputs 0
  whatever its inputs and most gradients vanish; the perturbed params (noise added to
  every leaf) make the text-dependence and gradient tests meaningful.
  """
  # unsafe_rbg: initialising ~100 differently shaped params eagerly compiles a sampler
  # per shape, about twice as fast as with threefry on CPU.
  model = UNet(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg")))
  params = nnx.clone(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(1)  # numpy: no XLA compile per parameter shape
  noisy = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32), params)
  return model, params, noisy


@pytest.fixture(scope="module")
def inputs(cfg):
  b, length = 2, 8
  k = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(k[0], (b, cfg.image_size, cfg.image_size, cfg.in_channels))
  logsnr = jnp.array([-3.0, 4.0])
  text = jax.random.normal(k[1], (b, length, cfg.text_dim))
  mask = jnp.array([[True] * 5 + [False] * 3, [True] * 8])  # example 0: 3 padding tokens
  return x, logsnr, text, mask


def make_apply(model: UNet):
  """params, *inputs -> output, for models shaped like `model` (loaded with `params`)."""
  fwd = nnx.jit(lambda m, *a: m(*a))

  def apply(params, *inputs):
    nnx.update(model, params)
    return fwd(model, *inputs)
  return apply


def variant(model: UNet, **changes) -> UNet:
  """`model` with config fields changed that add no params (dtype, remat), same state."""
  cfg = dataclasses.replace(model.cfg, **changes)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.clone(nnx.state(model)))


@pytest.fixture(scope="module")
def apply(model_params):
  return make_apply(model_params[0])


def make_grad(model: UNet):
  """params, inputs -> (output, d loss / d params), for a loss whose target is not the
  output.

  nnx.grad, not jax.grad over nnx.merge: with flax 0.12.8, a module merged inside
  jax.grad cannot update its dropout RNG counts (TraceContextError), which nnx.remat
  always writes back; nnx.grad handles module state across the trace.
  """
  @nnx.jit
  def grad(m, x, *cond):
    def loss(m):
      out = m(x, *cond)
      return jnp.mean((out - x[..., ::-1]) ** 2), out
    (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(m)
    return out, grads

  def fn(params, inputs):
    nnx.update(model, params)
    return grad(model, *inputs)
  return fn


def test_output_shape_and_dtype(apply, model_params, inputs):
  out = apply(model_params[2], *inputs)
  assert out.shape == inputs[0].shape and out.dtype == jnp.float32
  assert np.isfinite(out).all()
  # Zero-initialised output conv: a fresh model predicts exactly 0.
  np.testing.assert_array_equal(apply(model_params[1], *inputs), 0.0)


def test_output_depends_on_unmasked_text(cfg, apply, model_params, inputs):
  params = model_params[2]
  x, logsnr, text, mask = inputs
  out = apply(params, *inputs)
  # A new random token (a constant shift would vanish in the text LayerNorm).
  new = jax.random.normal(jax.random.key(3), (cfg.text_dim,))
  changed = apply(params, x, logsnr, text.at[0, 1].set(new), mask)
  assert np.abs(changed[0] - out[0]).max() > 1e-3
  np.testing.assert_allclose(changed[1], out[1], atol=1e-6)  # examples stay independent


def test_masked_tokens_are_ignored(apply, model_params, inputs):
  params = model_params[2]
  x, logsnr, text, mask = inputs
  out = apply(params, *inputs)
  changed = apply(params, x, logsnr, text.at[0, 5:].set(100.0), mask)  # padding of ex. 0
  np.testing.assert_allclose(changed, out, atol=1e-6)


def test_fully_masked_text_is_finite_and_content_free(apply, model_params, inputs):
  """The classifier-free-guidance input: all-False mask; token values must not matter."""
  params = model_params[2]
  x, logsnr, text, _ = inputs
  none = jnp.zeros(text.shape[:2], bool)
  uncond = apply(params, x, logsnr, text, none)
  assert np.isfinite(uncond).all()
  np.testing.assert_allclose(apply(params, x, logsnr, -3.0 * text, none), uncond, atol=1e-6)
  assert np.abs(uncond - apply(params, *inputs)).max() > 1e-3  # and differs from cond


def test_bfloat16_close_to_float32(apply, model_params, inputs):
  """Same float32 params, bf16 compute. bf16 keeps 8 mantissa bits (relative rounding
  ~0.4% per op); through ~20 layers the errors add up to a few percent, so the bound
  is 5% relative L2 error (measured: 1.5%). Norm statistics stay float32."""
  params = model_params[2]
  bf16 = variant(model_params[0], dtype="bfloat16")
  ref = apply(params, *inputs)
  out = make_apply(bf16)(params, *inputs)
  assert out.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < 0.05, rel


@pytest.fixture(scope="module")
def grad_fn(model_params):
  return make_grad(model_params[0])


@pytest.fixture(scope="module")
def perturbed_grads(grad_fn, model_params, inputs):
  return grad_fn(model_params[2], inputs)  # (output, grads)


def test_gradients_finite_and_nonzero(grad_fn, model_params, inputs, perturbed_grads):
  # At init, everything upstream of the zero output conv gets an exactly-zero gradient;
  # still all finite, and the output conv itself learns.
  _, g0 = grad_fn(model_params[1], inputs)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(g0))
  assert np.abs(g0["conv_out"]["kernel"][...]).max() > 0
  # Perturbed params: every leaf gets a finite, non-zero gradient.
  flat = nnx.to_flat_state(perturbed_grads[1])
  bad = [p for p, g in flat if not np.isfinite(g[...]).all()]
  zero = [p for p, g in flat if not np.abs(g[...]).max() > 0]
  assert not bad, bad
  assert not zero, zero


def test_remat_same_output_and_gradients(model_params, inputs, perturbed_grads):
  out, grads = make_grad(variant(model_params[0], remat=True))(model_params[2], inputs)
  np.testing.assert_allclose(out, perturbed_grads[0], atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(perturbed_grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_every_param_has_logical_axis_names(model_params):
  missing = []
  for path, var in nnx.to_flat_state(model_params[1]):
    names = var.get_metadata().get("out_sharding")
    if names is None or len(names) != var[...].ndim:
      missing.append((path, names, var[...].shape))
  assert not missing, missing


def test_from_dict_rejects_unknown_keys():
  d = dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
           text_dim=32, image_size=16, name="unet")
  assert UNetConfig.from_dict(d).cond_features == 128
  with pytest.raises(ValueError, match="num_resblocks.*valid keys"):
    UNetConfig.from_dict({**d, "num_resblocks": 2})
  with pytest.raises(ValueError, match="feature-map sizes"):
    UNetConfig.from_dict({**d, "attn_resolutions": (12,)})
  with pytest.raises(ValueError, match="head_dim"):
    UNetConfig.from_dict({**d, "channels": 112})  # 224 wide: 3 heads of 74.7


@pytest.mark.parametrize("variant", ["smoke", "emoji", "500m", "2b"])
def test_param_counts(variant):
  """Shape-only (nnx.eval_shape allocates nothing): the paper-scale sizes, and that the
  network's skips and channels compose at 64x64 with 4096-d T5 tokens."""
  cfg = model_config(variant)
  model = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
  n = count_params(nnx.state(model, nnx.Param))
  assert n == PARAM_COUNTS[variant], f"{variant}: {n:,} (update configs/base64.py too)"
  if variant in NOMINAL:
    assert abs(n / NOMINAL[variant] - 1) < 0.10
  if variant == "500m":  # (2b differs only in widths and depth; tracing it takes longer)
    x = jax.ShapeDtypeStruct((2, cfg.image_size, cfg.image_size, 3), jnp.float32)
    out = nnx.eval_shape(lambda m, *a: m(*a), model, x,
                         jax.ShapeDtypeStruct((2,), jnp.float32),
                         jax.ShapeDtypeStruct((2, 128, cfg.text_dim), jnp.float32),
                         jax.ShapeDtypeStruct((2, 128), jnp.bool_))
    assert out.shape == x.shape and out.dtype == jnp.float32


# Architecture options: the shared text projection and pixel-shuffle resampling blocks. ----


@pytest.fixture(scope="module")
def options_model(cfg):
  """The smoke network with both options on, and perturbed params (see model_params)."""
  c = dataclasses.replace(cfg, text_proj_dim=24, resample="shuffle")
  model = UNet(c, rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg")))
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32),
                        nnx.clone(nnx.state(model, nnx.Param)))
  return model, params


def test_shared_text_projection_feeds_every_attention_layer(cfg, options_model):
  model, _ = options_model
  assert model.text_proj is not None
  attn = [m for _, m in nnx.iter_graph(model) if isinstance(m, layers.Attention)]
  assert attn and all(a.text_kv.kernel.shape[0] == 24 for a in attn)
  # Per-layer projections (the default) read the encoder's full width instead.
  default = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
  assert default.text_proj is None
  assert all(a.text_kv.kernel.shape[0] == cfg.text_dim for _, a in nnx.iter_graph(default)
             if isinstance(a, layers.Attention))


def test_options_model_masks_text_and_learns_everywhere(options_model, inputs):
  model, params = options_model
  x, logsnr, text, mask = inputs
  grad_fn = make_grad(model)
  out, grads = grad_fn(params, inputs)
  assert out.shape == x.shape and np.isfinite(out).all()
  apply = make_apply(model)
  # Padding tokens are ignored and fully masked text is content-free, through the shared
  # projection as without it.
  np.testing.assert_allclose(apply(params, x, logsnr, text.at[0, 5:].set(50.0), mask), out,
                             atol=1e-5)
  none = jnp.zeros_like(mask)
  np.testing.assert_allclose(apply(params, x, logsnr, text, none),
                             apply(params, x, logsnr, -2.0 * text, none), atol=1e-5)
  zero = [p for p, g in nnx.to_flat_state(grads) if not np.abs(g[...]).max() > 0]
  assert not zero, zero


def test_shuffle_resampling_replaces_the_conv_resamplers(cfg, options_model):
  model, _ = options_model
  assert all(isinstance(m, layers.ResBlock) and m.resample is not None
             for m in list(model.downsample) + list(model.upsample))
  default = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
  assert all(isinstance(m, (layers.Downsample, layers.Upsample))
             for m in list(default.downsample) + list(default.upsample))


def test_rejects_unknown_resample():
  d = dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
           text_dim=32, image_size=16)
  with pytest.raises(ValueError, match="resample"):
    UNetConfig.from_dict({**d, "resample": "pixelshuffle"})


@pytest.mark.parametrize("variant,channels,proj", [("500m", 256, 512), ("2b", 512, 2048)])
def test_paper_configs_have_rosetta_shapes(variant, channels, proj):
  """Rosetta's imagen_base_{500M,2B}.gin: width x (1,2,3,4) x 3 res blocks, attention at
  32/16/8, cond 4 x width, the T5 tokens projected once to attn_cond_dim."""
  c = model_config(variant)
  assert (c.channels, c.channel_mult, c.num_res_blocks) == (channels, (1, 2, 3, 4), 3)
  assert c.attn_resolutions == (32, 16, 8) and c.cond_features == 4 * channels
  assert c.text_proj_dim == proj and c.text_dim == 4096
