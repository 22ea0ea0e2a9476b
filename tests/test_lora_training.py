"""LoRA training of a frozen Stable Diffusion U-Net (`training.lora`): the effective kernel W + (alpha/r)·up @ down
against float64 NumPy; peft's initialisation (the first step's loss is the base model's); steps that move only
the adapters and lower the loss; checkpoints holding only the adapters, resumed bitwise, refused on another base;
`Pipeline.from_checkpoint` with the adapters loaded; `jaxdiff convert --to diffusers-lora` read back by
`jaxdiff.latent.lora` and, with torch, by diffusers' `load_lora_weights` (same images to 1e-4); every refusal in
one line. The tiny SD folder is written here from random JAX weights (no torch needed)."""

import json

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import cli, data
from jaxdiff.config import default_config
from jaxdiff.convert.formats import convert
from jaxdiff.convert.stable_diffusion_export import write_stable_diffusion
from jaxdiff.diffusion.scheduler_config import scheduler_settings
from jaxdiff.errors import ConfigError, UsageError, WeightsError
from jaxdiff.latent.bundle import LatentModels
from jaxdiff.latent.lora import adapted_params, match_lora
from jaxdiff.latent.pipeline import LatentPipeline
from jaxdiff.latent.unet_weights import read_unet_condition, unet_condition_shapes
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.models.clip_text import clip_text_config, create_clip_text
from jaxdiff.models.unet_condition import create_unet_condition
from jaxdiff.models.unet_condition_config import config_from_diffusers
from jaxdiff.training import checkpoint
from jaxdiff.training import latent_step as lt
from jaxdiff.weights.lora_files import LORA_WEIGHTS_FILE, METADATA_KEY, read_lora_file
from tests.test_lora import UNET, VAE, _random_params

START, END = 512, 513  # ids of <|startoftext|>, <|endoftext|> in the byte-level vocabulary written below
CLIP = dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=START, eos_token_id=END, pad_token_id=END,
            hidden_act="quick_gelu")  # fmt: skip
SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                 prediction_type="epsilon")  # fmt: skip
PROMPTS = ["a small red circle", "a large blue square"]
# Dense attention projections, 1×1 convolution projections and 3×3 resnet convolutions (4-D adapters).
TARGETS = "to_q,to_k,to_v,to_out.0,proj_in,conv1"


def _write_tokenizer(folder):
    """A CLIP tokenizer folder: the byte-level alphabet (with and without "</w>"), no merges, start and end."""
    folder.mkdir()
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable] + [chr(256 + k) for k in range(256 - len(printable))]  # CLIP's order
    vocab = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}  # fmt: skip
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "do_lower_case": True}))


def write_sd_folder(tmp, name="sd", seed=0):
    """A tiny random SD 1.x folder in diffusers' layout, written by jaxdiff's exporter."""
    rng = np.random.default_rng(seed)
    unet_config, vae_config, text_config = config_from_diffusers(UNET), autoencoder_config(VAE), clip_text_config(CLIP)
    unet = _random_params(create_unet_condition(unet_config), rng, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                          jnp.zeros((1, 1, 32)))  # fmt: skip
    vae = _random_params(create_autoencoder(vae_config), rng, jnp.zeros((1, 16, 16, 3)))
    text = _random_params(create_clip_text(text_config), rng, jnp.zeros((1, 1), jnp.int32))
    _write_tokenizer(tmp / f"{name}_tokenizer")
    settings = {
        "unet": {"_class_name": "UNet2DConditionModel", **UNET},
        "vae": {"_class_name": "AutoencoderKL", "scaling_factor": 0.18215, **VAE},
        "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **CLIP},
    }
    models = LatentModels(
        unet_config=unet_config, unet_params=unet, vae_config=vae_config, vae_params=vae, text_config=text_config,
        text_params=text, tokenizer=None, scheduler=scheduler_settings(SCHEDULER, "test"),
        tokenizer_folder=tmp / f"{name}_tokenizer", settings=settings,
    )  # fmt: skip
    write_stable_diffusion(models, tmp / name)
    return tmp / name


