"""The shipped configs: valid, the intended recipes, and parameter counts equal to a closed form of the architecture."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from jaxdiff.cli import load_config
from jaxdiff.config import (
    SPECS,
    ConfigError,
    config_from_dict,
    default_config,
    flat_keys,
    keys_without_spec,
    spec_of,
    unknown_key_error,
    validate,
)
from jaxdiff.config.recipes import RECIPES, recipe
from jaxdiff.models import count_parameters, create_model
from jaxdiff.models.summary import parameter_shapes
from tests.helpers import ROOT

CONFIGS = sorted(path.stem for path in (ROOT / "configs").glob("*.py"))
# Continuous-time recipes and their published parameter counts (millions; None: not published).
CONTINUOUS = {
    "sde_vp_ddpmpp_continuous": 61.80,
    "sde_subvp_ddpmpp_deep_continuous": 106.63,
    "sde_ve_ncsnpp_continuous": 62.76,
    "sde_ve_ncsnpp_deep_continuous": 107.59,
    "edm_cifar10_uncond_vp": 55.73,
    "edm_cifar10_cond_vp": None,
    "edm_cifar10_uncond_ve": 56.40,
    "edm_cifar10_cond_ve": None,
    "digits_edm": None,
    "digits_flow": None,
    "rectified_flow_cifar10": 61.80,
}
# Class-conditional latent transformers (configs of released weights; latent-space training is not built).
TRANSFORMERS = {"dit_xl2_imagenet256": 674.83, "sit_xl2_imagenet256": 674.83}
# Tasks other than diffusion (tests/test_tasks.py, test_latent_training.py, test_flow_lora_task.py).
OTHER_TASKS = ("shapes_autoencoder", "shapes", "flux_lora", "sd3_lora")
DDPM_CONFIGS = [name for name in CONFIGS if name not in {**CONTINUOUS, **TRANSFORMERS} and name not in OTHER_TASKS]
LARGE = ("celebahq256", "lsun_church256", "lsun_bedroom256", "lsun_cat256")


def get(name):
    return load_config(str(ROOT / "configs" / f"{name}.py"), [])


def flat(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def closed_form_parameters(m) -> int:
    """Parameter count of the DDPM U-Net, written out from its description (not from the code)."""
    temb = 4 * m.ch

    def conv3x3(i, o):
        return 9 * i * o + o

    def dense(i, o):
        return i * o + o

    def resblock(i, o):  # norm1, conv1, temb_proj, norm2, conv2, nin_shortcut if i != o
        return 2 * i + conv3x3(i, o) + dense(temb, o) + 2 * o + conv3x3(o, o) + (dense(i, o) if i != o else 0)

    def attention(c):  # norm, q, k, v, proj_out
        return 2 * c + 4 * dense(c, c)

    levels = len(m.ch_mult)
    total = dense(m.ch, temb) + dense(temb, temb) + conv3x3(m.in_channels, m.ch)
    if m.num_classes:
        total += (m.num_classes + 1) * temb
    skips, c = [m.ch], m.ch
    for i, mult in enumerate(m.ch_mult):
        attn = m.image_size // 2**i in m.attn_resolutions
        for _ in range(m.num_res_blocks):
            total += resblock(c, m.ch * mult) + (attention(m.ch * mult) if attn else 0)
            c = m.ch * mult
            skips.append(c)
        if i < levels - 1:
            total += conv3x3(c, c) if m.resamp_with_conv else 0
            skips.append(c)
    total += 2 * resblock(c, c) + attention(c)
    for i in reversed(range(levels)):
        attn = m.image_size // 2**i in m.attn_resolutions
        for _ in range(m.num_res_blocks + 1):
            total += resblock(c + skips.pop(), m.ch * m.ch_mult[i]) + (attention(m.ch * m.ch_mult[i]) if attn else 0)
            c = m.ch * m.ch_mult[i]
        if i > 0:
            total += conv3x3(c, c) if m.resamp_with_conv else 0
    assert not skips
    return total + 2 * c + conv3x3(c, m.out_channels)


def parameters_by_eval_shape(model_config) -> int:
    model = create_model(model_config)
    size, channels = model_config.image_size, model_config.in_channels
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    return count_parameters(jax.eval_shape(model.init, jax.random.key(0), x, t)["params"])


def test_all_expected_configs_ship():
    assert CONFIGS == sorted(
        ["cifar10", "cifar10_cond", "celebahq256", "lsun_church256", "lsun_bedroom256", "lsun_cat256", "digits", "tiny",
         *CONTINUOUS, *TRANSFORMERS, *OTHER_TASKS]
    )  # fmt: skip


@pytest.mark.parametrize("name", DDPM_CONFIGS)
def test_config_is_valid_and_counts_match_closed_form(name):
    config = validate(get(name))
    assert config.data.dataset == {"cifar10_cond": "cifar10", "tiny": "synthetic"}.get(name, name)
    assert parameters_by_eval_shape(config.model) == closed_form_parameters(config.model)


def test_closed_form_reproduces_published_sizes():
    assert closed_form_parameters(get("cifar10").model) == 35_746_307
    assert closed_form_parameters(get("celebahq256").model) == 113_673_219  # "114M"
    assert closed_form_parameters(get("cifar10_cond").model) == 35_746_307 + 11 * 512


def test_cifar10_is_exactly_the_default_recipe():
    assert get("cifar10").to_dict() == default_config().to_dict()


def test_cifar10_cond_differs_only_in_conditioning():
    base, cond = flat(default_config().to_dict()), flat(get("cifar10_cond").to_dict())
    assert base.keys() == cond.keys()
    assert {key for key in base if base[key] != cond[key]} == {"model.num_classes", "training.label_dropout"}
    assert cond["model.num_classes"] == 10 and cond["training.label_dropout"] == 0.1
    assert cond["sampling.guidance"] == 0.0


@pytest.mark.parametrize("name", LARGE)
def test_256_recipes(name):
    config = get(name)
    m, tc = config.model, config.training
    assert (m.image_size, m.in_channels, m.out_channels, m.ch) == (256, 3, 3, 128)
    assert tuple(m.ch_mult) == (1, 1, 2, 2, 4, 4) and tuple(m.attn_resolutions) == (16,)
    assert m.num_res_blocks == 2 and m.dropout == 0.0
    assert (tc.learning_rate, tc.batch_size, tc.warmup_steps, tc.ema_decay) == (2e-5, 64, 5000, 0.9999)
    assert config.diffusion.var_type == "fixedsmall"
    dc = config.diffusion
    assert (dc.schedule, dc.num_timesteps, dc.beta_start, dc.beta_end) == ("linear", 1000, 1e-4, 0.02)
    steps = dict(celebahq256=500_000, lsun_church256=1_200_000, lsun_bedroom256=2_400_000, lsun_cat256=1_800_000)
    assert tc.num_train_steps == steps[name]
    assert config.data.random_flip == (name != "lsun_cat256")


@pytest.mark.parametrize("name", [name for name, millions in {**CONTINUOUS, **TRANSFORMERS}.items() if millions])
def test_continuous_recipes_have_the_published_parameter_counts(name):
    """Through `parameter_shapes`, the path `jaxdiff info` counts with (shapes only, nothing allocated)."""
    config = validate(get(name))
    assert round(count_parameters(parameter_shapes(config.model)) / 1e6, 2) == {**CONTINUOUS, **TRANSFORMERS}[name]


def test_class_conditional_edm_recipes_add_the_label_embedding():
    """EDM's map_label: a dense layer from the 10 one-hot labels to the noise embedding (128·C_noise wide)."""
    for arch, noise_channels in (("vp", 128), ("ve", 256)):
        cond, uncond = (count_parameters(parameter_shapes(get(f"edm_cifar10_{kind}_{arch}").model))
                        for kind in ("cond", "uncond"))  # fmt: skip
        assert cond - uncond == 10 * noise_channels + noise_channels


