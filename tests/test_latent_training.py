"""Latent, text-conditioned diffusion training: the loss against a float64 NumPy reference, caption dropout,
the step's EMA, and sample grids with and without guidance against a NumPy DDIM loop."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff.training import latent_step as lt
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.models.clip_text import clip_text_config, create_clip_text
from jaxdiff.models.unet_condition import create_unet_condition
from jaxdiff.models.unet_condition_config import config_from_diffusers
from jaxdiff.training.step import make_optimizer
from jaxdiff.latent.word_tokenizer import WordTokenizer

CAPTIONS = ["a small red circle", "a large blue square", "a small green triangle"]
IMAGE, LATENT = 16, (8, 8, 4)
TOKENIZER = WordTokenizer.from_captions(CAPTIONS, max_length=8)


def tiny_networks(seed=0, *, frozen_text=False):
    vae_config = autoencoder_config(dict(
        block_out_channels=[8, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=IMAGE,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, scaling_factor=0.7,
    ))  # fmt: skip
    unet_config = config_from_diffusers(dict(
        sample_size=8, block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1, cross_attention_dim=16,
        attention_head_dim=2, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    ))  # fmt: skip
    text_config = clip_text_config(dict(
        vocab_size=TOKENIZER.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=8, eos_token_id=3, bos_token_id=2, pad_token_id=0,
    ))  # fmt: skip
    vae, text = create_autoencoder(vae_config), create_clip_text(text_config)
    vae_rng, text_rng = jax.random.split(jax.random.PRNGKey(100 + seed))
    frozen = {"vae": vae.init(vae_rng, jnp.zeros((1, IMAGE, IMAGE, 3)))["params"]}
    if frozen_text:
        frozen["text"] = text.init(text_rng, jnp.zeros((1, 8), jnp.int32))["params"]
    return lt.LatentNetworks(create_unet_condition(unet_config), text, vae, vae_config, not frozen_text, frozen)


def diffusion_section(mean_type="eps"):
    return ml_collections.ConfigDict(dict(schedule="linear", num_timesteps=50, beta_start=1e-3, beta_end=0.2,
                                          mean_type=mean_type, min_snr_gamma=0.0))  # fmt: skip


def training_section():
    return ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=0, grad_clip_norm=1.0, adam_b1=0.9,
                                          adam_b2=0.99, adam_eps=1e-8, ema_decay=0.9))  # fmt: skip


def alphas_cumprod(d):
    return np.cumprod(1.0 - np.linspace(d.beta_start, d.beta_end, d.num_timesteps, dtype=np.float64))


@pytest.fixture(scope="module")
def networks():
    return tiny_networks()


@pytest.fixture(scope="module")
def params(networks):
    return lt.init_latent_params(networks, jax.random.PRNGKey(1), LATENT, TOKENIZER.max_length)


def ids_of(captions):
    return jnp.asarray(TOKENIZER.encode(captions).input_ids)


@pytest.mark.parametrize("mean_type", ["eps", "v"])
def test_latent_loss_matches_numpy(networks, params, mean_type):
    d = diffusion_section(mean_type)
    rng = np.random.default_rng(0)
    z0 = rng.standard_normal((3, *LATENT))
    noise = rng.standard_normal((3, *LATENT))
    t = np.array([0, 17, 49])
    ids = ids_of(CAPTIONS)
    schedule = lt.schedule_from_config(d)
    loss = lt.latent_loss(networks, schedule, d, params, jnp.asarray(z0, jnp.float32), ids, jnp.asarray(t, jnp.int32),
                          jnp.asarray(noise, jnp.float32))  # fmt: skip

    ab = alphas_cumprod(d)[t][:, None, None, None]
    z_t = np.sqrt(ab) * z0 + np.sqrt(1 - ab) * noise
    context = networks.text.apply({"params": params["text"]}, ids).last_hidden_state
    output = np.asarray(networks.unet.apply({"params": params["unet"]}, jnp.asarray(z_t, jnp.float32), t, context),
                        np.float64)  # fmt: skip
    target = noise if mean_type == "eps" else np.sqrt(ab) * noise - np.sqrt(1 - ab) * z0
    np.testing.assert_allclose(float(loss), np.mean((target - output) ** 2), rtol=1e-5)


def test_caption_dropout_uses_the_empty_prompt(networks, params):
    schedule = lt.schedule_from_config(diffusion_section())
    empty = TOKENIZER.encode("").input_ids[0]
    images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (3, IMAGE, IMAGE, 3)), jnp.uint8)
    rng = jax.random.PRNGKey(5)
    losses = {}
    for rate in (0.0, 1.0):
        loss_fn = lt.make_latent_loss_fn(networks, schedule, diffusion_section(), caption_dropout=rate,
                                         empty_ids=empty)  # fmt: skip
        for name, captions in (("captions", CAPTIONS), ("empty", [""] * 3)):
            losses[rate, name] = float(loss_fn(params, images, ids_of(captions), rng))
    assert losses[1.0, "captions"] == losses[1.0, "empty"] == losses[0.0, "empty"]
    assert abs(losses[0.0, "captions"] - losses[0.0, "empty"]) > 1e-6


def test_drop_captions_replaces_exactly_the_dropped_rows():
    ids = ids_of(CAPTIONS)
    empty = TOKENIZER.encode("").input_ids[0]
    out = np.asarray(lt.drop_captions(ids, jnp.asarray(empty), jnp.array([False, True, False])))
    np.testing.assert_array_equal(out[[0, 2]], np.asarray(ids)[[0, 2]])
    np.testing.assert_array_equal(out[1], empty)


def test_train_step_updates_params_and_ema(networks):
    training = training_section()
    tx = make_optimizer(training)
    state = lt.init_latent_state(networks, tx, 0, LATENT, TOKENIZER.max_length)
    schedule = lt.schedule_from_config(diffusion_section())
    loss_fn = lt.make_latent_loss_fn(networks, schedule, diffusion_section(), caption_dropout=0.1,
                                     empty_ids=TOKENIZER.encode("").input_ids[0])  # fmt: skip
    step = jax.jit(lt.make_latent_train_step(loss_fn, training, tx))
    batch = {"image": jnp.asarray(np.random.default_rng(2).integers(0, 256, (3, IMAGE, IMAGE, 3)), jnp.uint8),
             "input_ids": ids_of(CAPTIONS)}  # fmt: skip
    new, metrics = step(state, batch)
    assert int(new.step) == 1 and int(metrics["skipped_updates"]) == 0
    assert set(new.params) == {"unet", "text"}
    for old, p, ema in zip(*(jax.tree.leaves(x) for x in (state.params, new.params, new.ema_params))):
        np.testing.assert_allclose(np.asarray(ema), 0.9 * np.asarray(old) + 0.1 * np.asarray(p), rtol=1e-6, atol=1e-7)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params))]
    assert min(moved) > 0  # both networks learn, the text transformer too
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_frozen_text_encoder_is_not_trained():
    frozen = tiny_networks(frozen_text=True)
    params = lt.init_latent_params(frozen, jax.random.PRNGKey(1), LATENT, TOKENIZER.max_length)
    assert set(params) == {"unet"}
    context = lt.text_context(frozen, params, ids_of(CAPTIONS))
    reference = frozen.text.apply({"params": frozen.frozen["text"]}, ids_of(CAPTIONS)).last_hidden_state
    np.testing.assert_array_equal(np.asarray(context), np.asarray(reference))


def reference_ddim(networks, params, scheduler, steps, cond_ids, uncond_ids, guidance, x_start):
    """Deterministic DDIM (η = 0) in float64 NumPy on the trailing steps, guidance as diffusers: eps from
    uncond + g·(cond − uncond) when g > 1, else cond; the last step goes to ᾱ = 1."""
    ab = np.asarray(scheduler.schedule.alphas_cumprod, np.float64)
    T = len(ab)
    timesteps = (np.round(np.arange(T, 0, -T / steps)) - 1).astype(int)
    cond = networks.text.apply({"params": params["text"]}, cond_ids).last_hidden_state
    uncond = networks.text.apply({"params": params["text"]}, uncond_ids).last_hidden_state
    unet = jax.jit(networks.unet.apply)  # the network alone, one program; the steps are the NumPy below
    x = np.asarray(x_start, np.float64)
    for i, t in enumerate(timesteps):
        def eps(context, x=x, t=t):
            out = unet({"params": params["unet"]}, jnp.asarray(x, jnp.float32), jnp.full(len(x), t), context)
            return np.asarray(out, np.float64)

        e = eps(cond) if guidance <= 1 else eps(uncond) + guidance * (eps(cond) - eps(uncond))
        x0 = (x - np.sqrt(1 - ab[t]) * e) / np.sqrt(ab[t])
        ab_next = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        x = np.sqrt(ab_next) * x0 + np.sqrt(1 - ab_next) * e
    return x


def test_grid_sampler_guidance_matches_a_numpy_ddim_loop(networks, params):
    scheduler = lt.run_scheduler(diffusion_section())
    prompts = CAPTIONS[:2]
    rng = jax.random.PRNGKey(3)
    x_start = jax.random.normal(jax.random.split(rng)[0], (2, *LATENT), jnp.float32)
    grids = {}
    for guidance in (0.0, 1.0, 3.0):
        sample_grid = lt.make_grid_sampler(networks, scheduler, ids_of(prompts), TOKENIZER.encode("").input_ids[0],
                                           LATENT, sampler="ddim", steps=4, guidance=guidance)  # fmt: skip
        grids[guidance] = np.asarray(jax.jit(sample_grid)(params, rng))
        latents = reference_ddim(networks, params, scheduler, 4, ids_of(prompts), ids_of([""] * 2), guidance, x_start)
        decoded = networks.vae.apply({"params": networks.frozen["vae"]}, jnp.asarray(latents / 0.7, jnp.float32),
                                     method=networks.vae.decode)  # fmt: skip
        np.testing.assert_allclose(grids[guidance], np.clip(np.asarray(decoded), -1, 1), atol=2e-4)
    np.testing.assert_array_equal(grids[0.0], grids[1.0])  # guidance 0 and 1: the conditional model alone
    assert np.max(np.abs(grids[3.0] - grids[1.0])) > 1e-3


# --------------------------------------------------------------------------- end to end through `jaxdiff train`

AE_STEP, AE_SCALING = 7, 0.8


def write_autoencoder_run(workdir, *, step=AE_STEP, scaling_factor=AE_SCALING, seed=0):
    """A tiny autoencoder run's checkpoint (random weights; 32×32×3 -> 16×16×4), with its scaling factor."""
    from jaxdiff.training import checkpoint
    from jaxdiff.config import default_config
    from jaxdiff.training.runs import make_task

    config = default_config()
    config.task, config.seed, config.data.dataset, config.data.random_flip = "autoencoder", seed, "shapes", False
    config.autoencoder.block_out_channels, config.autoencoder.norm_num_groups = (8, 8), 8
    state = jax.jit(make_task(config).init_state)()
    manager = checkpoint.make_manager(workdir)
    checkpoint.save(manager, step, state, config, extras={"scaling_factor": scaling_factor})
    manager.wait_until_finished()
    manager.close()
    return str(workdir)