def lora_config(folder, *, steps=4, rank=4, alpha=8.0, targets=TARGETS):
    c = default_config()
    c.task, c.data.dataset, c.data.random_flip = "latent", "shapes", False
    c.latent.autoencoder = c.latent.text_encoder = c.latent.unet_init = str(folder)
    d = c.diffusion
    d.schedule, d.num_timesteps, d.beta_start, d.beta_end = "quad", 1000, 0.00085, 0.012
    t = c.training
    t.batch_size, t.num_train_steps, t.warmup_steps, t.learning_rate, t.ema_decay = 2, steps, 0, 1e-2, 0.5
    t.checkpoint_every_steps, t.sample_every_steps, t.num_sample_images, t.log_every_steps = 2, 1000, 2, 1
    t.lora.rank, t.lora.alpha, t.lora.target_modules = rank, alpha, targets
    c.sampling.sampler, c.sampling.steps = "ddim", 2
    return c


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sd_folder(tmp_path_factory.mktemp("lora_training"))


# --------------------------------------------------------------------------- the pure parts


def test_effective_kernel_is_w_plus_scaled_up_down_in_our_layout():
    rng = np.random.default_rng(0)
    base = {"block": {"to_q": {"kernel": rng.standard_normal((6, 5)), "bias": rng.standard_normal(5)},
                      "conv1": {"kernel": rng.standard_normal((3, 3, 4, 7))}}}  # fmt: skip
    adapters = {"block": {"to_q": {"down": rng.standard_normal((2, 6)), "up": rng.standard_normal((5, 2))},
                          "conv1": {"down": rng.standard_normal((2, 4, 3, 3)),
                                    "up": rng.standard_normal((7, 2, 1, 1))}}}  # fmt: skip
    as32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)  # noqa: E731
    out = jax.jit(lt.lora_unet_params, static_argnums=2)(as32(base), as32(adapters), 1.5)
    f32 = lambda a: np.asarray(a, np.float32).astype(np.float64)  # noqa: E731 - the float32 inputs, exactly
    dense, conv = adapters["block"]["to_q"], adapters["block"]["conv1"]
    expected_dense = f32(base["block"]["to_q"]["kernel"]) + 1.5 * (f32(dense["up"]) @ f32(dense["down"])).T
    delta = np.einsum("or,rihw->hwio", f32(conv["up"])[:, :, 0, 0], f32(conv["down"]))  # OIHW written as HWIO
    expected_conv = f32(base["block"]["conv1"]["kernel"]) + 1.5 * delta
    np.testing.assert_allclose(np.asarray(out["block"]["to_q"]["kernel"]), expected_dense, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["block"]["conv1"]["kernel"]), expected_conv, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["block"]["to_q"]["bias"]), f32(base["block"]["to_q"]["bias"]))
    half = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), as32(base))  # a bfloat16 base runs in float32
    out16 = lt.lora_unet_params(half, as32(adapters), 1.5)
    assert {leaf.dtype for leaf in jax.tree.leaves(out16)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(np.asarray(out16["block"]["to_q"]["kernel"]), expected_dense, rtol=0, atol=0.05)


def test_targets_match_module_suffixes_and_init_is_peft_s():
    shapes = unet_condition_shapes(config_from_diffusers(UNET))
    targets = lt.lora_targets(shapes, ("to_q", "to_out.0", "conv1"))
    names = sorted(targets.values())
    assert names[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert all(n.endswith((".to_q", ".to_out.0", ".conv1")) for n in names)
    # 4 transformer blocks (1 down, 2 up, 1 mid) × (attn1, attn2) × (to_q, to_out.0); a conv1 per resnet (2 down,
    # 4 up, 2 mid).
    assert sum(n.endswith(".conv1") for n in names) == 8 and len(names) == 16 + 8
    assert not lt.lora_targets(shapes, ("q",))  # a suffix matches at a dot only, as peft
    params = lt.init_lora_params(jax.random.PRNGKey(0), shapes, targets, 3)
    flat = flax.traverse_util.flatten_dict(params)
    for path, name in targets.items():
        down, up = (np.asarray(flat[(*path[:-1], role)]) for role in ("down", "up"))
        fan_in = int(np.prod(down.shape[1:]))
        assert down.shape[0] == 3 and up.shape[1] == 3 and not up.any()
        assert np.abs(down).max() <= 1 / np.sqrt(fan_in) and np.abs(down).max() > 0.5 / np.sqrt(fan_in), name
        assert (down.ndim, up.shape[2:]) == ((4, (1, 1)) if name.endswith("conv1") else (2, ()))


# --------------------------------------------------------------------------- training steps


@pytest.fixture(scope="module")
def task(folder):
    from jaxdiff.training.tasks.latent import LatentTask

    source = data.ShapesSource(num_examples=8)
    task = LatentTask(lora_config(folder), source)
    task.check_source(source)
    local = data.batch_for_step(source, seed=0, step=0, global_batch_size=2, process_index=0, process_count=1)
    return task, task.host_batch(local)


@pytest.mark.slow  # about 30 s on the busy 2-core CPU: three compiled programs (two losses and the step)
def test_first_loss_is_the_base_model_s_and_steps_move_only_the_adapters(task, folder):
    task, batch = task
    state = jax.jit(task.init_state)()
    assert set(state.params) == {"lora"}
    base = read_unet_condition(folder)[1]
    empty = task.tokenize([""])[0]
    rng = jax.random.PRNGKey(7)

    def loss_fn(networks):
        loss = lt.make_latent_loss_fn(networks, task.scheduler.schedule, task.config.diffusion, caption_dropout=0.1,
                                      empty_ids=empty)  # fmt: skip
        return jax.jit(lambda params: loss(params, batch["image"], batch["input_ids"], rng))

    # The same loss on the whole released U-Net (full fine-tuning's parameters).
    base_loss = loss_fn(task.networks._replace(lora_scale=None))({"unet": base})
    loss_fn = loss_fn(task.networks)
    first = loss_fn(state.params)
    np.testing.assert_allclose(float(first), float(base_loss), rtol=1e-6)  # up = 0: ΔW = 0
    step = jax.jit(task.train_step)
    new = state
    for _ in range(6):
        new, metrics = step(new, batch)
        assert int(metrics["skipped_updates"]) == 0
    assert float(loss_fn(new.params)) < 0.97 * float(first)
    for a, b in zip(jax.tree.leaves(task.networks.frozen["unet"]), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(a), b)  # the base is bitwise unchanged
    ups = [np.asarray(u) for p, u in flax.traverse_util.flatten_dict(new.params["lora"]).items() if p[-1] == "up"]
    assert all(np.abs(u).max() > 0 for u in ups)  # every adapter learned
    assert jax.tree.structure(new.opt_state) == jax.tree.structure(state.opt_state)
    assert sum(a.size for a in jax.tree.leaves(new.opt_state)) < 3 * sum(a.size for a in jax.tree.leaves(new.params))


# --------------------------------------------------------------------------- a run: checkpoints, resume, sampling


def train(config, workdir, **kwargs):
    from jaxdiff.training.loop import train_and_evaluate

    return train_and_evaluate(config, workdir, progress=False, **kwargs)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, folder):
    workdir = tmp_path_factory.mktemp("lora_run")
    train(lora_config(folder), workdir)
    return workdir


def _adapted_numpy(base, adapters, scale):
    """float64 W + scale·up @ down of every adapted kernel, in our layout, written out."""
    flat = {p: np.asarray(a, np.float64) for p, a in flax.traverse_util.flatten_dict(base).items()}
    factors = flax.traverse_util.flatten_dict(adapters)
    for path in factors:
        if path[-1] == "down":
            down, up = (np.asarray(factors[(*path[:-1], r)], np.float64) for r in ("down", "up"))
            kernel = (*path[:-1], "kernel")
            if down.ndim == 2:
                flat[kernel] = flat[kernel] + scale * (up @ down).T
            else:
                flat[kernel] = flat[kernel] + scale * np.einsum("or,rihw->hwio", up[:, :, 0, 0], down)
    return flat


@pytest.mark.slow  # about 50 s on the busy 2-core CPU: two runs (one resumed), each compiling its step
def test_checkpoints_hold_only_the_adapters_and_resume_bitwise(lora_run, folder, tmp_path):
    from jaxdiff.training.runs import load_run

    config, step, params = load_run(lora_run, ema=False)
    assert step == 4 and set(params) == {"lora", "vae"}  # the autoencoder kept, the U-Net not
    extras = checkpoint.read_extras(lora_run)
    assert extras["lora_base"]["path"] == str(folder) and len(extras["lora_base"]["sha256"]) == 64
    saved = json.loads((lora_run / "checkpoints" / "4" / "state" / "_METADATA").read_text())["tree_metadata"]
    arrays = [eval(key) for key in saved if eval(key)[0] in ("params", "ema_params", "opt_state")]  # noqa: S307
    adapters = len(flax.traverse_util.flatten_dict(params["lora"]))
    # params, EMA and Adam's two moments of the adapters; besides them only optax's counts and the clip's empty
    # state: no U-Net weight.
    others = [key for key in arrays if "lora" not in key]
    assert len(arrays) - len(others) == 4 * adapters
    assert all(key[-1] == "count" or key == ("opt_state", "0") for key in others), others
    train(lora_config(folder, steps=2), tmp_path)
    assert train(lora_config(folder, steps=4), tmp_path).step == 4
    resumed, uninterrupted = (load_run(w, step=4, ema=False)[2] for w in (tmp_path, lora_run))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resuming_on_another_base_is_refused(lora_run, folder, tmp_path):
    import shutil

    other = write_sd_folder(tmp_path, "other", seed=1)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "unet")
    shutil.copytree(other / "unet", copy / "unet")  # the same text encoder, another U-Net
    config = lora_config(folder, steps=6)
    config.latent.unet_init = config.latent.text_encoder = str(copy)
    with pytest.raises(WeightsError, match=rf"trained on the U-Net of {folder} \(weights sha256 [0-9a-f]{{12}}\) but "
                                           rf"is given {copy} \(sha256 [0-9a-f]{{12}}\)"):  # fmt: skip
        train(config, lora_run, allow_config_change=True)
    assert checkpoint.read_extras(lora_run)["lora_base"]["path"] == str(folder)


