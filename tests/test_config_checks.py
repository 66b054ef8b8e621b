"""config_checks.validate: each check rejects its bad values with a message that names the
key path, the value, the allowed values (with a hint) and a fix; good configs pass."""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections
import pytest

from imagen_jax import config_checks, config_files, config_schema
from imagen_jax.config_checks import ConfigError, validate

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  return config_files.load(CONFIGS / f"{name}.py", arg)


@pytest.fixture
def cfg() -> ml_collections.ConfigDict:
  """The smoke config, unlocked so tests can also add or delete keys."""
  return load_config("gmm", "smoke")


def error(config, mode="sample") -> ConfigError:
  with pytest.raises(ConfigError) as info:
    validate(config, mode)
  return info.value


@pytest.mark.parametrize("variant", [None, "ring", "64d", "smoke"])
def test_gmm_variants_are_valid(variant):
  validate(load_config("gmm", variant), "sample")


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="'bogus'.*smoke"):
    load_config("gmm", "bogus")


def test_message_format(cfg):
  cfg.diffusion.schedule = "cosin"
  e = error(cfg)
  assert isinstance(e, ValueError) and e.key == "diffusion.schedule" and e.value == "cosin"
  msg = str(e)
  assert msg.startswith("diffusion.schedule='cosin': ")
  assert "Did you mean 'cosine'?" in msg
  assert "Allowed: 'cosine', 'edm', " in msg
  assert msg.endswith("Fix: pass --config.diffusion.schedule=cosine (or edit the config file).")


@pytest.mark.parametrize("mode", ["train", "eval", "precompute", "nonsense"])
def test_unsupported_mode(cfg, mode):
  e = error(cfg, mode)
  assert e.key == "--mode"
  assert "'gmm'" in str(e) and "--mode=sample" in str(e) and "no network" in str(e)


def test_unknown_kind(cfg):
  cfg.kind = "gmn"
  e = error(cfg)
  assert e.key == "kind" and "Did you mean 'gmm'?" in str(e)


def test_missing_key(cfg):
  del cfg.diffusion.sampler["grid"]
  e = error(cfg)
  assert e.key == "diffusion.sampler.grid" and "<missing>" in str(e) and "no such key" in str(e)


# data --------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, fragment", [
    ("mixture", "rng", "Did you mean 'ring'?"),
    ("dim", 3, "ring mixture is 2-D"),
    ("num_modes", 0, "integer >= 1"),
    ("num_modes", 2.0, "integer >= 1"),
    ("std", 0.0, "> 0.0"),
    ("radius", -1.0, "> 0.0"),
])
def test_data(cfg, key, value, fragment):
  cfg.data = dict(cfg.data.to_dict(), **{key: value})  # a new dict: types may change
  e = error(cfg)
  assert e.key == f"data.{key}" and fragment in str(e)


def test_random_mixture_takes_any_dim_but_an_integer_seed(cfg):
  cfg.data.update(mixture="random", dim=3)
  validate(cfg, "sample")
  cfg.data.dim = 0
  assert error(cfg).key == "data.dim"
  cfg.data = dict(cfg.data.to_dict(), dim=3, seed=0.5)
  assert error(cfg).key == "data.seed"


# schedule ----------------------------------------------------------------------------

def test_schedule_kw_unknown_argument(cfg):
  cfg.diffusion.schedule_kw = {"shif": 1.0}
  e = error(cfg)
  assert e.key == "diffusion.schedule_kw.shif"
  assert "Did you mean 'shift'?" in str(e) and "'logsnr_min'" in str(e)


def test_schedule_kw_rejected_by_the_schedule(cfg):
  cfg.diffusion.schedule_kw = {"logsnr_min": 3.0, "logsnr_max": 1.0}
  e = error(cfg)
  assert e.key == "diffusion.schedule_kw" and "logsnr_min < logsnr_max" in str(e)


def test_schedule_kw_follows_the_schedule(cfg):
  cfg.diffusion.schedule = "edm"
  validate(cfg, "sample")             # defaults
  cfg.diffusion.schedule_kw = {"sigma_max": 40.0}
  validate(cfg, "sample")
  cfg.diffusion.schedule_kw = {"logsnr_min": -5.0}  # EDM derives it from sigma_max
  assert error(cfg).key == "diffusion.schedule_kw.logsnr_min"