def test_continuous_recipes_settings():
    vp, ve = get("sde_vp_ddpmpp_continuous"), get("sde_ve_ncsnpp_continuous")
    assert (vp.diffusion.process, vp.diffusion.parameterization, vp.diffusion.reduce_mean) == ("vp", "eps", True)
    assert (ve.diffusion.process, ve.diffusion.parameterization, ve.diffusion.reduce_mean) == ("ve", "score", False)
    assert (vp.training.ema_decay, ve.training.ema_decay) == (0.9999, 0.999)
    assert (vp.sampling.sampler, ve.sampling.sampler, ve.sampling.predictor, ve.sampling.corrector,
            ve.sampling.snr) == ("euler_maruyama", "pc", "reverse_diffusion", "langevin", 0.16)  # fmt: skip
    assert get("sde_subvp_ddpmpp_deep_continuous").training.num_train_steps == 950_000
    edm = get("edm_cifar10_cond_ve")
    assert (edm.model.num_classes, edm.model.song_unet.label_dim, edm.model.song_unet.dropout) == (10, 10, 0.13)
    assert (edm.training.batch_size, edm.training.learning_rate, edm.training.num_train_steps) == (512, 1e-3, 390_625)
    # EDM's EMA half-life of 500k images, at 512 images per step: 0.5 = decay^(500_000/512).
    assert edm.training.ema_decay ** (500_000 / 512) == pytest.approx(0.5, rel=1e-12)
    assert (edm.sampling.sampler, edm.sampling.steps, edm.diffusion.p_mean, edm.diffusion.p_std) == (
        "heun", 18, -1.2, 1.2)  # fmt: skip


