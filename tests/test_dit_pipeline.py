"""DiT end to end (`Pipeline.from_pretrained` of an original `.pt` with a VAE folder, and of a diffusers DiTPipeline
folder): images against diffusers' DiTPipeline on the same latents, and against a float64 NumPy/torch re-implementation
of DiT's sample.py loop (ADM's respacing, learned σ, guidance on the first 3 latent channels, VAE decode of
latents / 0.18215); `latents=` for latent and pixel models; the `sample` verb on the tiny files and its refusals;
DiT run configs validated, trained in pixel space, and their label dropout acting once."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdiff.cli import load_config, main
from jaxdiff.config.validation import validate
from jaxdiff.errors import ConfigError, UsageError, WeightsError
from jaxdiff.families import family_of
from jaxdiff.models import create_model, dit
from jaxdiff.models.networks import example_inputs
from jaxdiff.readers.dit_checkpoint import DIT_LATENT_SCALE, read_dit_run
from jaxdiff.readers.formats import detect_format
from jaxdiff.sampling.pipeline import load_weights
from jaxdiff.sampling.pipeline import Pipeline
from jaxdiff.training.diffusion_step import make_loss_fn, make_train_step
from jaxdiff.training.step import init_train_state, make_optimizer
from tests.helpers import TINY_CONFIG
from tests.test_dit import closed_form_counts, diffusers_dit
from tests.test_dit_readers import CLASSES, DEPTH, HEADS, D, dit_state_dict, reference_forward, save

LATENT = (8, 8, 4)  # the tiny DiTs' latents; the tiny VAE decodes them to 16×16×3 images
IMAGE = (16, 16, 3)
T = 1000


@pytest.fixture
def tiny_size(monkeypatch):
    """The tiny DiT width and depth as a size of its own, so that its state dict is read without num_heads, as a
    released preset's is (and the `sample` verb can read it)."""
    monkeypatch.setitem(dit.SIZES, "tiny", (DEPTH, D, HEADS))


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory, torch, diffusers):
    """A tiny AutoencoderKL (2 levels: latents 8×8×4 <-> images 16×16×3, scaling_factor 0.18215), random biases."""
    torch.manual_seed(3)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)  # fmt: skip
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["scaling_factor"] == DIT_LATENT_SCALE
    return folder, vae.double().eval()


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory, torch):
    """An original-format tiny DiT `.pt` (plain state dict, learned σ, 5 classes + the null row) and its tensors."""
    sd = dit_state_dict(7)
    for name in sd:
        if name != "pos_embed":
            sd[name] = sd[name] * 0.5  # std 0.15: latents of moderate size through the loop
    return save(torch, sd, tmp_path_factory.mktemp("dit") / "DiT-tiny.pt"), sd


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory, torch, diffusers, vae_folder):
    """A tiny DiTPipeline saved by diffusers (1000 classes: DiTPipeline's null class is the literal 1000), with
    DDIMScheduler as the released folder, and an id2label entry as the released model_index.json has."""
    transformer = diffusers_dit(torch, diffusers, shared_embedders=True, seed=5, num_layers=2,
                                num_embeds_ada_norm=1000).float()  # fmt: skip
    vae = diffusers.AutoencoderKL.from_pretrained(vae_folder[0])
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    folder = tmp_path_factory.mktemp("dit_pipeline")
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["id2label"] = {"0": "tench, Tinca tinca", "207": "golden retriever"}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def pixels(decoded: np.ndarray) -> np.ndarray:
    """Decoder output in [-1, 1] NCHW -> NHWC values in [0, 255] (clipped, not rounded)."""
    return np.clip(decoded.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1) * 255


def assert_images_match(ours: np.ndarray, expected: np.ndarray) -> None:
    """uint8 images against float [0, 255] ones: within rounding (0.5) plus 0.02 levels, on images that are not
    saturated (so the comparison sees the values)."""
    assert ours.dtype == np.uint8 and ours.shape == expected.shape
    interior = (expected > 0.5) & (expected < 254.5)
    assert interior.mean() > 0.5, "the images saturate: the comparison would be blind"
    error = np.abs(ours.astype(np.float64) - expected)
    assert error.max() <= 0.52, error.max()


