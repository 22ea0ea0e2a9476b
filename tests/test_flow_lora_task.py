"""Task `flow_lora` (`jaxdiff.training.tasks.flow_lora`): `jaxdiff train` of LoRA adapters on tiny SD3 and Flux
(guidance-distilled) diffusers folders written here from random JAX weights (no torch), over a 4-image captioned
folder: finite losses, adapters that move while the folder's weights stay as they were (digest), the step's
encoding of images and captions (and caption dropout) equal to the pipeline's own, resumption after 2 steps bitwise
equal to 4 steps straight, the sample grid equal to the pipeline's run with the adapted weights, `jaxdiff convert
--to diffusers-lora` read back by `pipe.load_lora` (and `Pipeline.from_checkpoint`) changing the pipeline's output
as the adapted weights do; the recipes' published settings; refusals in one line (exit 2)."""

import json

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxdiff import Pipeline, cli
from jaxdiff.config import default_config
from jaxdiff.errors import ConfigError
from jaxdiff.latent.component_weights import clip_names, param_shapes, torch_name
from jaxdiff.latent.flux_pipeline import FluxPipeline
from jaxdiff.latent.mmdit_weights import POS_EMBED_BUFFER, diffusers_name
from jaxdiff.latent.pipeline import encode_to_latents
from jaxdiff.latent.sd3 import SD3Pipeline
from jaxdiff.latent.t5_weights import t5_names
from jaxdiff.models import flux, mmdit
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.models.clip_text import clip_text_config, create_clip_text
from jaxdiff.models.t5_encoder import create_t5_encoder, t5_encoder_config
from jaxdiff.training import checkpoint
from jaxdiff.training.latent_step import lora_unet_params
from jaxdiff.training.runs import load_run
from jaxdiff.training.tasks.flow_lora import FlowLoraTask
from jaxdiff.training.lora_base import weights_digest
from jaxdiff.weights.lora_files import LORA_WEIGHTS_FILE
from jaxdiff.weights.torch_layout import to_torch
from tests.helpers import run_python
from tests.test_dreambooth import write_folder
from tests.test_flux_pipeline import SCHEDULER as FLUX_SCHEDULER, TRANSFORMER as FLUX_TRANSFORMER
from tests.test_lora_training import END, START, _write_tokenizer, train
from tests.test_sd3_pipeline import CLIP_G, CLIP_L, T5, TRANSFORMER as SD3_TRANSFORMER, VAE
from tests.test_t5_encoder import write_t5_tokenizer_json

IMAGE, T5_LENGTH = 16, 16
TOKENS = dict(vocab_size=514, bos_token_id=START, eos_token_id=END, pad_token_id=END)  # `_write_tokenizer`'s ids
PROJECTED = dict(architectures=["CLIPTextModelWithProjection"])
ENCODERS = {  # family -> (component, tokenizer folder, settings, kind)
    "sd3": [("text_encoder", "tokenizer", dict(CLIP_L, **TOKENS, **PROJECTED), "clip"),
            ("text_encoder_2", "tokenizer_2", dict(CLIP_G, **TOKENS, **PROJECTED), "clip"),
            ("text_encoder_3", "tokenizer_3", dict(T5), "t5")],
    "flux": [("text_encoder", "tokenizer", dict(CLIP_L, hidden_size=16, **TOKENS), "clip"),
             ("text_encoder_2", "tokenizer_2", dict(T5), "t5")],
}  # fmt: skip
CLASSES = {"sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
           "flux": ("FluxPipeline", "FluxTransformer2DModel")}  # fmt: skip
SCHEDULERS = {"sd3": dict(shift=3.0), "flux": FLUX_SCHEDULER}