def test_configs_saved_before_continuous_time_load_as_the_discrete_model():
    saved = default_config().to_dict()
    for section, keys in (("model", ("network", "ncsnpp", "song_unet")),
                          ("diffusion", ("process", "sigma_min", "parameterization", "p_mean")),
                          ("sampling", ("predictor", "snr", "s_max"))):  # fmt: skip
        for key in keys:
            del saved[section][key]
    config = validate(config_from_dict(saved))
    assert config.to_dict() == default_config().to_dict()
    assert (config.model.network, config.diffusion.process) == ("ddpm_unet", "discrete")


def test_digits_and_tiny():
    digits, tiny = get("digits"), get("tiny")
    assert (digits.model.image_size, digits.model.in_channels, digits.model.out_channels) == (8, 1, 1)
    assert tuple(digits.model.attn_resolutions) == (4,) and not digits.data.random_flip
    assert (digits.training.batch_size, digits.training.learning_rate, digits.training.ema_decay) == (128, 2e-3, 0.993)
    assert (digits.diffusion.schedule, digits.model.num_res_blocks, digits.model.dropout) == ("cosine", 1, 0.0)
    tm = tiny.model
    assert (tm.image_size, tm.ch, tuple(tm.ch_mult), tm.num_res_blocks) == (16, 32, (1, 2), 1)
    assert tuple(tiny.model.attn_resolutions) == (8,) and tiny.training.batch_size == 8
    assert (tiny.diffusion.schedule, tiny.diffusion.num_timesteps) == ("linear", 1000)


def test_closed_form_covers_variants():
    """Average-pool resampling, learned variances and labels change the count as the architecture says."""
    config = get("tiny").model
    config.resamp_with_conv = False
    config.out_channels = 6
    config.num_classes = 5
    assert parameters_by_eval_shape(config) == closed_form_parameters(config)


# ---------------------------------------------------------------- the spec table


def test_every_key_has_an_explicit_spec():
    """Keys without an entry in SPECS get only a type check; this lists them so they are noticed."""
    assert keys_without_spec() == [], f"add these keys to jaxdiff.config.SPECS: {keys_without_spec()}"