def latent_run_config(autoencoder, *, steps=4):
    from jaxdiff.config import default_config

    c = default_config()
    c.task, c.data.dataset, c.data.random_flip = "latent", "shapes", False
    c.latent.autoencoder = autoencoder
    u, x = c.latent.unet, c.latent.text
    u.block_out_channels, u.attention_levels, u.norm_num_groups, u.attention_heads = (16,), (0,), 8, 2
    x.vocab_size, x.max_length, x.hidden_size, x.intermediate_size = 32, 12, 16, 32
    x.num_hidden_layers, x.num_attention_heads = 1, 2
    c.diffusion.num_timesteps = 100
    t = c.training
    t.batch_size, t.num_train_steps, t.warmup_steps, t.learning_rate = 4, steps, 0, 1e-3
    t.checkpoint_every_steps, t.sample_every_steps, t.num_sample_images, t.log_every_steps = 2, 4, 2, 1
    c.sampling.sampler, c.sampling.steps, c.sampling.guidance = "ddim", 3, 3.0
    return c


def train(config, workdir, **kwargs):
    from jaxdiff.training.loop import train_and_evaluate

    return train_and_evaluate(config, workdir, progress=False, **kwargs)


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory):
    return write_autoencoder_run(tmp_path_factory.mktemp("autoencoder"))


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, autoencoder_run):
    workdir = tmp_path_factory.mktemp("latent")
    train(latent_run_config(autoencoder_run), workdir)
    return workdir


