"""SDXL LoRA training (`jaxdiff train` with an SDXL folder and `training.lora.rank > 0`): the time ids of each
image against diffusers' train_text_to_image_lora_sdxl.py rule written out here; the folder source's original sizes
(EXIF orientation applied); the refusals; and, with torch, a run on a tiny SDXL folder saved by diffusers: the
captions' conditioning equals diffusers' `encode_prompt`, the first loss is the base U-Net's, checkpoints hold
only the adapters, the run draws its grid, `Pipeline.from_checkpoint` is the folder's SDXL pipeline with the
run's adapters, and `--to diffusers-lora` gives in diffusers'
StableDiffusionXLPipeline.load_lora_weights the images jaxdiff draws (≤ 1e-4)."""

import json

import jax
import numpy as np
import PIL.Image
import pytest

from jaxdiff import data
from jaxdiff.config import default_config
from jaxdiff.errors import ConfigError
from jaxdiff.training import latent_step as lt
from tests import test_sdxl_pipeline
from tests.test_sdxl_pipeline import nchw, write_config_folder

# (height, width) of the training images: portrait, landscape, square, and a 3:2 one whose crop offset rounds.
SIZES = [(24, 16), (16, 26), (16, 16), (20, 30)]
CAPTIONS = ["a red circle", "a blue square", "a green dot", "two red lines"]
IMAGE = 16
saved = test_sdxl_pipeline.saved  # the tiny SDXL pipelines diffusers saved (a fixture)


def expected_time_ids(height, width, size):
    """diffusers' train_text_to_image_lora_sdxl.py for one image with --center_crop, written out: torchvision's
    Resize(size) (shorter side to size, the longer int(size · long / short)), the crop's top-left
    (max(0, int(round((h' − size) / 2.0))), the same for w'), then original_size + crop + (size, size)."""
    if height <= width:
        new_height, new_width = size, int(size * width / height)
    else:
        new_height, new_width = int(size * height / width), size
    top = max(0, int(round((new_height - size) / 2.0)))
    left = max(0, int(round((new_width - size) / 2.0)))
    return [height, width, top, left, size, size]


def test_time_ids_follow_diffusers_centre_crop():
    sizes = np.array([*SIZES, (1024, 768), (768, 1344), (17, 16), (16, 18)])
    expected = np.array([expected_time_ids(h, w, IMAGE) for h, w in sizes], np.float64)
    np.testing.assert_array_equal(lt.sdxl_time_ids(sizes, IMAGE).astype(np.float64), expected)
    assert lt.sdxl_time_ids(sizes, IMAGE).dtype == np.float32
    # Python's round: half to even (h' = 21 gives 2.5 -> 2, h' = 17 gives 0.5 -> 0).
    assert expected[4].tolist() == [1024, 768, 2, 0, 16, 16] and expected[6].tolist() == [17, 16, 0, 0, 16, 16]