def test_every_default_and_recipe_satisfies_the_specs():
    for name in RECIPES:
        validate(recipe(name))
    for key, value in flat_keys(default_config()).items():
        assert spec_of(key, value).accepts(value), key


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("training.checkpoint_every_steps", 0, "an int >= 1"),
        ("training.log_every_steps", 0, "an int >= 1"),
        ("training.sample_every_steps", -3, "an int >= 1"),
        ("training.grad_accum_steps", 0, "an int >= 1"),
        ("training.num_train_steps", -5, "an int >= 1"),
        ("training.batch_size", 0, "an int >= 1"),
        ("training.ema_decay", 1.5, "a number in [0, 1]"),
        ("training.learning_rate", -1.0, "a number > 0"),
        ("training.learning_rate", float("nan"), "a number > 0"),
        ("training.label_dropout", 1.0, "a number in [0, 1)"),
        ("model.dropout", -0.1, "a number in [0, 1)"),
        ("model.ch_mult", (1, 0), "a tuple of ints >= 1, at least 1"),
        ("model.ch_mult", (), "a tuple of ints >= 1, at least 1"),
        ("model.num_classes", -1, "an int >= 0"),
        ("diffusion.num_timesteps", 1, "an int >= 2"),
        ("diffusion.beta_start", 0.0, "a number in (0, 1]"),
        ("diffusion.schedule", "cosin", "one of ("),
        ("sampling.guidance", -1.0, "a number >= 0"),
        ("seed", -1, "an int in [0, 4.29497e+09]"),
        ("training.num_train_steps", 2.5, "an int >= 1"),
        ("data.random_flip", 1, "a bool"),
    ],
)
def test_a_value_outside_its_spec_is_refused_naming_key_value_and_allowed(key, value, allowed):
    # Not type-safe, so ml_collections' own check on assignment does not hide validate's.
    config = ml_collections.ConfigDict(default_config().to_dict(), type_safe=False)
    section, name = key.rsplit(".", 1) if "." in key else (None, key)
    (config[section] if section else config)[name] = value
    with pytest.raises(ConfigError) as err:
        validate(config)
    message = str(err.value)
    assert f"{key}={value!r}" in message and allowed in message and "\n" not in message


def test_a_key_without_spec_is_type_checked_from_its_default(monkeypatch):
    monkeypatch.delitem(SPECS, "training.keep_checkpoints")
    assert keys_without_spec() == ["training.keep_checkpoints"]
    config = ml_collections.ConfigDict(default_config().to_dict(), type_safe=False)
    validate(config)
    config.training.keep_checkpoints = "3"
    with pytest.raises(ConfigError, match=r"keep_checkpoints='3'.*an int"):
        validate(config)


def test_new_keys_outside_their_spec_are_refused():
    for section, key, value, allowed in [
        ("diffusion", "process", "vpsde", "one of ('discrete', 've', 'vp', 'subvp', 'edm', 'flow', 'gvp')"),
        ("diffusion", "parameterization", "score_v", "one of ('eps', 'score', 'edm', 'velocity', 'x0', 'v')"),
        ("diffusion", "t_eps", 0.5, "a number in (0, 0.1)"),
        ("diffusion", "p_std", 0.0, "a number > 0"),
        ("sampling", "s_max", -1.0, "a number >= 0 or inf"),
        ("sampling", "corrector", "langevn", "one of ('langevin', 'ald', 'none')"),
        ("model", "network", "unet", "one of ('ddpm_unet', 'ncsnpp', 'song_unet', 'dit')"),
    ]:
        config = ml_collections.ConfigDict(default_config().to_dict(), type_safe=False)
        config[section][key] = value
        with pytest.raises(ConfigError) as err:
            validate(config)
        assert f"{section}.{key}={value!r}" in str(err.value) and allowed in str(err.value)
    config = ml_collections.ConfigDict(default_config().to_dict(), type_safe=False)
    config.model.ncsnpp.fir_kernel = (1, -3)
    with pytest.raises(ConfigError, match=r"model.ncsnpp.fir_kernel=\(1, -3\) is not allowed"):
        validate(config)
    config = default_config()
    config.sampling.s_max = float("inf")
    validate(config)