def test_pipeline_from_checkpoint_applies_the_trained_adapters(lora_run, folder):
    from jaxdiff.sampling.pipeline import Pipeline
    from jaxdiff.training.runs import load_run

    pipe = Pipeline.from_checkpoint(lora_run)
    assert isinstance(pipe, LatentPipeline) and pipe.lora_scales == {"run": 1.0}
    base = read_unet_condition(folder)[1]
    for ours, released in zip(jax.tree.leaves(pipe.params["unet"]), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), released)  # the base, unfused
    ema = load_run(lora_run)[2]["lora"]
    expected = _adapted_numpy(base, ema, 8.0 / 4)
    run = flax.traverse_util.flatten_dict(pipe._run_params["unet"])
    moved = 0.0
    for path, value in expected.items():
        np.testing.assert_allclose(np.asarray(run[path], np.float64), value, rtol=1e-6, atol=1e-7)
        moved = max(moved, float(np.abs(value - base_leaf(base, path)).max()))
    assert moved > 1e-4  # the adapters changed the weights


def base_leaf(tree, path):
    for part in path:
        tree = tree[part]
    return np.asarray(tree, np.float64)


def test_export_reads_back_as_the_run_s_adapters(lora_run, folder, tmp_path, capsys):
    from jaxdiff.training.runs import load_run

    out = tmp_path / "exported"
    assert cli.main(["convert", "--to", "diffusers-lora", str(lora_run), str(out)]) == 0
    assert "diffusers-lora" in capsys.readouterr().out
    file = out / LORA_WEIGHTS_FILE
    lora = read_lora_file(file)
    ema = flax.traverse_util.flatten_dict(load_run(lora_run)[2]["lora"])
    assert len(lora.modules) == len(ema) // 2
    base = read_unet_condition(folder)[1]
    adapter = match_lora(lora, {"unet": base})
    for path, factors in adapter.modules["unet"].items():
        assert factors.scale == 2.0  # lora_alpha 8 / r 4, from the metadata
        np.testing.assert_array_equal(factors.down, np.asarray(ema[(*path[:-1], "down")]))
        np.testing.assert_array_equal(factors.up, np.asarray(ema[(*path[:-1], "up")]))
    import safetensors

    with safetensors.safe_open(file, "np") as f:
        header = json.loads(f.metadata()[METADATA_KEY])
        names = list(f.keys())
    assert header == {"unet.r": 4, "unet.lora_alpha": 8.0, "unet.target_modules": TARGETS.split(",")}
    assert all(n.startswith("unet.") and n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names)
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in names  # a 3×3 conv adapter, 4-D
    adapted = adapted_params({"unet": base}, [(adapter, 1.0)])["unet"]
    expected = _adapted_numpy(base, load_run(lora_run)[2]["lora"], 2.0)
    for path, value in flax.traverse_util.flatten_dict(adapted).items():
        np.testing.assert_allclose(np.asarray(value, np.float64), expected[path], rtol=1e-6, atol=1e-7)