@pytest.mark.parametrize("name", ["linear", "cosine", "shifted_cosine", "sigmoid", "edm",
                                  "laplace", "lognormal"])
def test_every_registered_schedule_passes(cfg, name):
  cfg.diffusion.schedule = name
  validate(cfg, "sample")


# sampler -----------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, fragment", [
    ("method", "dpm", "Did you mean 'ddpm'?"),
    ("grid", "karas", "Did you mean 'karras'?"),
    ("steps", 0, "integer >= 1"),
    ("steps", -3, "integer >= 1"),
    ("steps", 2.5, "integer >= 1"),
    ("steps", True, "integer >= 1"),
    ("rho", 0.0, "> 0.0"),
    ("eta", -0.5, ">= 0.0"),
    ("s_noise", float("nan"), ">= 0.0"),
])
def test_sampler(cfg, key, value, fragment):
  # A new dict, so that type changes (2.5 for an int) get through ConfigDict's checks.
  cfg.diffusion.sampler = dict(cfg.diffusion.sampler.to_dict(), **{key: value})
  e = error(cfg)
  assert e.key == f"diffusion.sampler.{key}" and fragment in str(e)


@pytest.mark.parametrize("method", ["ddim", "ddpm", "dpmpp_2m", "dpmpp_3m", "heun"])
def test_every_method_passes(cfg, method):
  cfg.diffusion.sampler.method = method
  validate(cfg, "sample")


def test_unknown_sampler_option(cfg):
  cfg.diffusion.sampler.etta = 0.5
  e = error(cfg)
  assert e.key == "diffusion.sampler.etta" and "Did you mean 'eta'?" in str(e)


def test_churn_window_must_be_ordered(cfg):
  cfg.diffusion.sampler.update(s_tmin=2.0, s_tmax=1.0)
  e = error(cfg)
  assert e.key == "diffusion.sampler.s_tmin" and "s_tmax" in str(e)


# eval --------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("num_samples", 1), ("num_samples", 0), ("num_projections", 0), ("seed", "zero"),
])
def test_eval(cfg, key, value):
  cfg.eval = dict(cfg.eval.to_dict(), **{key: value})
  assert error(cfg).key == f"eval.{key}"


def test_kinds_table():
  # Every kind has sections and at least one job; every job serves known kinds with a
  # mode launch.py knows; every section a kind or a job names is a dataclass that checks
  # itself, in the module that owns it.
  from imagen_jax import jobs  # pylint: disable=g-import-not-at-top
  refs = []
  for name, kind in config_checks.KINDS.items():
    assert kind.sections and jobs.modes_of(name), name
    refs += kind.sections.values()
  for spec in jobs.specs():
    assert set(spec.kinds) <= set(config_checks.KINDS), spec
    assert spec.mode in {"train", "sample", "eval", "precompute", "build_data",
                         "eval_reference"}, spec
    refs += [ref for _, ref in spec.sections]
  for ref in refs:
    cls = config_checks.section_class(ref)
    assert dataclasses.is_dataclass(cls) and callable(getattr(cls, "check", None)), ref
  assert jobs.table()[("base", "eval")].sections == (
      ("eval", "imagen_jax.jobs.eval_stage:StageEvalSettings"),)


def test_sampler_fields_are_the_registered_options():
  # A method option added to samplers.METHOD_KWARGS needs its field in SamplerSettings.
  from imagen_jax.diffusion import samplers, settings  # pylint: disable=g-import-not-at-top
  assert set(settings.option_names()) == {k for ks in samplers.METHOD_KWARGS.values()
                                          for k in ks}


@pytest.mark.parametrize("path, key, fragment", [
    ("optim", "lrr", "Did you mean 'lr'?"),
    ("train", "batchsize", "Did you mean 'batch_size'?"),
    ("ckpt", "keep_evry", "Did you mean 'keep_every'?"),
    ("log", "sample_evry", "Did you mean 'sample_every'?"),
    ("mesh", "fsd", "Did you mean 'fsdp'?"),
    ("data", "resoltion", "Did you mean 'resolution'?"),
    ("eval.alignment", "stps", "Did you mean 'steps'?"),
])
def test_unknown_key_of_any_stage_section_is_named(path, key, fragment):
  # A key the owning dataclass does not declare (here added to the file, as a locked
  # config rejects it on the command line) fails with the section's valid keys.
  cfg = load_config("base64", "study")
  with cfg.unlocked():
    config_schema.get(cfg, path)[key] = 1
  e = error(cfg, "eval")
  assert e.key == f"{path}.{key}" and fragment in str(e) and "Allowed: " in str(e), str(e)