def _save(folder, stem, settings, params, name):
    """`folder`/config.json and `stem`.safetensors of our params, each tensor named `name(path)` in PyTorch layout."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(settings))
    flat = flax.traverse_util.flatten_dict(params)
    tensors = {name(path): np.ascontiguousarray(to_torch(path, np.asarray(a, np.float32))) for path, a in flat.items()}
    return tensors, folder / f"{stem}.safetensors"


def _random(module, rng, *inputs):
    shapes = param_shapes(module, *inputs)
    return flax.traverse_util.unflatten_dict({p: 0.1 * rng.standard_normal(s) for p, s in shapes.items()})


def write_flow_folder(root, family, seed=0):
    """A tiny diffusers SD3 or Flux folder (model_index.json, transformer, VAE, CLIP and T5 encoders and their
    tokenizers, FlowMatchEuler scheduler) of random float32 weights, written in diffusers' names and layouts."""
    rng = np.random.default_rng(seed)
    folder = root / family
    folder.mkdir()
    pipeline_class, transformer_class = CLASSES[family]
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
             "transformer": ["diffusers", transformer_class]}  # fmt: skip
    if family == "sd3":
        config = mmdit.mmdit_config(SD3_TRANSFORMER)
        module = mmdit.create_mmdit(config)
        settings, inputs = SD3_TRANSFORMER, mmdit.example_inputs(module, size=config.patch_size)
    else:
        settings = dict(FLUX_TRANSFORMER, guidance_embeds=True)
        module = flux.create_flux(flux.flux_config(settings))
        inputs = flux.example_inputs(module)
    tensors, file = _save(folder / "transformer", "diffusion_pytorch_model",
                          {"_class_name": transformer_class, **settings}, _random(module, rng, *inputs),
                          diffusers_name)  # fmt: skip
    if family == "sd3":
        tensors[POS_EMBED_BUFFER] = module.pos_table().astype(np.float32)[None]
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    vae_config = autoencoder_config(VAE)
    tensors, file = _save(folder / "vae", "diffusion_pytorch_model", {"_class_name": "AutoencoderKL", **VAE},
                          _random(create_autoencoder(vae_config), rng, jnp.zeros((1, 4, 4, 3))),
                          torch_name)  # fmt: skip
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    ids = jnp.zeros((1, 4), jnp.int32)
    for component, tokenizer, settings, kind in ENCODERS[family]:
        if kind == "clip":
            architecture = settings.get("architectures", ["CLIPTextModel"])[0]
            module, name = create_clip_text(clip_text_config(settings)), lambda p: clip_names(p)[-1]
            _write_tokenizer(folder / tokenizer)
            index[tokenizer] = ["transformers", "CLIPTokenizer"]
        else:
            architecture = "T5EncoderModel"
            module, name = create_t5_encoder(t5_encoder_config(settings)), lambda p: t5_names(p)[0]
            write_t5_tokenizer_json(folder / tokenizer)
            index[tokenizer] = ["transformers", "T5TokenizerFast"]
        tensors, file = _save(folder / component, "model", {**settings, "architectures": [architecture]},
                              _random(module, rng, ids), name)  # fmt: skip
        safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
        index[component] = ["transformers", architecture]
    (folder / "scheduler").mkdir()
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", **SCHEDULERS[family]}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def flow_config(folder, images, *, steps=4):
    c = default_config()
    c.task, c.data.dataset, c.data.data_dir, c.data.random_flip = "flow_lora", "folder", str(images), False
    c.model.image_size = IMAGE
    c.flow.pretrained, c.flow.max_sequence_length = str(folder), T5_LENGTH
    c.flow.caption_dropout = 0.25
    t = c.training
    t.batch_size, t.num_train_steps, t.warmup_steps, t.learning_rate, t.ema_decay = 2, steps, 0, 1e-2, 0.5
    t.checkpoint_every_steps, t.sample_every_steps, t.num_sample_images, t.log_every_steps = 2, 1000, 2, 1
    t.lora.rank, t.lora.alpha = 2, 4.0
    c.sampling.steps = 2
    return c


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_lora")
    return {"images": write_folder(root / "images", 4, "a photo of sks", 0),
            "sd3": write_flow_folder(root, "sd3"), "flux": write_flow_folder(root, "flux")}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, folders):
    """Per family: a 4-step run and one stopped at 2 then resumed to 4."""
    out = {}
    for family in ("sd3", "flux"):
        straight, resumed = (tmp_path_factory.mktemp(f"{family}_{kind}") for kind in ("straight", "resumed"))
        config = flow_config(folders[family], folders["images"])
        train(config, straight)
        train(flow_config(folders[family], folders["images"], steps=2), resumed)
        train(config, resumed)
        out[family] = straight, resumed
    return out


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_training_moves_only_the_adapters(runs, folders, family):
    straight, _ = runs[family]
    losses = [m["loss"] for m in _metrics(straight)]
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    config, step, params = load_run(straight, ema=False)
    assert step == 4 and set(params) == {"lora"}
    ups = [leaf for path, leaf in flax.traverse_util.flatten_dict(params["lora"]).items() if path[-1] == "up"]
    assert ups and all(np.abs(np.asarray(up)).max() > 0 for up in ups)  # peft starts them at 0
    # The folder is untouched and is the one the checkpoints name.
    pipe = (SD3Pipeline if family == "sd3" else FluxPipeline).from_pretrained(folders[family])
    manager = checkpoint.make_manager(straight, read_only=True)
    extras = checkpoint.read_extras(manager, 4)
    manager.close()
    assert extras["lora_base"]["sha256"] == weights_digest(pipe.model.transformer_params)
    assert extras["lora_base"]["path"] == str(folders[family])
    assert extras["family"] == family and extras["sample_prompts"] == ["a photo of sks 0", "a photo of sks 1"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_resume_after_2_steps_equals_4_steps_bitwise(runs, family):
    straight, resumed = runs[family]
    for ema in (False, True):
        a, b = load_run(straight, ema=ema)[2], load_run(resumed, ema=ema)[2]
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert [m["loss"] for m in _metrics(straight)] == [m["loss"] for m in _metrics(resumed)]


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_step_encodes_as_the_pipeline_does(folders, family, dropout):
    """The batch the step trains on (latents, prompt embeddings, pooled) equals the pipeline's own encoding: the
    posterior sample of the images with the encoders' key, and the captions (every one the empty prompt with
    caption_dropout 1) through the folder's tokenizers and text encoders."""
    from jaxdiff import data

    config = flow_config(folders[family], folders["images"])
    config.flow.caption_dropout = dropout
    source = data.load_folder(str(folders["images"]), IMAGE)
    task = FlowLoraTask(config, source)
    raw = data.batch_for_step(source, seed=0, step=0, global_batch_size=2, process_index=0, process_count=1)
    batch = task.host_batch(raw)
    state = task.init_state()
    seen = {}

    def spy(state, frozen, flow_batch):
        seen.update(flow_batch)
        return state, {}

    task._step = spy
    task.train_step(state, jax.tree.map(jnp.asarray, batch))
    pipe = task.pipe
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
    latents = encode_to_latents(pipe.vae, pipe.model.vae_config, pipe.params["vae"],
                                jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1.0, jax.random.split(key)[0])
    np.testing.assert_allclose(seen["latents"], latents, rtol=1e-5, atol=1e-5)
    prompts = [""] * 2 if dropout else list(raw["caption"])
    if family == "sd3":
        embeds, pooled = pipe._conditioning(prompts, 0, T5_LENGTH)
    else:
        tokenizers = pipe.model.tokenizers
        embeds, pooled = pipe._encode_ids(pipe.params, jnp.asarray(tokenizers["text"](prompts).input_ids),
                                          jnp.asarray(tokenizers["text_2"](prompts, max_length=T5_LENGTH).input_ids))
    np.testing.assert_allclose(seen["prompt_embeds"], embeds, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(seen["pooled"], pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_converted_lora_loads_and_changes_the_pipeline_as_the_adapted_weights(runs, folders, family, tmp_path):
    """`jaxdiff convert --to diffusers-lora` of the run, loaded by `pipe.load_lora`, gives the pipeline of the
    folder's transformer with the EMA adapters added by hand (W + (alpha/r)·up @ down); so does
    `Pipeline.from_checkpoint` of the run."""
    import dataclasses

    straight, _ = runs[family]
    assert cli.main(["convert", "--to", "diffusers-lora", str(straight), str(tmp_path / "lora")]) == 0
    cls = SD3Pipeline if family == "sd3" else FluxPipeline
    pipe = cls.from_pretrained(folders[family])
    run = dict(prompts=["a photo of sks 3"], steps=2, height=IMAGE, width=IMAGE, max_sequence_length=T5_LENGTH,
               output_type="latent", seed=1)  # fmt: skip
    before = pipe.text_to_image(**run)
    pipe.load_lora(tmp_path / "lora" / LORA_WEIGHTS_FILE)
    after = pipe.text_to_image(**run)
    _, _, ema = load_run(straight)
    weights = lora_unet_params(pipe.model.transformer_params, ema["lora"], 4.0 / 2)  # alpha / r
    adapted = cls(dataclasses.replace(pipe.model, transformer_params=jax.tree.map(np.asarray, weights)))
    expected = adapted.text_to_image(**run)
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(after, expected, rtol=0, atol=1e-5)
    from_run = Pipeline.from_checkpoint(straight)  # the folder's pipeline with the run's EMA adapters
    assert type(from_run) is cls and from_run.lora_scales == {"run": 1.0}
    np.testing.assert_allclose(from_run.text_to_image(**run), after, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sample_grid_is_the_pipeline_run_with_the_adapted_weights(folders, family):
    """The grid (jitted, as the loop runs it) equals the folder's pipeline on the grid captions with the adapters
    added to its transformer by hand, from the same noise (SD3: guided by the empty prompt at 7; Flux dev: the
    embedded guidance 3.5); the loop writes it beside its captions."""
    import dataclasses

    from jaxdiff import data

    config = flow_config(folders[family], folders["images"])
    source = data.load_folder(str(folders["images"]), IMAGE)
    task = FlowLoraTask(config, source)
    adapters = jax.tree.map(lambda a: a + 0.05, task.init_state().params["lora"])  # up ≠ 0: the adapters act
    rng = jax.random.PRNGKey(3)
    grid = np.asarray(jax.jit(task.sample_grid)({"lora": adapters}, rng))
    pipe = task.pipe
    weights = lora_unet_params(pipe.model.transformer_params, adapters, 4.0 / 2)
    adapted = type(pipe)(dataclasses.replace(pipe.model, transformer_params=jax.tree.map(np.asarray, weights)))
    noise = jax.random.normal(rng, (2, IMAGE // 2, IMAGE // 2, 16), jnp.float32)
    expected = adapted.text_to_image(["a photo of sks 0", "a photo of sks 1"], steps=2, height=IMAGE, width=IMAGE,
                                     latents=noise, max_sequence_length=T5_LENGTH, output_type="float")  # fmt: skip
    np.testing.assert_allclose(grid, expected * 2.0 - 1.0, rtol=0, atol=1e-5)
    assert np.abs(grid[0] - grid[1]).max() > 1e-3


def test_the_loop_writes_the_grid_with_its_captions(folders, tmp_path):
    config = flow_config(folders["flux"], folders["images"], steps=1)
    config.training.sample_every_steps = 1
    train(config, tmp_path / "run")
    captions = (tmp_path / "run" / "samples").glob("step_*1.txt")
    assert [line.split(": ", 1)[1] for line in next(captions).read_text().splitlines()] == [
        "a photo of sks 0", "a photo of sks 1"]  # fmt: skip


def one_line_error(capsys, argv, *fragments):
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), err


@pytest.mark.parametrize("override, fragments", [
    ("flow.weighting=sqrt", ["flow.weighting='sqrt'", "cosmap"]),
    ("flow.max_sequence_length=1", ["flow.max_sequence_length=1", "2..512"]),
    ("training.lora.rank=0", ["training.lora.rank=0", "LoRA adapters only"]),
    ("training.lora.target_modules=to_x", ["['to_x'] match no dense module"]),
])  # fmt: skip
def test_refusals_are_one_line(capsys, folders, tmp_path, override, fragments):
    argv = ["train", "--config", "configs/flux_lora.py", "--workdir", str(tmp_path / "run"),
            f"--config.flow.pretrained={folders['flux']}", f"--config.data.data_dir={folders['images']}",
            "--config.model.image_size=16", f"--config.{override}"]  # fmt: skip
    one_line_error(capsys, argv, *fragments)
    assert not (tmp_path / "run").exists()


def test_a_folder_of_another_pipeline_is_refused_naming_its_class(capsys, folders, tmp_path):
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    argv = ["train", "--config", "configs/sd3_lora.py", "--workdir", str(tmp_path / "run"),
            f"--config.flow.pretrained={other}", f"--config.data.data_dir={folders['images']}"]  # fmt: skip
    one_line_error(capsys, argv, "is a StableDiffusionPipeline folder", "StableDiffusion3Pipeline")


def test_guidance_of_a_transformer_without_guidance_embedding_is_refused(folders):
    config = flow_config(folders["sd3"], folders["images"])
    config.flow.guidance = 1.0
    with pytest.raises(ConfigError, match=r"^config flow.guidance=1.0: the sd3 transformer of flow.pretrained has no "):
        FlowLoraTask(config)


def test_flow_keys_of_another_task_are_refused():
    from jaxdiff.config.validation import validate

    config = default_config()
    config.flow.shift = 3.0
    with pytest.raises(ConfigError, match=r"^config flow.shift=3.0: the flow section is task 'flow_lora''s"):
        validate(config)


@pytest.mark.parametrize("name, size, guidance, length", [("flux_lora", 512, 1.0, 512), ("sd3_lora", 1024, 3.5, 77)])
def test_recipes_hold_the_published_dreambooth_lora_defaults(name, size, guidance, length):
    from jaxdiff.cli import load_config
    from tests.helpers import ROOT

    c = load_config(str(ROOT / "configs" / f"{name}.py"), [])
    t = c.training
    assert (c.task, c.data.dataset, c.model.image_size, c.flow.guidance, c.flow.max_sequence_length) == (
        "flow_lora", "folder", size, guidance, length)  # fmt: skip
    assert (t.learning_rate, t.warmup_steps, t.batch_size, t.num_train_steps) == (1e-4, 0, 1, 500)
    assert (t.grad_clip_norm, t.ema_decay, t.lora.base_dtype) == (1.0, 0.0, "bfloat16")
    assert (t.lora.rank, t.lora.alpha, t.lora.target_modules) == (4, 4.0, "to_k,to_q,to_v,to_out.0")
    assert (c.flow.t_sampling, c.flow.weighting, c.flow.shift) == ("logit_normal", "none", 0.0)


SHARDED_SCRIPT = """
import pathlib, sys, tempfile
import jax, numpy as np
from jaxdiff.training.runs import load_run
from tests.test_dreambooth import write_folder
from tests.test_flow_lora_task import flow_config, write_flow_folder
from tests.test_lora_training import train

root = pathlib.Path(tempfile.mkdtemp())
images = write_folder(root / "images", 4, "a photo of sks", 0)
folder = write_flow_folder(root, "flux")
results = {}
for fsdp in (1, 2):
    config = flow_config(folder, images, steps=2)
    config.training.fsdp = fsdp
    workdir = root / f"run{fsdp}"
    train(config, workdir)
    results[fsdp] = load_run(workdir, ema=False)[2]
error = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
            zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[2])))
print("max difference", error)
assert error <= 1e-5, error
print("OK")
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fsdp_run_on_two_devices_equals_the_replicated_one():
    """A Flux LoRA run on 2 simulated devices with training.fsdp=2 (the frozen networks and the adapters placed on
    the ("data", "fsdp") mesh) trains the same adapters as with fsdp=1 to 1e-5. The tiny networks' leaves are all
    below the split threshold, so this checks the run on a mesh; the split itself is tests/test_flow_sharding.py's."""
    out = run_python(SHARDED_SCRIPT, devices=2, timeout=580)
    assert out.strip().endswith("OK"), out