def test_export_refusals(lora_run, tmp_path, folder):
    with pytest.raises(UsageError, match="exports a jaxdiff LoRA run's adapters; .* is 'diffusers'"):
        convert(folder / "unet", tmp_path / "a", target_format="diffusers-lora")
    assert not (tmp_path / "a").exists()


def test_a_bfloat16_base_is_stored_as_bfloat16(folder):
    from jaxdiff.training.tasks.latent import LatentTask

    config = lora_config(folder)
    config.training.lora.base_dtype = "bfloat16"
    task = LatentTask(config, data.ShapesSource(num_examples=4))
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(task.networks.frozen["unet"])}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    base = read_unet_condition(folder)[1]
    kernel = ("conv_in", "kernel")
    np.testing.assert_array_equal(np.asarray(task.networks.frozen["unet"][kernel[0]][kernel[1]], np.float32),
                                  np.asarray(jnp.asarray(base[kernel[0]][kernel[1]], jnp.bfloat16), np.float32))


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("change, message", [
    (dict(unet_init=""), r"^config training.lora.rank=4 trains LoRA adapters of a pretrained U-Net: "
                         r"latent.unet_init is empty"),
    (dict(text_encoder=""), r"^config training.lora.rank=4 .* with its frozen text encoder: latent.text_encoder is"),
    (dict(target_modules="to_q,,to_v"), r"^config training.lora.target_modules='to_q,,to_v': give comma-separated"),
    (dict(target_modules="to_q,attn1,q"), r"^config training.lora.target_modules: \['attn1', 'q'\] match no dense or "
                                          r"convolution module of the U-Net"),
    (dict(rank=0, alpha=8.0), r"^config training.lora.alpha=8.0 without adapters \(training.lora.rank=0\): set the "
                              r"rank > 0 or leave training.lora at its defaults$"),
    (dict(rank=0, alpha=0.0, base_dtype="bfloat16"), r"^config training.lora.base_dtype='bfloat16' without adapters"),
    (dict(rank=-1), r"^config training.lora.rank=-1 is not allowed: expected an int >= 0"),
    (dict(base_dtype="float16"), r"^config training.lora.base_dtype='float16' is not allowed: expected one of "
                                 r"\('float32', 'bfloat16'\)"),
])  # fmt: skip
def test_config_refusals_in_one_line(folder, change, message):
    from jaxdiff.config.validation import validate
    from jaxdiff.training.tasks.latent import LatentTask

    config = lora_config(folder, targets=default_config().training.lora.target_modules)
    for key, value in change.items():
        section = config.latent if key in ("unet_init", "text_encoder") else config.training.lora
        section[key] = value
    with pytest.raises(ConfigError, match=message) as refused:
        LatentTask(validate(config))
    assert "\n" not in str(refused.value)