@pytest.mark.slow
def test_run_checkpoints_grids_and_what_it_was_trained_on(latent_run, autoencoder_run):
    from jaxdiff.training import checkpoint

    steps = sorted(int(p.name) for p in (latent_run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    assert (latent_run / "samples" / "step_00000004.png").is_file()
    extras = checkpoint.read_extras(latent_run)
    assert extras["autoencoder"] == {"path": autoencoder_run, "step": AE_STEP, "scaling_factor": AE_SCALING}
    tokenizer = WordTokenizer.from_json(extras["tokenizer"])
    assert tokenizer.vocab_size == 23 and "triangle" in tokenizer.words
    assert len(extras["sample_prompts"]) == 2 and extras["sample_prompts"][0].startswith("a ")
    assert (latent_run / "samples" / "step_00000004.txt").read_text().splitlines() == [
        f"row 1, column {i + 1}: {prompt}" for i, prompt in enumerate(extras["sample_prompts"])
    ]


@pytest.mark.slow
def test_resume_is_bitwise_exact(tmp_path, latent_run, autoencoder_run):
    from jaxdiff.training.runs import load_run

    train(latent_run_config(autoencoder_run, steps=2), tmp_path)
    assert train(latent_run_config(autoencoder_run, steps=4), tmp_path).step == 4
    resumed, uninterrupted = (load_run(w, step=4, ema=False)[2] for w in (tmp_path, latent_run))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def pipe(latent_run):
    from jaxdiff.sampling.pipeline import Pipeline

    return Pipeline.from_checkpoint(latent_run)


@pytest.mark.slow
def test_text_to_image_guidance_matches_a_numpy_ddim_loop(pipe):
    prompts = ["a small blue triangle in the bottom right", "a large red circle in the top left"]
    tokenize = lambda p: jnp.asarray(pipe.model.tokenizer(p).input_ids)  # noqa: E731
    networks = lt.LatentNetworks(pipe.unet, pipe.text_encoder, pipe.vae, pipe.model.vae_config, True, {})
    x_start = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    images = {}
    for guidance in (0.0, 1.0, 3.0):
        images[guidance] = pipe.text_to_image(prompts, guidance=guidance, steps=3, latents=x_start, output_type="float")
        latents = reference_ddim(networks, pipe.params, pipe.scheduler, 3, tokenize(prompts), tokenize([""] * 2),
                                 guidance, x_start)  # fmt: skip
        decoded = pipe.vae.apply({"params": pipe.params["vae"]}, jnp.asarray(latents / AE_SCALING, jnp.float32),
                                 method=pipe.vae.decode)  # fmt: skip
        np.testing.assert_allclose(images[guidance], np.clip(np.asarray(decoded) / 2 + 0.5, 0, 1), atol=2e-4)
    np.testing.assert_array_equal(images[0.0], images[1.0])  # guidance 0 is the conditional model
    assert np.max(np.abs(images[3.0] - images[1.0])) > 1e-3


@pytest.mark.slow
def test_prompt_words_outside_the_vocabulary_are_named(pipe):
    with pytest.raises(ValueError, match=r"outside the vocabulary: \['hexagon', 'purple'\]"):
        pipe.text_to_image(["a purple hexagon in the top left"], steps=2)


@pytest.mark.slow
def test_sample_cli_draws_a_grid_of_the_prompt(latent_run, tmp_path):
    from PIL import Image

    from jaxdiff.cli import main

    out = tmp_path / "grid.png"
    argv = ["sample", "--workdir", str(latent_run), "--prompt", "a small blue triangle in the bottom right",
            "--num", "4", "--steps", "3", "--guidance", "3", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert np.asarray(Image.open(out)).std() > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, line",
    [
        ([], 'is a text-to-image model: give --prompt (--prompt "" draws unconditional samples)'),
        (["--negative-prompt", "a red square"], "--negative-prompt: options of text-to-image, which needs --prompt"),
        (["--prompt", "a red square", "--steps", "0"], "steps=0 must be an int in [1, 100]"),
        (["--prompt", "a red square", "--eta", "0.5", "--class-label", "3", "--snr", "0.2"],
         "--eta, --class-label, --snr: options of pixel-space sampling; text-to-image (--prompt) does not take them"),
        (["--prompt", "a red square", "--trajectory", "t.png"], "--trajectory: options of pixel-space sampling"),
        (["--prompt", "a red square", "--spacing", "quadratic"], "--spacing 'quadratic': text-to-image takes only"),
        (["--prompt", "a red square", "--dtype", "bfloat16"], "--dtype: the dtype of released weights (--pretrained)"),
    ],
)  # fmt: skip
def test_every_sample_flag_on_a_latent_run_is_honoured_or_refused(latent_run, tmp_path, capsys, flags, line):
    from jaxdiff.cli import main

    out = tmp_path / "grid.png"
    assert main(["sample", "--workdir", str(latent_run), "--num", "2", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert line in err and "\n" not in err and not out.exists(), err


@pytest.mark.slow
def test_the_empty_prompt_draws_unconditional_samples(latent_run, tmp_path):
    from jaxdiff.cli import main

    out = tmp_path / "grid.png"
    assert main(["sample", "--workdir", str(latent_run), "--prompt", "", "--num", "2", "--steps", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    assert out.exists()


@pytest.mark.slow
def test_eval_of_a_latent_run_is_refused_in_one_line(latent_run, capsys):
    from jaxdiff.cli import main

    assert main(["eval", "--workdir", str(latent_run), "--metrics", "fid", "--num-samples", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval scores pixel-space models" in err and "text-to-image model" in err and "\n" not in err, err


@pytest.mark.slow
def test_resuming_against_another_autoencoder_is_refused(latent_run, autoencoder_run, tmp_path):
    from jaxdiff.training.checkpoint import CheckpointError

    other = write_autoencoder_run(tmp_path / "other", step=3, scaling_factor=1.25, seed=1)
    with pytest.raises(CheckpointError, match=f"latent.autoencoder: '{autoencoder_run}' -> '{other}'"):
        train(latent_run_config(other, steps=6), latent_run)
    refused = rf"trained on the autoencoder {autoencoder_run} \(checkpoint step 7.*given {other} \(checkpoint step 3, "
    with pytest.raises(ValueError, match=refused + r"scaling factor 1.25\)"):
        train(latent_run_config(other, steps=6), latent_run, allow_config_change=True)


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_autoencoder_workdir_without_a_checkpoint_is_refused(tmp_path, make):
    from jaxdiff.training.tasks.latent import LatentTask

    workdir = tmp_path / "ae"
    if make == "empty":
        workdir.mkdir()
    expected = "does not exist" if make == "missing" else "has no checkpoint: train the autoencoder first"
    with pytest.raises(ValueError, match=f"latent.autoencoder='{workdir}' {expected}"):
        LatentTask(latent_run_config(str(workdir)))


def test_fine_tuning_a_stable_diffusion_unet_with_its_frozen_text_encoder(tmp_path, diffusers):
    from jaxdiff import data
    from jaxdiff.latent.unet_weights import read_unet_condition
    from jaxdiff.training.tasks.latent import LatentTask
    from tests.test_stable_diffusion import components, save

    folder = tmp_path / "sd"
    save(diffusers.StableDiffusionPipeline, components(folder=tmp_path), folder)
    config = latent_run_config(str(folder))
    config.latent.text_encoder = config.latent.unet_init = str(folder)
    with pytest.raises(ValueError, match=r"another noise schedule: diffusion.schedule='linear' \(its 'quad'\), "
                                         r"diffusion.num_timesteps=100 \(its 1000\)"):  # fmt: skip
        LatentTask(config)
    d = config.diffusion
    d.schedule, d.num_timesteps, d.beta_start, d.beta_end = "quad", 1000, 0.00085, 0.012
    source = data.ShapesSource(num_examples=16)
    task = LatentTask(config, source)
    task.check_source(source)
    state = jax.jit(task.init_state)()
    assert set(state.params) == {"unet"}  # the text encoder stays frozen
    for ours, released in zip(jax.tree.leaves(state.params["unet"]), jax.tree.leaves(read_unet_condition(folder)[1])):
        np.testing.assert_array_equal(np.asarray(ours), released)
    local = data.batch_for_step(source, seed=0, step=0, global_batch_size=4, process_index=0, process_count=1)
    batch = task.host_batch(local)
    assert batch["input_ids"].shape == (4, 77) and batch["input_ids"].dtype == np.int32  # CLIP's tokenizer
    new, metrics = jax.jit(task.train_step)(state, batch)
    assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped_updates"]) == 0
    kernel = lambda s: np.asarray(s.params["unet"]["conv_in"]["kernel"])  # noqa: E731
    assert not np.array_equal(kernel(new), kernel(state))