@pytest.mark.parametrize("path, value, fragment", [
    ("optim.name", "adamm", "Did you mean 'adam'?"),
    ("optim.b2", 1.5, "<= 1.0"),
    ("train.text_drop_prob", 1.5, "within [0, 1]"),
    ("train.antithetic", 1, "True or False"),
    ("ckpt.keep_every", -1, "integer >= 0"),
    ("log.prompts", (), "non-empty tuple"),
    ("mesh.tensor", 0, "positive size or -1"),
    ("data.text_dtype", "float16", "Did you mean"),
    ("data.resize", "padd", "Did you mean 'pad'?"),
    ("diffusion.thresholding", "dynamc", "Did you mean 'dynamic'?"),
    ("eval.alignment.candidates", 1, "integer >= 2"),
    ("eval.kid_subset_size", 1, "integer >= 2"),
])
def test_stage_section_values(path, value, fragment):
  cfg = load_config("base64", "study")
  section, _, key = path.rpartition(".")
  node = config_schema.get(cfg, section)
  with cfg.unlocked():
    node[key] = ml_collections.FieldReference(value, field_type=object)
  e = error(cfg, "eval")
  assert e.key == path and fragment in str(e) and "Fix: " in str(e), str(e)


def test_missing_section_key_is_named():
  cfg = load_config("base64", "study")
  with cfg.unlocked():
    del cfg.optim["grad_clip"]
  e = error(cfg, "train")
  assert e.key == "optim.grad_clip" and "no such key" in str(e)


# Network configs (base64, sr256, sr1024) -------------------------------------------------

NETWORK_CONFIGS = [(name, variant) for name, variants in
                   (("base64", ("smoke", "demo", "study", "study16", "emoji", "500m", "2b")),
                    ("sr256", ("smoke", "emoji", "600m")),
                    ("sr1024", ("smoke", "emoji", "400m"))) for variant in variants]


@pytest.mark.parametrize("name,variant", NETWORK_CONFIGS)
def test_network_configs_pass_their_checks(name, variant):
  cfg = load_config(name, variant)
  config_checks.check_model(cfg, "train")
  # Sampling a single stage is not a mode of theirs: says so instead of failing later.
  with pytest.raises(ConfigError, match="support only --mode=build_data, --mode=precompute, "
                                        "--mode=train"):
    validate(cfg, "sample")


def test_base_stage_eval_checks():
  cfg = load_config("base64", "study")
  validate(cfg, "eval")  # the study's checkpoint evaluation
  with cfg.unlocked():
    cfg.eval.steps = (250, -1)
  with pytest.raises(ConfigError, match=r"eval.steps=\(250, -1\).*tuple of checkpoint steps"):
    validate(cfg, "eval")
  cfg = load_config("base64", "study")
  cfg.eval.weights = "emma"
  with pytest.raises(ConfigError, match="Did you mean 'ema'"):
    validate(cfg, "eval")


def test_network_config_with_unknown_model_key_is_rejected():
  cfg = load_config("base64", "smoke")
  with cfg.unlocked():
    cfg.model.chanels = 8
  with pytest.raises(ConfigError, match="chanels"):
    config_checks.check_model(cfg, "train")
  cfg = load_config("sr256", "smoke")
  cfg.model.name = "vit"
  with pytest.raises(ConfigError, match="Did you mean|Allowed"):
    config_checks.check_model(cfg, "train")


# SR noise-conditioning augmentation (diffusion.noise_aug) ------------------------------

@pytest.mark.parametrize("name,variant", [(n, v) for n, v in NETWORK_CONFIGS if n != "base64"])
def test_sr_configs_noise_aug_passes(name, variant):
  check_noise_aug(load_config(name, variant))