def test_exporting_a_run_without_adapters_is_refused(tmp_path):
    from jaxdiff.convert.lora_export import lora_export

    config = default_config()
    with pytest.raises(UsageError, match=r"^run is not a LoRA run \(task 'latent' or 'flow_lora' with "
                                         r"training.lora.rank > 0; it is task 'diffusion', rank 0\): convert it with "
                                         r"--to diffusers$"):  # fmt: skip
        lora_export(config, {}, "run")


# --------------------------------------------------------------------------- against diffusers' load_lora_weights


def write_lora_run(workdir, folder, trained_run):
    """A LoRA run's checkpoint (step 0) whose adapters are drawn large enough to change the images visibly: down as
    initialised, up N(0, 0.3²); the rest (extras, the kept autoencoder) as `trained_run`'s."""
    from jaxdiff.training.step import new_train_state
    from jaxdiff.training.runs import load_run
    from jaxdiff.training.tasks.latent import LatentTask

    config = lora_config(folder)
    task = LatentTask(config)
    state = jax.jit(task.init_state)()
    rng = np.random.default_rng(5)
    flat = {path: 0.3 * rng.standard_normal(leaf.shape).astype(np.float32) if path[-1] == "up" else leaf
            for path, leaf in flax.traverse_util.flatten_dict(state.params).items()}  # fmt: skip
    params = jax.tree.map(jnp.asarray, flax.traverse_util.unflatten_dict(flat))
    state = new_train_state(params, params, task.tx, state.rng)
    manager = checkpoint.make_manager(workdir)
    vae = jax.tree.map(np.asarray, load_run(trained_run)[2]["vae"])
    checkpoint.save(manager, 0, state, config, extras=checkpoint.read_extras(trained_run), kept={"vae": vae})
    manager.wait_until_finished()
    manager.close()
    return workdir