# --------------------------------------------------------------------------- DiT's sample.py, in float64


def adm_space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """improved-diffusion's space_timesteps(T, [count]): round half to even of the accumulated float stride."""
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    position, taken = 0.0, []
    for _ in range(count):
        taken.append(round(position))
        position += stride
    return sorted(set(taken))


def dit_sample_reference(torch, sd, vae, latents, labels, cfg_scale, steps, noises, *, guided_channels=3):
    """DiT's sample.py: p_sample_loop of SpacedDiffusion(space_timesteps(1000, [steps])) on forward_with_cfg
    (guidance on `guided_channels` of ε, the rest of the output conditional), clip_denoised=False, learned-range
    variance; then vae.decode(x / 0.18215). `noises[i]` is the noise of loop iteration i. Float64 throughout."""
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    kept = adm_space_timesteps(T, steps)
    kept_ac = alphas_cumprod[kept]
    b = 1.0 - kept_ac / np.append(1.0, kept_ac[:-1])
    ac = np.cumprod(1.0 - b)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)
    log_var_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
    coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)
    x = latents.astype(np.float64)
    n, c = x.shape[0], x.shape[-1]
    null = np.full(n, CLASSES)
    for i, k in enumerate(range(len(kept) - 1, -1, -1)):
        t = np.full(n, kept[k])
        cond = reference_forward(torch, sd, x, t, labels)
        uncond = reference_forward(torch, sd, x, t, null)
        eps = cond[..., :c].copy()
        g = guided_channels
        eps[..., :g] = uncond[..., :g] + cfg_scale * (cond[..., :g] - uncond[..., :g])
        frac = (cond[..., c:] + 1) / 2
        log_var = frac * np.log(b[k]) + (1 - frac) * log_var_clipped[k]
        x0 = np.sqrt(1 / ac[k]) * x - np.sqrt(1 / ac[k] - 1) * eps
        x = coef1[k] * x0 + coef2[k] * x + (k > 0) * np.exp(0.5 * log_var) * noises[i]
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(x.transpose(0, 3, 1, 2) / DIT_LATENT_SCALE)).sample.numpy()
    return pixels(decoded)


def ddpm_noises(seed: int, steps: int, shape) -> np.ndarray:
    """The noise jaxdiff's ddpm adds at loop iteration i of batch 0 of `Pipeline.sample(seed=seed)`: rng
    fold_in(PRNGKey(seed), 0), split into (init, noise) keys, normal(fold_in(noise_key, i)) (jaxdiff.samplers)."""
    _, noise_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), 0))
    return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(noise_key, i), shape), np.float64)
                     for i in range(steps)])  # fmt: skip


def test_original_checkpoint_samples_as_dit_sample_py(torch, tiny_size, dit_file, vae_folder):
    path, sd = dit_file
    pipe = Pipeline.from_pretrained(path, vae=vae_folder[0])
    assert (pipe.image_shape, pipe.config.sampling.guidance_channels, pipe.config.sampling.spacing) == (IMAGE, 3, "adm")
    assert validate(pipe.config) is pipe.config
    # sample.py's defaults: 250 steps, cfg scale 4 (w = 3); another sampler takes its own default steps.
    assert (pipe.sampling_settings(), pipe.config.sampling.guidance) == (("ddpm", 250, {}), 3.0)
    assert pipe.sampling_settings("ddim") == ("ddim", None, {})
    latents = np.random.default_rng(1).standard_normal((3, *LATENT)).astype(np.float32)
    labels, w, steps, seed = np.array([1, 4, 2]), 2.0, 7, 5  # 7 steps: ADM's rounding differs from "uniform"
    ours = pipe.sample(3, class_label=labels, guidance=w, latents=latents, steps=steps, seed=seed)
    noises = ddpm_noises(seed, steps, latents.shape)
    expected = dit_sample_reference(torch, sd, vae_folder[1], latents, labels, 1 + w, steps, noises)
    assert_images_match(ours, expected)
    # Not blind to what is matched: guiding all four channels, or another w, gives other images.
    everywhere = dit_sample_reference(torch, sd, vae_folder[1], latents, labels, 1 + w, steps, noises,
                                      guided_channels=4)  # fmt: skip
    assert np.abs(everywhere - expected).max() > 5
    assert np.abs(pipe.sample(3, class_label=labels, guidance=0.5, latents=latents, steps=steps, seed=seed)
                  .astype(float) - expected).max() > 5  # fmt: skip