def check_noise_aug(cfg):
  from imagen_jax.diffusion import settings  # pylint: disable=g-import-not-at-top
  config_schema.read(cfg, "diffusion.noise_aug", settings.NoiseAugSettings)


@pytest.mark.parametrize("updates, key, fragment", [
    (dict(per="batches"), "per", "Did you mean 'batch'?"),
    (dict(schedule="cosin"), "schedule", "Did you mean 'cosine'?"),
    (dict(schedule_kw={"shif": 1.0}), "schedule_kw.shif", "Did you mean 'shift'?"),
    (dict(max_t=1.5), "max_t", "within [0, 1]"),
    (dict(sample_t=1.5), "sample_t", "in [0, 1], the range of t"),
    (dict(sample_t=None), "sample_t", "no sampling augmentation level"),
    (dict(sample_t=None, sample_logsnr=40.0), "sample_logsnr", "in [-15, 15]"),
    (dict(sample_t=None, sample_sigma=1.0), "sample_sigma", "the range of sigma"),
    (dict(sample_t=None, sample_sigma="0.3"), "sample_sigma", "must be a number"),
    (dict(sample_sigma=0.3), "sample_sigma", "sample_t=0.2 is set too"),
    (dict(sample_logsnr=0.71, sample_sigma=0.3, sample_t=None), "sample_sigma",
     "sample_logsnr=0.71 is set too"),
])
def test_noise_aug_errors_name_the_key_and_the_fix(updates, key, fragment):
  cfg = load_config("sr256", "smoke")
  cfg.diffusion.noise_aug.update(updates)
  with pytest.raises(ConfigError) as info:
    check_noise_aug(cfg)
  e = info.value
  assert e.key == f"diffusion.noise_aug.{key}" and fragment in str(e), str(e)
  assert "Fix: " in str(e)


def test_noise_aug_two_levels_fix_works_on_the_command_line():
  # The message's fix (=None on the other key) parses: the level keys are object-typed.
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  def parse(*overrides):
    argv = ["prog", f"--config={CONFIGS / 'sr256.py'}:smoke", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config

  prefix = "--config.diffusion.noise_aug."
  cfg = parse(f"{prefix}sample_logsnr=0.7093")
  with pytest.raises(ConfigError) as info:
    check_noise_aug(cfg)
  assert "pass --config.diffusion.noise_aug.sample_t=None to use sample_logsnr" in str(
      info.value)
  cfg = parse(f"{prefix}sample_t=None", f"{prefix}sample_logsnr=0.7093")
  check_noise_aug(cfg)
  assert cfg.diffusion.noise_aug.sample_t is None
  assert cfg.diffusion.noise_aug.sample_logsnr == 0.7093


def test_cascade_aug_overrides_and_eval_sweep_checks():
  demo = load_config("cascade", "demo")
  demo.stage2.update(aug_t=0.2, aug_sigma=0.3)
  e = error(demo, "sample")
  assert e.key == "stage2.aug_sigma" and "stage2.aug_t=0.2 is set too" in str(e)
  assert "pass only one of --config.stage2.aug_t and --config.stage2.aug_sigma" in str(e)
  for key, value in (("aug_sigma", 1.0), ("aug_t", -0.1), ("aug_logsnr", float("inf"))):
    demo = load_config("cascade", "demo")
    demo.stage1[key] = value
    assert error(demo, "sample").key == f"stage1.{key}"
  demo = load_config("cascade", "demo")
  demo.stage1.aug_logsnr = 0.71
  validate(demo, "sample")

  demo = load_config("cascade", "demo")
  demo.eval.aug_levels = (0.1, 0.2, 0.3)
  e = error(demo, "eval")  # fid_stage 0 is the base stage: the sweep would do nothing
  assert e.key == "eval.fid_stage" and "--config.eval.fid_stage=1" in str(e)
  demo.eval.fid_stage = 1
  validate(demo, "eval")
  demo.eval.aug_levels = (0.1, 1.5)
  e = error(demo, "eval")
  assert e.key == "eval.aug_levels" and "within [0, 1]" in str(e)
  demo.eval.aug_level_kind = "logsnr"
  validate(demo, "eval")
  demo.eval.aug_level_kind = "sigmas"
  assert "Did you mean 'sigma'?" in str(error(demo, "eval"))