def continuous(**diffusion):
    config = get("sde_ve_ncsnpp_continuous")
    config.diffusion.update(diffusion)
    return config


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(sigma_min=60.0), r"need 0 < sigma_min < sigma_max, got sigma_min=60.0, sigma_max=50.0"),
        (dict(process="edm", sigma_min=90.0), r"sigma_min=90.0, sigma_max=80.0"),
        (dict(process="vp", beta_min=30.0), r"beta_max >= beta_min"),
        (dict(loss_type="mse"), r"loss_type='mse' is a discrete-schedule loss; diffusion.process='ve' needs one of"),
        (dict(process="discrete"), r"loss_type='dsm' needs a continuous diffusion.process"),
    ],
)
def test_continuous_cross_checks(change, message):
    with pytest.raises(ConfigError, match=message):
        validate(continuous(**change))


def test_network_and_sampler_cross_checks():
    config = continuous(process="discrete", loss_type="mse")
    with pytest.raises(ConfigError, match="model.network='ncsnpp' needs a continuous diffusion.process"):
        validate(config)
    config = default_config()
    config.sampling.sampler = "pc"
    with pytest.raises(ConfigError, match="sampling.sampler='pc' needs a continuous diffusion.process"):
        validate(config)
    config = continuous()
    config.sampling.sampler = "ddpm"
    with pytest.raises(ConfigError, match="sampling.sampler='ddpm' is for the discrete schedule"):
        validate(config)
    config = continuous()
    config.model.image_size = 16
    with pytest.raises(ConfigError, match=r"model.ncsnpp.image_size=32 must equal model.image_size=16"):
        validate(config)
    config = continuous()
    config.model.num_classes = 10
    with pytest.raises(ConfigError, match="model.network='ncsnpp' is unconditional"):
        validate(config)
    config = get("edm_cifar10_cond_vp")
    config.model.num_classes = 5
    with pytest.raises(ConfigError, match=r"model.song_unet.label_dim=10 must equal model.num_classes=5"):
        validate(config)
    config = get("edm_cifar10_uncond_vp")
    config.model.song_unet.attn_resolutions = (7,)
    with pytest.raises(ConfigError, match=r"model.song_unet: attn_resolutions entry 7 never occurs"):
        validate(config)
    config = get("edm_cifar10_uncond_vp")
    config.sampling.s_min, config.sampling.s_max = 2.0, 1.0
    with pytest.raises(ConfigError, match=r"sampling.s_max=1.0 must be >= sampling.s_min=2.0"):
        validate(config)


def test_cross_checks():
    config = default_config()
    config.model.image_size = 20  # four levels halve three times: 20 is not divisible by 8
    with pytest.raises(ConfigError, match=r"image_size=20 must be divisible by 2\^3"):
        validate(config)
    config = default_config()
    config.sampling.steps = 1001
    with pytest.raises(ConfigError, match="sampling.steps=1001 exceeds diffusion.num_timesteps=1000"):
        validate(config)


@pytest.mark.parametrize(
    "key, suggestions",
    [
        ("training.checkpoint_every", ["training.checkpoint_every_steps"]),
        ("model.chanels", ["model.in_channels", "model.out_channels"]),
        ("trainig.batch_size", ["training.batch_size"]),
        ("batch_size", ["training.batch_size", "sampling.batch_size"]),
    ],
)
def test_unknown_keys_name_the_closest_valid_ones(key, suggestions):
    message = str(unknown_key_error(key))
    assert message.startswith(f"unknown config key {key!r}; did you mean ")
    assert all(s in message for s in suggestions), message
    message = str(unknown_key_error("nonexistent"))
    assert "valid keys are seed, task, autoencoder.*, autoencoder_loss.*, data.*, diffusion.*, " in message
    assert message.endswith("model.*, sampling.*, training.*")
    with pytest.raises(ConfigError, match="did you mean training.batch_size"):
        config_from_dict({"training": {"batchsize": 3}})