def test_bfloat16_holds_bfloat16_weights_and_samples_near_float32(tiny_size, dit_file, vae_folder, pipeline_folder):
    """`dtype="bfloat16"`: the transformer's weights rounded to bfloat16 as they are read (a `.pt` and a DiTPipeline
    folder), the VAE float32; the images stay near the float32 pipeline's."""
    import jax
    import ml_dtypes

    for path, options in ((dit_file[0], dict(vae=vae_folder[0])), (pipeline_folder, {})):
        exact, half = (Pipeline.from_pretrained(path, dtype=dtype, **options) for dtype in ("float32", "bfloat16"))
        assert half.config.model.dit.dtype == "bfloat16"
        rounded = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), exact.params)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a).view(np.uint16), b.view(np.uint16)),
                     half.params, rounded)  # fmt: skip
        assert {np.dtype(a.dtype) for a in jax.tree.leaves(half.autoencoder.params)} == {np.dtype(np.float32)}
    latents = np.random.default_rng(1).standard_normal((3, *LATENT)).astype(np.float32)
    draw = dict(class_label=[1, 4, 2], guidance=2.0, latents=latents, steps=5, seed=5)
    ours, reference = (Pipeline.from_pretrained(dit_file[0], vae=vae_folder[0], dtype=dtype).sample(3, **draw)
                       for dtype in ("bfloat16", "float32"))  # fmt: skip
    error = np.abs(ours.astype(float) - reference).mean()
    assert 0 < error < 3.0, error  # mean over uint8 levels


@pytest.mark.parametrize(("sampler", "guidance", "steps"), [("ddim", 1.5, 5), ("dpm_solver++", 0.0, 4)])
def test_pipeline_folder_matches_diffusers(torch, diffusers, pipeline_folder, sampler, guidance, steps):
    pipe = Pipeline.from_pretrained(pipeline_folder)
    assert (pipe.default_sampler, pipe.image_shape, pipe.config.sampling.guidance_channels) == ("ddim", IMAGE, 0)
    assert pipe.class_names == {"tench": 0, "Tinca tinca": 0, "golden retriever": 207}
    labels = [207, 3, 999]
    generator_seed = 11
    latents = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(generator_seed), dtype=torch.float32)
    ours = pipe.sample(3, class_label=["golden retriever", 3, 999], guidance=guidance,
                       latents=latents.numpy().transpose(0, 2, 3, 1), sampler=sampler, steps=steps)  # fmt: skip
    reference = diffusers.DiTPipeline.from_pretrained(pipeline_folder)
    reference.set_progress_bar_config(disable=True)
    if sampler == "dpm_solver++":
        reference.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(reference.scheduler.config)
    expected = reference(labels, guidance_scale=1 + guidance, num_inference_steps=steps, output_type="np",
                         generator=torch.Generator().manual_seed(generator_seed)).images * 255  # fmt: skip
    assert_images_match(ours, expected)


