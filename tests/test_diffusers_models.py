"""diffusers UNet2DModel variants and DDPM/DDIM pipeline folders: forward parity with diffusers' own modules
(same random weights, theirs in float64, ours in float32), schedulers read into the diffusion, DDIM sampling
against diffusers' DDIMScheduler from the same initial noise, and export back to a DDPMPipeline.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers
from jaxdiff.cli import load_config
from jaxdiff.convert.diffusers_export import write_diffusers
from jaxdiff.convert.formats import convert
from jaxdiff.readers.diffusers_format import read_diffusers
from jaxdiff.readers.diffusers_format import architecture_from_unet_config
from jaxdiff.diffusion.denoisers import model_denoiser
from jaxdiff.models import create_model
from jaxdiff.sampling.pipeline import Pipeline
from jaxdiff.schedule import schedule_from_config
from tests.helpers import TINY_CONFIG
from tests.test_convert import diffusers_forward, random_params, randomized_unet

# diffusers' default UNet2DModel() (DownBlock2D + 3 AttnDownBlock2D, 8-channel heads, cos/sin embedding,
# symmetric downsampling padding, eps 1e-5) with narrower widths.
DEFAULT_LAYOUT = dict(sample_size=32, block_out_channels=(32, 64, 96, 128))
# examples/unconditional_image_generation/train_unconditional.py, widths divided by 4.
TRAINING_EXAMPLE = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(32, 32, 64, 64, 128, 128),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
)  # fmt: skip
# Learned variances, ResBlock resampling, no middle attention, gelu.
LEARNED_VARIANCE = dict(
    sample_size=16, out_channels=6, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"),
    up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"), add_attention=False,
    act_fn="gelu",
)  # fmt: skip
CLASS_CONDITIONAL = dict(
    sample_size=16, layers_per_block=1, block_out_channels=(32, 64), num_class_embeds=5, act_fn="mish",
    down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
    attention_head_dim=16, norm_num_groups=16,
)  # fmt: skip
# scale_shift: the middle attention has no GroupNorm; Attn blocks resample by ResBlocks.
SCALE_SHIFT = dict(
    sample_size=16, layers_per_block=1, block_out_channels=(32, 64, 64), resnet_time_scale_shift="scale_shift",
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_type="resnet", upsample_type="resnet", flip_sin_to_cos=False, freq_shift=3,
)  # fmt: skip


def relative_error(got, expected) -> float:
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def our_forward(config, params, x, t, y=None):
    model = create_model(config.model)
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(model.apply)({"params": params}, x, t, y))


def their_forward(torch, unet, x, t, y=None):
    if y is None:
        return diffusers_forward(torch, unet, x, t)
    unet = unet.double().eval()
    with torch.no_grad():
        sample = torch.from_numpy(x.transpose(0, 3, 1, 2)).double()
        out = unet(sample, torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def inputs(size, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    return x, np.array([3, 871][:batch])


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "settings, model_keys",
    [
        (DEFAULT_LAYOUT,
         dict(flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, norm_eps=1e-5, attn_head_dim=8)),
        (TRAINING_EXAMPLE, dict(attn_resolutions=(2,), attn_head_dim=8)),
        (LEARNED_VARIANCE, dict(out_channels=6, resblock_down_levels=(0,), resblock_up_levels=(2,), mid_attn=False,
                               attn_resolutions=(8,), act="gelu")),
        (CLASS_CONDITIONAL, dict(num_classes=5, null_label=False, act="mish", norm_groups=16, attn_head_dim=16)),
        (SCALE_SHIFT, dict(temb_scale_shift=True, mid_attn_norm=False, resblock_down_levels=(1,),
                           resblock_up_levels=(1, 2), freq_shift=3)),  # fmt: skip
    ],
    ids=["default_layout", "training_example", "learned_variance", "class_conditional", "scale_shift"],
)
def test_unet2dmodel_variants_match_diffusers(tmp_path, torch, diffusers, settings, model_keys):
    unet = randomized_unet(torch, diffusers, settings, seed=1)
    unet.save_pretrained(tmp_path / "unet")
    config, params = read_diffusers(tmp_path / "unet")
    for key, value in model_keys.items():
        assert config.model[key] == value, key
    x, t = inputs(settings["sample_size"])
    y = np.array([4, 1]) if settings.get("num_class_embeds") else None
    expected = their_forward(torch, unet, x, t, y)
    got = our_forward(config, params, x, t, y)
    assert got.shape == expected.shape
    assert relative_error(got, expected) <= 1e-4


def test_our_model_without_null_label_needs_labels(tmp_path, torch, diffusers):
    randomized_unet(torch, diffusers, CLASS_CONDITIONAL, seed=1).save_pretrained(tmp_path / "unet")
    config, params = read_diffusers(tmp_path / "unet")
    x, t = inputs(16)
    with pytest.raises(ValueError, match="null_label=False"):
        our_forward(config, params, x, t)


def test_bare_unet_gets_ddpm_diffusion_and_says_so(tmp_path, torch, diffusers, caplog):
    randomized_unet(torch, diffusers, LEARNED_VARIANCE | dict(out_channels=3), seed=1).save_pretrained(tmp_path / "u")
    with caplog.at_level(logging.INFO, logger="jaxdiff.readers.diffusers_format"):
        config, _ = read_diffusers(tmp_path / "u")
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "no scheduler" in caplog.records[0].getMessage()
    d = config.diffusion
    assert (d.schedule, d.num_timesteps, d.beta_start, d.beta_end, d.mean_type) == ("linear", 1000, 1e-4, 0.02, "eps")


@pytest.mark.parametrize(
    "scheduler, expected",
    [
        (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="sample",
              variance_type="fixed_large", clip_sample=False, num_train_timesteps=500),
         dict(schedule="quad", beta_start=0.00085, beta_end=0.012, mean_type="x_start", var_type="fixedlarge",
              num_timesteps=500)),
        (dict(beta_schedule="sigmoid", beta_start=0.0002, beta_end=0.03, prediction_type="epsilon",
              variance_type="fixed_small"),
         dict(schedule="sigmoid", beta_start=0.0002, beta_end=0.03, mean_type="eps", var_type="fixedsmall",
              num_timesteps=1000)),
        (dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", variance_type="learned_range"),
         dict(schedule="cosine", mean_type="v", var_type="learned_range", num_timesteps=1000)),
    ],
    ids=["scaled_linear", "sigmoid", "squaredcos_cap_v2"],
)  # fmt: skip
def test_pipeline_scheduler_sets_the_diffusion(tmp_path, torch, diffusers, scheduler, expected):
    out = 6 if scheduler["variance_type"].startswith("learned") else 3
    unet = randomized_unet(torch, diffusers, LEARNED_VARIANCE | dict(out_channels=out), seed=2)
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**scheduler))
    pipeline.save_pretrained(tmp_path / "pipe")
    config, _ = read_diffusers(tmp_path / "pipe")
    for key, value in expected.items():
        assert config.diffusion[key] == value, key
    assert config.sampling.clip_denoised == scheduler.get("clip_sample", True)
    ours = np.asarray(schedule_from_config(config.diffusion).betas, np.float64)
    np.testing.assert_allclose(ours, pipeline.scheduler.betas.double().numpy(), rtol=2e-6)


def test_ddim_pipeline_folder_selects_ddim(tmp_path, torch, diffusers):
    unet = randomized_unet(torch, diffusers, LEARNED_VARIANCE, seed=2)  # 6 output channels
    diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["_class_name"] == "DDIMPipeline"
    config, _ = read_diffusers(tmp_path / "pipe")
    assert (config.sampling.sampler, config.sampling.steps) == ("ddim", 50)
    assert config.diffusion.var_type == "learned_range"  # DDIMScheduler has no variance_type


def test_other_pipelines_are_refused(tmp_path, torch, diffusers):
    unet = randomized_unet(torch, diffusers, LEARNED_VARIANCE | dict(out_channels=3), seed=2)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    index = tmp_path / "pipe" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "LDMPipeline"}))
    with pytest.raises(ValueError, match="_class_name='LDMPipeline'; supported pipelines: DDPMPipeline, DDIMPipeline"):
        read_diffusers(tmp_path / "pipe")


@pytest.mark.timeout(300)
def test_ddim_from_same_noise_matches_diffusers_ddim_scheduler(tmp_path, torch, diffusers):
    """A DDPMPipeline folder (squaredcos_cap_v2, v_prediction, T = 20), sampled with DDIM η = 0 over all 20
    steps: jaxdiff's uniform spacing and diffusers' default "leading" spacing then visit the same steps.
    (With fewer steps than T, "leading" and "trailing" visit other steps; see the next test for "linspace".)"""
    unet = randomized_unet(torch, diffusers, LEARNED_VARIANCE | dict(out_channels=3, act_fn="silu"), seed=3)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=20, beta_schedule="squaredcos_cap_v2",
                                        prediction_type="v_prediction")  # fmt: skip
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    pipe = Pipeline.from_pretrained(tmp_path / "pipe")
    assert (pipe.config.diffusion.schedule, pipe.config.diffusion.mean_type) == ("cosine", "v")

    rng, shape, steps = jax.random.PRNGKey(5), (2, 16, 16, 3), 20
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(samplers.sample(
            model_denoiser(pipe.model, pipe.params), pipe.schedule, shape, rng, sampler="ddim", steps=steps,
            eta=0.0, clip_denoised=True, mean_type="v",
        ))  # fmt: skip
    x_T = np.asarray(jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32))  # the samplers' x_T

    ddim = diffusers.DDIMScheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    ddim.set_timesteps(steps)
    unet = unet.float().eval()
    x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        for t in ddim.timesteps:
            out = unet(x, t).sample
            x = ddim.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    theirs = x.numpy().transpose(0, 2, 3, 1)
    assert np.abs(theirs).max() > 0.1
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-3)


@pytest.mark.timeout(300)
def test_ten_ddim_steps_match_diffusers_with_the_same_steps(tmp_path, torch, diffusers):
    """T = 1000, 10 DDIM steps: jaxdiff visits 0, 111, ..., 999, as diffusers' "linspace" spacing does;
    diffusers takes the previous step to be t − T // num_inference_steps, so it is told 9 (t − 111) after
    set_timesteps(10)."""
    unet = randomized_unet(torch, diffusers, LEARNED_VARIANCE | dict(out_channels=3, act_fn="silu"), seed=3)
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    pipe = Pipeline.from_pretrained(tmp_path / "pipe")
    rng, shape, steps = jax.random.PRNGKey(5), (2, 16, 16, 3), 10
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(samplers.sample(
            model_denoiser(pipe.model, pipe.params), pipe.schedule, shape, rng, sampler="ddim", steps=steps,
            eta=0.0, clip_denoised=True, mean_type="v",
        ))  # fmt: skip
    x_T = np.asarray(jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32))

    ddim = diffusers.DDIMScheduler.from_pretrained(
        tmp_path / "pipe", subfolder="scheduler", timestep_spacing="linspace"
    )
    ddim.set_timesteps(steps)
    np.testing.assert_array_equal(ddim.timesteps.numpy()[::-1], np.arange(0, 1000, 111))
    ddim.num_inference_steps = 9  # 1000 // 9 = 111
    unet = unet.float().eval()
    x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    theirs = x.numpy().transpose(0, 2, 3, 1)
    assert np.abs(theirs).max() > 0.1
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-3)


@pytest.mark.timeout(300)
def test_export_is_a_ddpm_pipeline_diffusers_loads(tmp_path, torch, diffusers):
    source = randomized_unet(torch, diffusers, SCALE_SHIFT | dict(num_class_embeds=4), seed=4)
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=source, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    convert(tmp_path / "pipe", tmp_path / "run")
    convert(tmp_path / "run", tmp_path / "export", target_format="diffusers")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "jaxdiff_config.json", "model_index.json", "scheduler", "unet"]  # fmt: skip

    pipeline = diffusers.DDPMPipeline.from_pretrained(tmp_path / "export")
    x, t = inputs(16)
    y = np.array([3, 0])
    np.testing.assert_allclose(their_forward(torch, pipeline.unet, x, t, y), their_forward(torch, source, x, t, y),
                               rtol=0, atol=1e-6)  # fmt: skip
    assert pipeline.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    np.testing.assert_array_equal(pipeline.scheduler.betas.numpy(), scheduler.betas.numpy())
    config, params = read_diffusers(tmp_path / "export")
    np.testing.assert_allclose(our_forward(config, params, x, t, y), their_forward(torch, source, x, t, y),
                               rtol=0, atol=1e-4)  # fmt: skip


def test_exporting_a_null_label_model_restores_it(tmp_path):
    config = load_config(TINY_CONFIG, ["--config.model.num_classes=3"])
    params = random_params(config.model, seed=1)
    write_diffusers(config, params, tmp_path / "export")
    unet_settings = json.loads((tmp_path / "export" / "unet" / "config.json").read_text())
    assert unet_settings["num_class_embeds"] == 4  # the null label is diffusers' class 3
    read_config, read_params = read_diffusers(tmp_path / "export")
    assert read_config.to_dict() == config.to_dict()
    np.testing.assert_array_equal(read_params["label_emb"]["embedding"], params["label_emb"]["embedding"])


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(down_block_types=("SkipDownBlock2D", "AttnDownBlock2D")), "down_block_types"),
        (dict(attn_norm_num_groups=8), "attn_norm_num_groups=8"),
        (dict(time_embedding_dim=64), "time_embedding_dim=64"),
        (dict(freq_shift=16), "freq_shift=16"),
    ],
)
def test_unsupported_unet_settings_are_named(change, named):
    settings = {"_class_name": "UNet2DModel", **LEARNED_VARIANCE, **change}
    with pytest.raises(ValueError, match=f"unsupported setting {named}"):
        architecture_from_unet_config(json.loads(json.dumps(settings)), "src")