def write_image_folder(folder, sizes=SIZES, captions=CAPTIONS):
    """Captioned PNGs of the given (height, width), smooth random colours (seeded)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, ((height, width), caption) in enumerate(zip(sizes, captions, strict=True)):
        ramp = np.linspace(0, 1, height * width).reshape(height, width, 1)
        pixels = (255 * np.clip(ramp * rng.uniform(0.2, 1, 3) + rng.uniform(0, 0.3, 3), 0, 1)).astype(np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "text": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines))
    return folder


def test_folder_source_gives_original_sizes_exif_turned(tmp_path):
    folder = write_image_folder(tmp_path / "images")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # turned a quarter: shown 30 high, 20 wide
    PIL.Image.new("RGB", (20, 30)).save(folder / "9.jpg", exif=exif)
    with open(folder / "captions.jsonl", "a") as stream:
        stream.write("\n" + json.dumps({"file": "9.jpg", "text": "turned"}))
    source = data.load_folder(folder, IMAGE)
    assert source.original_sizes(np.arange(5)).tolist() == [*map(list, SIZES), [20, 30]]
    local = data.batch_for_step(source, seed=0, step=0, global_batch_size=5, process_index=0, process_count=1)
    assert local["original_size"].shape == (5, 2)
    captions = {c: s for c, s in zip(list(CAPTIONS) + ["turned"], [*map(list, SIZES), [20, 30]], strict=True)}
    assert [captions[c] for c in local["caption"]] == local["original_size"].tolist()


def sdxl_config(folder, images, *, rank=4, steps=3, learning_rate=5e-2):
    c = default_config()
    c.task, c.data.dataset, c.data.data_dir, c.data.random_flip = "latent", "folder", str(images), False
    c.model.image_size = IMAGE
    c.latent.autoencoder = c.latent.text_encoder = c.latent.unet_init = str(folder)
    c.latent.caption_dropout = 0.0
    d = c.diffusion
    d.schedule, d.num_timesteps, d.beta_start, d.beta_end = "quad", 1000, 0.00085, 0.012
    t = c.training
    t.batch_size, t.num_train_steps, t.warmup_steps, t.learning_rate, t.ema_decay = 2, steps, 0, learning_rate, 0.0
    t.checkpoint_every_steps, t.sample_every_steps, t.num_sample_images, t.log_every_steps = steps, steps, 2, 1
    t.lora.rank, t.lora.alpha, t.lora.target_modules = rank, float(rank), "to_q,to_k,to_v,to_out.0,conv1"
    c.sampling.sampler, c.sampling.steps, c.sampling.guidance = "ddim", 2, 3.0
    return c


@pytest.mark.parametrize("change, message", [
    (lambda c: c.training.lora.update(default_config().training.lora),  # rank 0: the whole U-Net
     r"is an SDXL folder: jaxdiff trains LoRA adapters of SDXL \(training.lora.rank > 0\), not the whole U-Net"),
    (lambda c: setattr(c.latent, "autoencoder", c.latent.autoencoder + "/vae"),
     r"is an SDXL folder: SDXL trains with latent.unet_init, latent.text_encoder and latent.autoencoder all that "
     r"folder; got latent.unet_init="),
])  # fmt: skip
def test_sdxl_refusals_in_one_line(tmp_path, change, message):
    from jaxdiff.training.tasks.latent import check_latent_config

    config = sdxl_config(write_config_folder(tmp_path / "xl"), tmp_path)
    change(config)
    with pytest.raises(ConfigError, match=message) as error:
        check_latent_config(config)
    assert "\n" not in str(error.value)


def test_an_sdxl_refiner_is_refused(tmp_path):
    from jaxdiff.training.tasks.latent import check_latent_config

    config = sdxl_config(write_config_folder(tmp_path / "xl", refiner=True), tmp_path)
    with pytest.raises(ConfigError, match=r"an SDXL folder without both text_encoder/ and text_encoder_2/ \(a "
                                          r"refiner\?\); LoRA training takes an SDXL base folder$"):  # fmt: skip
        check_latent_config(config)


# --------------------------------------------------------------------------- a run on a folder diffusers saved


@pytest.fixture(scope="module")
def run(saved, tmp_path_factory):
    from jaxdiff.training.loop import train_and_evaluate

    root = tmp_path_factory.mktemp("sdxl_lora")
    images = write_image_folder(root / "images")
    config = sdxl_config(saved["folder"] / "base", images)
    train_and_evaluate(config, root / "run", progress=False)
    return config, root / "run", images


@pytest.mark.slow  # 26 s idle, 120 s under load (2-core CPU): the SDXL folder, the two losses compiled
def test_conditioning_and_first_loss(saved, torch):
    from jaxdiff.training.tasks.latent import LatentTask

    root = saved["folder"]
    images = write_image_folder(root / "images_first")
    config = sdxl_config(root / "base", images)
    source = data.load_folder(images, IMAGE)
    task = LatentTask(config, source)
    local = data.batch_for_step(source, seed=0, step=0, global_batch_size=2, process_index=0, process_count=1)
    batch = task.host_batch(local)
    expected_ids = [expected_time_ids(h, w, IMAGE) for h, w in local["original_size"]]
    np.testing.assert_array_equal(batch["time_ids"], np.array(expected_ids, np.float32))
    cond = lt.conditioning(task.networks, {}, batch["input_ids"], batch["time_ids"])
    with torch.no_grad():
        context, _, pooled, _ = saved["base"].encode_prompt(list(local["caption"]), do_classifier_free_guidance=False)
    np.testing.assert_allclose(np.asarray(cond.context), context.numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(cond.added_cond["text_embeds"]), pooled.numpy(), rtol=0, atol=2e-5)
    # up = 0 at first: the loss is the base U-Net's with the same draws.
    state = jax.jit(task.init_state)()
    empty = task.tokenize([""])[0]
    rng = jax.random.PRNGKey(3)

    def loss(networks, params):
        fn = lt.make_latent_loss_fn(networks, task.scheduler.schedule, config.diffusion, caption_dropout=0.0,
                                    empty_ids=empty)  # fmt: skip
        return float(jax.jit(fn)(params, batch["image"], batch["input_ids"], rng, batch["time_ids"]))

    base = loss(task.networks._replace(lora_scale=None), {"unet": task.networks.frozen["unet"]})
    np.testing.assert_allclose(loss(task.networks, state.params), base, rtol=1e-6)


@pytest.mark.slow  # 60 s idle, 4 min under load (2-core CPU): training with a grid, export, diffusers
def test_run_exports_what_diffusers_loads_as_jaxdiff_draws(run, saved, torch, tmp_path):
    from jaxdiff.convert.formats import convert
    from jaxdiff.latent.pipeline import LatentPipeline
    from jaxdiff.sampling.pipeline import Pipeline
    from jaxdiff.training.runs import load_run

    config, workdir, _ = run
    assert set(load_run(workdir)[2]) == {"lora", "vae"}  # the adapters and the kept autoencoder
    assert list(workdir.glob("**/*.png"))  # the grid the run drew through the SDXL pipeline
    from_run = Pipeline.from_checkpoint(workdir)
    factors = from_run._lora_adapters["run"].modules["unet"].values()
    assert factors and all(np.abs(f.up).max() > 0 for f in factors)  # every adapter learned
    convert(workdir, tmp_path / "lora", target_format="diffusers-lora")
    ours = LatentPipeline.from_pretrained(saved["folder"] / "base")
    ours.load_lora(tmp_path / "lora")
    for a, b in zip(jax.tree.leaves(from_run._run_params["unet"]), jax.tree.leaves(ours._run_params["unet"]),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    reference = saved["base"]
    noise = np.random.default_rng(0).standard_normal((1, IMAGE // 2, IMAGE // 2, 4)).astype(np.float32)

    def theirs():
        return reference(prompt=CAPTIONS[:1], num_inference_steps=3, guidance_scale=5.0, latents=nchw(torch, noise),
                         height=IMAGE, width=IMAGE, output_type="np").images  # fmt: skip

    base = theirs()
    reference.load_lora_weights(tmp_path / "lora")
    try:
        expected = theirs()
    finally:
        reference.unload_lora_weights()
    assert np.abs(expected - base).max() > 1e-3  # the trained adapters change the image
    images = ours.text_to_image(CAPTIONS[:1], steps=3, guidance=5.0, sampler="euler", latents=noise,
                                output_type="float")  # fmt: skip
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-4)