def test_latents_are_checked_and_honoured(dit_file, vae_folder, tiny_size, tmp_path):
    pipe = Pipeline.from_pretrained(dit_file[0], vae=vae_folder[0])
    for bad, what in [(np.zeros((2, 8, 8, 3), np.float32), "shape (2, 8, 8, 3)"),
                      (np.zeros((2, 8, 8, 4), np.int32), "dtype int32"),
                      (np.zeros((3, 8, 8, 4), np.float32), "shape (3, 8, 8, 4)")]:  # fmt: skip
        with pytest.raises(UsageError) as err:
            pipe.sample(2, class_label=1, latents=bad, steps=2)
        assert what in str(err.value) and "(2, 8, 8, 4)" in str(err.value) and "\n" not in str(err.value)
    # A pixel-space model (no autoencoder) starts from the latents too: ddim (η = 0) is then seed-independent.
    config, params = read_dit_run(dit_file[0])
    pixel = Pipeline(config, params)
    assert pixel.image_shape == LATENT
    latents = np.random.default_rng(2).standard_normal((2, 2, *LATENT)).astype(np.float32)
    first, second, other = (pixel.sample(2, class_label=[0, 3], sampler="ddim", steps=3, seed=seed, latents=given)
                            for seed, given in ((0, latents[0]), (1, latents[0]), (0, latents[1])))  # fmt: skip
    np.testing.assert_array_equal(first, second)
    assert np.abs(first.astype(int) - other).max() > 20


def test_latents_start_a_continuous_model_too():
    """A continuous process's prior sample is prior_std·latents: with the deterministic heun sampler the seed no
    longer matters."""
    config = load_config("digits_edm", ["--config.model.song_unet.channel_mult=(1,)",
                                        "--config.model.song_unet.attn_resolutions=()"])  # fmt: skip
    model = create_model(config.model)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), *example_inputs(config.model))["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    pipe = Pipeline(config, params)
    latents = np.random.default_rng(3).standard_normal((2, 2, 8, 8, 1)).astype(np.float32)
    first, second, other = (pipe.sample(2, steps=2, seed=seed, latents=given)
                            for seed, given in ((0, latents[0]), (1, latents[0]), (0, latents[1])))  # fmt: skip
    np.testing.assert_array_equal(first, second)
    assert np.abs(first.astype(int) - other).max() > 20


def test_loading_refusals(dit_file, vae_folder, pipeline_folder, tiny_size, torch, tmp_path):
    assert (detect_format(dit_file[0]), detect_format(pipeline_folder)) == ("dit", "dit_pipeline")
    cases = [
        (lambda: Pipeline.from_pretrained(dit_file[0]), UsageError, "holds only the network: give vae="),
        (lambda: Pipeline.from_pretrained(pipeline_folder, vae=vae_folder[0]), UsageError, "has its own vae/"),
        (lambda: Pipeline.from_pretrained(dit_file[0], vae=vae_folder[0], config="cifar10"), UsageError,
         "config='cifar10': DiT weights carry their own config"),
        (lambda: load_weights(pipeline_folder), UsageError, "is a DiT pipeline folder"),
    ]
    cases.append((lambda: Pipeline.from_pretrained(pipeline_folder, variant="sit"), UsageError,
                  "variant='sit' tells a DiT from a SiT checkpoint (.pt)"))  # fmt: skip
    cases.append((lambda: Pipeline.from_pretrained(pipeline_folder, dtype="float16"), UsageError,
                  "dtype='float16' is not one of ('float32', 'bfloat16')"))
    settings = json.loads((pipeline_folder / "scheduler" / "scheduler_config.json").read_text())
    for change, message in [({"use_beta_sigmas": True}, "use_beta_sigmas=True"), ({"shift": 3.0}, "shift=3.0"),
                            ({"_class_name": "KDPM2DiscreteScheduler"}, "unsupported scheduler _class_name='KDPM2DiscreteScheduler'")]:
        folder = tmp_path / f"folder_{len(cases)}"
        shutil.copytree(pipeline_folder, folder)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**settings, **change}))
        cases.append((lambda folder=folder: Pipeline.from_pretrained(folder), WeightsError, message))
    for call, kind, message in cases:
        with pytest.raises(kind) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


# --------------------------------------------------------------------------- the `sample` verb