@pytest.mark.slow  # about 40 s on the busy 2-core CPU, most of it compiling the pipelines
def test_exported_adapters_load_in_diffusers_as_in_jaxdiff(lora_run, folder, tmp_path, torch, diffusers):
    from jaxdiff.sampling.pipeline import Pipeline

    run = write_lora_run(tmp_path / "run", folder, lora_run)
    convert(run, tmp_path / "lora", target_format="diffusers-lora")
    ours = LatentPipeline.from_pretrained(folder)
    ours.load_lora(tmp_path / "lora")
    from_run = Pipeline.from_checkpoint(run)  # the run's pipeline adapts the U-Net alike
    for a, b in zip(jax.tree.leaves(from_run._run_params["unet"]), jax.tree.leaves(ours._run_params["unet"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)

    def theirs():
        latents = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))
        return reference(prompt=PROMPTS, num_inference_steps=3, guidance_scale=7.5, latents=latents, height=16,
                         width=16, output_type="np").images  # fmt: skip

    base = theirs()
    reference.load_lora_weights(tmp_path / "lora")
    expected = theirs()
    assert np.abs(expected - base).max() > 0.05 and np.std(expected) > 0.01
    images = ours.text_to_image(PROMPTS, steps=3, guidance=7.5, latents=noise, output_type="float")
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-4)


@pytest.mark.slow  # about 25 s on the busy 2-core CPU: the CLI and the pipeline each compile the sampler
def test_sample_cli_draws_with_the_trained_adapters(lora_run, tmp_path):
    from PIL import Image

    from jaxdiff import images
    from jaxdiff.sampling.pipeline import Pipeline

    out = tmp_path / "grid.png"
    argv = ["sample", "--workdir", str(lora_run), "--prompt", PROMPTS[0], "--num", "1", "--steps", "2",
            "--sampler", "ddim", "--seed", "0", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    pipe = Pipeline.from_checkpoint(lora_run)
    expected = pipe.text_to_image(PROMPTS[:1], steps=2, sampler="ddim", seed=0)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), images.make_grid(expected))
    pipe.set_lora_scale(0.0)  # the base model draws another image
    assert np.abs(pipe.text_to_image(PROMPTS[:1], steps=2, sampler="ddim", seed=0).astype(int) - expected).max() > 0


def test_lora_on_a_task_without_a_unet_to_adapt_is_refused():
    from jaxdiff.cli import load_config
    from tests.helpers import ROOT

    for config, task in (("digits", "diffusion"), (str(ROOT / "configs" / "shapes_autoencoder.py"), "autoencoder")):
        with pytest.raises(ConfigError, match=rf"^config training.lora.rank=4: LoRA trains adapters of a latent run's "
                                              rf"latent.unet_init U-Net; task '{task}' has none$"):  # fmt: skip
            load_config(config, ["--config.training.lora.rank=4"])