def assert_sample_refusals(capsys, tmp_path, refused) -> None:
    """Each (flags, message) of `refused`: `jaxdiff sample` with those flags exits 2 with one line holding the
    message, and writes nothing."""
    for flags, message in refused:
        target = tmp_path / "refused.png"
        assert main(["sample", *flags, "--num", "1", "--out", str(target)]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not target.exists()


@pytest.mark.timeout(120)
def test_sample_verb_on_the_tiny_files(capsys, tmp_path, dit_file, vae_folder, pipeline_folder, tiny_size):
    out = tmp_path / "grid.png"
    argv = ["sample", "--pretrained", dit_file[0], "--vae", str(vae_folder[0]), "--class-label", "3", "--guidance",
            "4", "--steps", "3", "--num", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert np.asarray(Image.open(out)).shape[-1] == 3 and out.stat().st_size > 0
    out_folder = tmp_path / "g.png"
    assert main(["sample", "--pretrained", str(pipeline_folder), "--class-label", "207", "--steps", "2", "--num", "2",
                 "--dtype", "bfloat16", "--out", str(out_folder)]) == 0, capsys.readouterr().err  # fmt: skip
    assert out_folder.is_file()
    capsys.readouterr()
    refused = [
        (["--pretrained", dit_file[0]], "give --vae FOLDER"),
        (["--pretrained", str(pipeline_folder), "--vae", str(vae_folder[0])], "--vae: the autoencoder and variant "
         "of a DiT/SiT checkpoint (.pt); a DiTPipeline folder has its own vae/"),
        (["--workdir", str(tmp_path), "--vae", str(vae_folder[0])], "--vae: the autoencoder and variant of a DiT"),
        (["--workdir", str(tmp_path), "--dtype", "bfloat16"], "--dtype: the dtype of released weights (--pretrained)"),
        (["--pretrained", dit_file[0], "--vae", str(vae_folder[0]), "--prompt", "a cat"], "--vae: the autoencoder"),
        (["--pretrained", dit_file[0], "--vae", str(tmp_path / "none")], "--vae"),
        (["--pretrained", dit_file[0], "--vae", str(vae_folder[0]), "--config", "cifar10"], "--config 'cifar10'"),
        (["--pretrained", str(pipeline_folder), "--eta", "0.5"], "eta=0.5"),
        (["--pretrained", str(pipeline_folder), "--steps", "0"], "steps=0 must be an int in [1, 1000]"),
        (["--pretrained", str(pipeline_folder), "--sampler", "pc"], "unknown sampler 'pc'"),
        (["--pretrained", str(pipeline_folder), "--spacing", "quadratic"], "spacing='quadratic'"),
        (["--pretrained", str(pipeline_folder), "--trajectory", str(tmp_path / "t.png")], "--trajectory"),
    ]
    assert_sample_refusals(capsys, tmp_path, refused)
    assert main(["convert", dit_file[0], str(tmp_path / "converted")]) == 2
    assert "is a DiT checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------- DiT run configs


def dit_overrides(**extra) -> list[str]:
    """A tiny pixel-space DiT on the tiny config's 16×16×3 images, 4 classes, learned σ."""
    settings = {"model.network": "dit", "model.num_classes": 4, "model.out_channels": 6,
                "diffusion.var_type": "learned_range", "diffusion.loss_type": "hybrid", "model.dit.input_size": 16,
                "model.dit.patch_size": 4, "model.dit.in_channels": 3, "model.dit.hidden_size": 32,
                "model.dit.depth": 2, "model.dit.num_heads": 2, "model.dit.num_classes": 4,
                "training.label_dropout": 0.1, "training.warmup_steps": 0, "training.learning_rate": 3e-3,
                **extra}  # fmt: skip
    return [f"--config.{key}={value}" for key, value in settings.items()]


def test_dit_config_validates_trains_and_reports_its_size(capsys):
    config = load_config(TINY_CONFIG, dit_overrides())
    assert validate(config) is config
    model = create_model(config.model)
    tx = make_optimizer(config.training)
    state = jax.jit(lambda: init_train_state(config, model, tx))()
    step = jax.jit(make_train_step(config, model, tx))
    loss_fn = jax.jit(make_loss_fn(config, model))
    labels = jnp.arange(8, dtype=jnp.int32) % 4
    images = jnp.asarray(np.broadcast_to(np.arange(16, dtype=np.uint8)[None, :, None, None] * 16, (8, 16, 16, 3)))
    batch = {"image": images, "label": labels}  # a smooth fixed batch, quick to fit
    probe = [jax.random.PRNGKey(100 + i) for i in range(4)]  # fixed t, noise and dropped labels

    def held_loss(params) -> float:
        return float(np.mean([loss_fn(params, images, labels, key) for key in probe]))

    before = held_loss(state.params)
    for _ in range(20):
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
    assert held_loss(state.params) < 0.7 * before
    assert main(["info", "--config", TINY_CONFIG, *dit_overrides()]) == 0
    printed = capsys.readouterr().out
    params, _ = closed_form_counts(2, 32, 2, 4, c=3, size=16, classes=4)
    assert f"parameters: {params:,}" in printed


def test_label_dropout_acts_once():
    """With the discrete schedule the family runs the DiT with train=False: its class_dropout_prob only adds the
    null row, and the loss does not depend on the dropout key (the training step dropped the labels already)."""
    config = load_config(TINY_CONFIG, dit_overrides(**{"model.dit.class_dropout_prob": 0.5}))
    model = create_model(config.model)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), *example_inputs(config.model))["params"]
    leaves, tree = jax.tree.flatten(params)  # random everywhere: a fresh DiT's zero layers hide its labels
    keys = jax.random.split(jax.random.PRNGKey(9), len(leaves))
    params = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
    loss = jax.jit(family_of(config).loss_fn(model))
    x = jax.random.uniform(jax.random.PRNGKey(0), (8, 16, 16, 3), minval=-1, maxval=1)
    labels = jnp.arange(8) % 4
    keys = [jax.random.PRNGKey(i) for i in range(4)]
    losses = {float(loss(params, x, labels, keys[0], keys[1], dropout)) for dropout in keys}
    assert len(losses) == 1
    assert float(loss(params, x, jnp.full(8, 4), keys[0], keys[1], keys[2])) not in losses  # labels matter


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.dit.input_size": 8}, "model.dit.input_size=8 must equal model.image_size=16"),
        ({"model.dit.num_classes": 3}, "model.dit.num_classes=3 must equal model.num_classes=4"),
        ({"model.out_channels": 3}, "model.out_channels=3 must equal the DiT's 6 output channels"),
        ({"diffusion.var_type": "fixedlarge"}, "model.dit.learn_sigma=True does not suit diffusion.var_type="
                                               "'fixedlarge'"),
        ({"diffusion.loss_type": "mse"}, "diffusion.loss_type='mse': a DiT's σ channels learn through the bound"),
        ({"model.dit.class_dropout_prob": 0.0, "model.null_label": False},
         "training.label_dropout=0.1 needs the DiT's null-class row"),
        ({"model.dit.class_dropout_prob": 0.0}, "model.null_label=True must be False"),
        ({"diffusion.process": "flow", "diffusion.loss_type": "flow_matching", "diffusion.parameterization":
          "velocity", "sampling.sampler": "euler", "model.dit.learn_sigma": False, "model.out_channels": 3},
         "training.label_dropout=0.1 with model.dit.class_dropout_prob=0.1 would drop labels twice"),
        ({"model.dit.hidden_size": 30}, "config model.dit: hidden_size=30"),
        ({"sampling.guidance_channels": 4}, "sampling.guidance_channels=4 exceeds model.in_channels=3"),
    ],
)
def test_dit_config_refusals_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(load_config(TINY_CONFIG, dit_overrides(**overrides)))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_bits_per_dim_of_a_latent_space_model_is_refused(tiny_size, dit_file, vae_folder, tmp_path):
    from jaxdiff.evaluation.evaluate import evaluate

    pipe = Pipeline.from_pretrained(dit_file[0], vae=vae_folder[0])
    with pytest.raises(UsageError, match=r"^bits/dim is the likelihood of a pixel-space model; .* use fid, is or pr$"):
        evaluate(pipe, str(tmp_path), metrics=("bpd",), progress=False)
    assert not list(tmp_path.iterdir())
