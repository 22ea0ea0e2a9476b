"""Class-conditional latent training (task "class_latent", DiT / SiT on ImageNet-style data): ADM's centre crop
against a PIL/NumPy reference; the class folder's classes and order (torchvision's ImageFolder); the step's loss
against float64 NumPy references of the discrete (DiT: learned σ, hybrid) and flow (SiT) families on the encoded
latents; the latent cache (moments against the autoencoder, cached step == on-the-fly step, resumed, refused);
steps that lower the loss; a resumed run equal to an uninterrupted one; `Pipeline.from_checkpoint` sampling by
class; the `jaxdiff data encode` CLI. The tiny autoencoder folder is written here from random JAX weights in
diffusers' layout (no torch needed)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import safetensors.numpy

from jaxdiff.convert.stable_diffusion_export import _tensors
from jaxdiff.data import ClassFolderSource, center_crop_arr, load_class_folder, load_latent_cache
from jaxdiff.data.latent_cache import PARTIAL_SUFFIX, CacheWriter
from jaxdiff.errors import ConfigError, DataError, MissingDataError, WeightsError
from jaxdiff.latent.component_weights import VAE_WEIGHTS_STEM, torch_name
from jaxdiff.models import dit
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.readers.dit_checkpoint import dit_model_config, dit_run_config, sit_run_config
from jaxdiff.training.runs import make_task
from jaxdiff.training.tasks.class_latent import cache_header, encode_latent_cache, imagenet_training
from jaxdiff.training.lora_base import weights_digest
from tests.test_lora import VAE, _random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("n02", "n00", "n01")  # written in this order; classes are the sorted names
SIZES = [(40, 24), (17, 33), (16, 16), (64, 48)]  # (width, height) of each class's images
IMAGE, LATENT = 16, (8, 8, 4)


# --------------------------------------------------------------------------- fixtures


def write_vae_folder(path, seed=0):
    """A diffusers AutoencoderKL folder (config.json, safetensors in PyTorch layout) of random weights."""
    params = _random_params(create_autoencoder(autoencoder_config(VAE)), np.random.default_rng(seed),
                            jnp.zeros((1, IMAGE, IMAGE, 3)))  # fmt: skip
    path.mkdir()
    safetensors.numpy.save_file(_tensors(params, torch_name), path / f"{VAE_WEIGHTS_STEM}.safetensors")
    (path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "scaling_factor": 0.18215, **VAE}))
    return path


def draw_image(label: int, index: int, size) -> PIL.Image.Image:
    """A class-`label` picture: a background colour per class, a bright disc placed by `index`, plus texture."""
    width, height = size
    rows, cols = np.mgrid[0:height, 0:width]
    colour = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][label], np.float64)
    centre = ((index + 1) * height / 5, (index + 1) * width / 5)
    disc = ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < (min(size) / 4) ** 2)[..., None]
    texture = 30 * np.sin(0.7 * rows + 0.3 * cols + label)[..., None]
    return PIL.Image.fromarray(np.clip(colour + texture + 80 * disc, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("class_latent")
    images = root / "train"
    for name in CLASSES:
        label = sorted(CLASSES).index(name)
        (images / name / "more").mkdir(parents=True)
        for index, size in enumerate(SIZES):
            where = images / name / ("more" if index == 3 else "") / f"{name}_{index}.{'png' if index % 2 else 'JPEG'}"
            draw_image(label, index, size).save(where)
        (images / name / "notes.txt").write_text("not an image")
    return {"images": images, "vae": write_vae_folder(root / "vae"), "other_vae": write_vae_folder(root / "vae2", 1),
            "root": root}  # fmt: skip


def tiny_config(folders, family="discrete", **overrides):
    """A tiny DiT (discrete: learned σ, hybrid loss; flow: SiT's velocity) recipe on the folders."""
    discrete = family == "discrete"
    section = dit.preset_config("S/2", input_size=LATENT[0], in_channels=4, num_classes=len(CLASSES), hidden_size=32,
                                depth=1, num_heads=2, class_dropout_prob=0.25, learn_sigma=True,
                                output_sigma=discrete)  # fmt: skip
    model = dit_model_config(section)
    config = dit_run_config(model, guidance_channels=3) if discrete else sit_run_config(model)
    imagenet_training(config)
    config.data.data_dir, config.latent.autoencoder = str(folders["images"]), str(folders["vae"])
    t = config.training
    t.batch_size, t.num_train_steps, t.learning_rate, t.ema_decay = 4, 4, 1e-3, 0.5
    t.log_every_steps, t.checkpoint_every_steps, t.sample_every_steps, t.num_sample_images = 1, 2, 1000, 2
    config.sampling.steps = 3
    if not discrete:
        config.diffusion.reduce_mean = True
    for key, value in overrides.items():
        section, name = key.rsplit(".", 1)
        config[section][name] = value
    return config


def batch_of(task, source, step=0):
    from jaxdiff.data import batch_for_step

    host = task.host_batch(batch_for_step(source, seed=0, step=step, global_batch_size=4, process_index=0,
                                          process_count=1))  # fmt: skip
    return {key: jnp.asarray(value) for key, value in host.items()}


# --------------------------------------------------------------------------- the class folder


def reference_crop(image: PIL.Image.Image, size: int) -> np.ndarray:
    """ADM's crop written from its description: k halvings (box) while the short side is >= 2·size, then one bicubic
    resize of the short side to `size`, then the centre size×size window."""
    width, height = image.size
    halvings = 0
    while min(width >> halvings, height >> halvings) >= 2 * size:
        halvings += 1
    for _ in range(halvings):
        image = image.resize((image.size[0] // 2, image.size[1] // 2), PIL.Image.Resampling.BOX)
    short = min(image.size)
    target = [int(np.floor(side * size / short + 0.5)) for side in image.size]  # round half up: sizes are not .5 here
    pixels = np.asarray(image.resize(tuple(target), PIL.Image.Resampling.BICUBIC)).astype(np.int64)
    top, left = (target[1] - size) // 2, (target[0] - size) // 2
    return pixels[top : top + size, left : left + size]


@pytest.mark.parametrize("size, crop", [((700, 530), 64), ((530, 700), 64), ((300, 257), 128), ((64, 100), 32),
                                        ((256, 256), 256), ((100, 60), 64)])  # fmt: skip
def test_center_crop_arr_matches_a_reference(size, crop):
    image = draw_image(1, 2, size)
    out = center_crop_arr(image, crop)
    assert out.shape == (crop, crop, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out.astype(np.int64), reference_crop(image, crop))


def test_center_crop_arr_box_halves_then_keeps_the_centre():
    # 8·s wide, 4·s tall with a column index as value: two box halvings (mean of each 2×2, per channel), no
    # resize left to do, then the centre window: columns of the halved image from (2·s − s)/2.
    s = 8
    columns = np.tile(np.arange(8 * s, dtype=np.uint8)[None, :, None], (4 * s, 1, 3))
    out = center_crop_arr(PIL.Image.fromarray(columns), s)
    halved = columns.reshape(s, 4, 2 * s, 4, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_allclose(out, np.round(halved[:, s // 2 : s // 2 + s]), atol=0.5)


def test_class_folder_lists_classes_and_files_as_image_folder(folders):
    source = load_class_folder(str(folders["images"]), IMAGE)
    assert isinstance(source, ClassFolderSource)
    assert source.class_names == ("n00", "n01", "n02") and source.num_classes == 3
    expected = [os.path.join(c, name) for c in ("n00", "n01", "n02")
                for name in (f"{c}_0.JPEG", f"{c}_1.png", f"{c}_2.JPEG", f"more/{c}_3.png")]  # fmt: skip
    assert list(source.files) == expected  # the root's files first, then each sub-folder's (os.walk, sorted)
    np.testing.assert_array_equal(source.labels, np.repeat(np.arange(3), 4))
    images, labels = source.get(np.array([5, 11, 0]))
    np.testing.assert_array_equal(labels, [1, 2, 0])
    with PIL.Image.open(folders["images"] / "n02" / "more" / "n02_3.png") as image:
        np.testing.assert_array_equal(images[1], center_crop_arr(image.convert("RGB"), IMAGE))


def test_bad_class_folders_are_refused_in_one_line(folders, tmp_path):
    with pytest.raises(MissingDataError, match="does not exist"):
        load_class_folder(str(tmp_path / "nowhere"), IMAGE)
    flat = tmp_path / "flat"
    flat.mkdir()
    draw_image(0, 0, (20, 20)).save(flat / "a.png")
    with pytest.raises(DataError, match="no class sub-folders .it holds 1 images directly"):
        load_class_folder(str(flat), IMAGE)
    (flat / "empty_class").mkdir()
    with pytest.raises(DataError, match=r"class folder .*empty_class holds no images"):
        load_class_folder(str(flat), IMAGE)
    (flat / "empty_class" / "broken.JPEG").write_bytes(b"not a jpeg")
    source = load_class_folder(str(flat), IMAGE)
    with pytest.raises(DataError, match=r"broken.JPEG: cannot decode the image"):
        source.get(np.array([0]))
    with pytest.raises(ConfigError, match="needs data.data_dir"):
        load_class_folder("", IMAGE)


# --------------------------------------------------------------------------- the loss against float64 NumPy


def _f64(x):
    return np.asarray(x, np.float64)


def _latents_and_labels(task, config, batch, keys):
    """z_0 and the dropped labels of the step, computed in float64 from the posterior of the (flipped) images."""
    flip_key, encode_key, label_key = keys[0], keys[1], keys[5]
    images = _f64(batch["image"]) / 127.5 - 1.0
    flip = np.asarray(jax.random.bernoulli(flip_key, 0.5, (images.shape[0], 1, 1, 1)))
    images = np.where(flip, images[:, :, ::-1], images)
    posterior = task.vae.apply({"params": task.vae_params}, jnp.asarray(images, jnp.float32), method=task.vae.encode)
    eps = _f64(jax.random.normal(encode_key, posterior.mean.shape))
    z_0 = (_f64(posterior.mean) + np.exp(0.5 * _f64(posterior.logvar)) * eps) * 0.18215
    dropped = np.asarray(jax.random.bernoulli(label_key, config.training.label_dropout, (images.shape[0],)))
    return z_0, np.where(dropped, len(CLASSES), np.asarray(batch["label"]))


def _discrete_reference(task, config, params, z_0, labels, keys):
    """DiT's loss (improved DDPM's hybrid, learned σ) in float64: the batch mean of mean_dims((ε − ε̂)²) plus
    λ·T·KL(q(z_{t−1} | z_t, z_0) || p(z_{t−1} | z_t)) in bits per dimension (mean through a stop-gradient)."""
    d = config.diffusion
    betas = np.linspace(d.beta_start, d.beta_end, d.num_timesteps, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    t = np.asarray(jax.random.randint(keys[2], (z_0.shape[0],), 0, d.num_timesteps, dtype=jnp.int32))
    assert t.min() > 0  # the decoder term of t = 0 is not drawn by this seed
    noise = _f64(jax.random.normal(keys[3], z_0.shape, jnp.float32))
    a = abar[t][:, None, None, None]
    z_t = np.sqrt(a) * z_0 + np.sqrt(1 - a) * noise
    out = _f64(task.model.apply({"params": params}, jnp.asarray(z_t, jnp.float32), jnp.asarray(t),
                                jnp.asarray(labels, jnp.int32), train=False))  # fmt: skip
    eps, v = out[..., :4], out[..., 4:]
    mse = np.mean((noise - eps) ** 2, axis=(1, 2, 3))
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))[t][:, None, None, None]
    c1 = (betas * np.sqrt(abar_prev) / (1 - abar))[t][:, None, None, None]
    c2 = ((1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar))[t][:, None, None, None]
    true_mean = c1 * z_0 + c2 * z_t
    x0_hat = np.sqrt(1 / a) * z_t - np.sqrt(1 / a - 1) * eps
    model_mean = c1 * x0_hat + c2 * z_t
    frac = (v + 1) / 2
    model_log_var = frac * np.log(betas[t])[:, None, None, None] + (1 - frac) * post_log_var
    kl = 0.5 * (-1 + model_log_var - post_log_var + np.exp(post_log_var - model_log_var)
                + (true_mean - model_mean) ** 2 * np.exp(-model_log_var))  # fmt: skip
    bound = np.mean(kl, axis=(1, 2, 3)) / np.log(2.0)
    return np.mean(mse + d.hybrid_lambda * d.num_timesteps * bound)


def _flow_reference(task, config, params, z_0, labels, keys):
    """SiT's loss in float64: t ~ U[0, 1), z_t = (1 − t)·z_0 + t·ε, the network at SiT's time 1 − t predicting
    z_0 − ε (negated here to ε − z_0), mean over dimensions and batch of the squared velocity error."""
    t_key, noise_key = jax.random.split(keys[2])
    t = _f64(jax.random.uniform(t_key, (z_0.shape[0],), jnp.float32))[:, None, None, None]
    noise = _f64(jax.random.normal(noise_key, z_0.shape, jnp.float32))
    z_t = (1 - t) * z_0 + t * noise
    out = _f64(task.model.apply({"params": params}, jnp.asarray(z_t, jnp.float32),
                                jnp.asarray(1 - t[:, 0, 0, 0], jnp.float32), jnp.asarray(labels, jnp.int32),
                                train=True, rngs={"dropout": keys[4]}))  # fmt: skip
    return np.mean((-out - (noise - z_0)) ** 2)


@pytest.mark.parametrize("family", ["discrete", "flow"])
def test_step_loss_matches_a_float64_reference_on_the_encoded_latents(folders, family):
    config = tiny_config(folders, family)
    source = load_class_folder(str(folders["images"]), IMAGE)
    task = make_task(config, source)
    task.check_source(source)
    state = task.init_state()
    batch = batch_of(task, source)
    _, metrics = jax.jit(task.train_step)(state, batch)
    keys = jax.random.split(jax.random.fold_in(state.rng, state.step), 6)
    z_0, labels = _latents_and_labels(task, config, batch, keys)
    if family == "discrete":  # the network runs with train=False: the step drops the labels
        assert config.training.label_dropout == 0.25
        reference = _discrete_reference(task, config, state.params, z_0, labels, keys)
    else:  # SiT: the network drops its own labels (class_dropout_prob), the step none
        assert config.training.label_dropout == 0.0
        reference = _flow_reference(task, config, state.params, z_0, np.asarray(batch["label"]), keys)
    np.testing.assert_allclose(float(metrics["loss"]), reference, rtol=2e-5)


def test_a_few_steps_lower_the_loss(folders):
    config = tiny_config(folders, "flow")
    source = load_class_folder(str(folders["images"]), IMAGE)
    task = make_task(config, source)
    state, batch = task.init_state(), batch_of(task, source)
    step = jax.jit(task.train_step)
    fixed = lambda s: float(step(s.replace(step=jnp.zeros((), jnp.int32)), batch)[1]["loss"])  # noqa: E731
    before = fixed(state)
    for _ in range(25):
        state, _ = step(state, batch)
    assert fixed(state) < 0.9 * before  # 1.12 -> 0.91 (flow matching on the same t, noise and flips)


# --------------------------------------------------------------------------- the latent cache


@pytest.fixture(scope="module")
def cache(folders):
    return encode_latent_cache(tiny_config(folders), str(folders["root"] / "cache"), batch_size=5, progress=False)


def test_cache_holds_the_posteriors_of_both_orientations(folders, cache):
    out, header = cache
    source = load_latent_cache(out)
    assert header["flips"] == 2 and header["dataset"]["class_names"] == ["n00", "n01", "n02"]
    assert header["autoencoder"]["sha256"] == weights_digest(make_task(tiny_config(folders), source).vae_params)
    images = load_class_folder(str(folders["images"]), IMAGE)
    task = make_task(tiny_config(folders), images)
    pixels, labels = images.get(np.arange(12))
    moments, cached_labels = source.get(np.arange(12))
    np.testing.assert_array_equal(cached_labels, labels)
    for f, view in enumerate((pixels, pixels[:, :, ::-1])):
        posterior = task.vae.apply({"params": task.vae_params}, jnp.asarray(view, jnp.float32) / 127.5 - 1.0,
                                   method=task.vae.encode)  # fmt: skip
        np.testing.assert_allclose(moments[:, f, 0], posterior.mean, atol=1e-5)
        np.testing.assert_allclose(moments[:, f, 1], posterior.logvar, atol=1e-5)


def test_cached_step_equals_the_on_the_fly_step(folders, cache):
    images = load_class_folder(str(folders["images"]), IMAGE)
    cached = load_latent_cache(cache[0])
    direct = make_task(tiny_config(folders), images)
    from_cache = make_task(tiny_config(folders, **{"data.latent_cache": cache[0]}), cached)
    from_cache.check_source(cached)
    state, step_a, step_b = direct.init_state(), jax.jit(direct.train_step), jax.jit(from_cache.train_step)
    for step in range(2):
        a, metrics_a = step_a(state, batch_of(direct, images, step))
        b, metrics_b = step_b(state, batch_of(from_cache, cached, step))
        np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-5)
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
            np.testing.assert_allclose(x, y, atol=1e-6)


def test_a_cache_for_another_autoencoder_size_or_orientation_is_refused(folders, cache):
    cached = load_latent_cache(cache[0])
    other = make_task(tiny_config(folders, **{"latent.autoencoder": str(folders["other_vae"]),
                                              "data.latent_cache": cache[0]}), cached)  # fmt: skip
    with pytest.raises(DataError, match=r"was encoded by the autoencoder .*vae \(weights sha256 [0-9a-f]{12}\), not "):
        other.check_source(cached)
    header = dict(cached.header, flips=1)
    cached.header = header
    task = make_task(tiny_config(folders, **{"data.latent_cache": cache[0]}), cached)
    with pytest.raises(DataError, match="holds no mirrored latents"):
        task.check_source(cached)
    cached.header = dict(header, flips=2, image_size=32, latent_shape=[16, 16, 4])
    with pytest.raises(DataError, match=r"holds 32-pixel images as latents \[16, 16, 4\]; this run trains on 16"):
        task.check_source(cached)
    with pytest.raises(MissingDataError, match="does not exist"):
        load_latent_cache(str(folders["root"] / "no_cache"))
    with pytest.raises(ConfigError, match="data.latent_cache=.* holds latents for task 'class_latent'"):
        from jaxdiff.config.validation import validate

        config = tiny_config(folders, **{"data.latent_cache": cache[0]})
        config.task = "diffusion"
        validate(config)


def test_an_interrupted_cache_resumes_and_a_foreign_partial_is_refused(folders, cache, tmp_path):
    config = tiny_config(folders)
    task = make_task(config)
    source = load_class_folder(str(folders["images"]), IMAGE)
    params = task.autoencoder.params()
    header = cache_header(config, task.autoencoder, weights_digest(params), source, IMAGE)
    out = tmp_path / "cache"
    writer = CacheWriter(str(out), header)  # interrupted after the first 5 examples
    full = load_latent_cache(cache[0])
    writer.write(0, full.get(np.arange(5))[0] + 1.0, full.labels[:5])  # marked: resuming must keep these rows
    del writer
    with pytest.raises(MissingDataError, match="only the partial .* exists"):
        load_latent_cache(str(out))
    encode_latent_cache(config, str(out), batch_size=4, progress=False)
    resumed = load_latent_cache(str(out))
    np.testing.assert_allclose(resumed.moments[:5], full.moments[:5] + 1.0)
    np.testing.assert_allclose(resumed.moments[5:], full.moments[5:], atol=1e-6)
    with pytest.raises(DataError, match="already exists"):
        encode_latent_cache(config, str(out), progress=False)
    CacheWriter(str(tmp_path / "other"), header)
    with pytest.raises(DataError, match=r"partial cache written for another autoencoder"):
        other = tiny_config(folders, **{"latent.autoencoder": str(folders["other_vae"])})
        encode_latent_cache(other, str(tmp_path / "other"), progress=False)


# --------------------------------------------------------------------------- runs


def test_refusals_of_the_config_are_one_line(folders):
    with pytest.raises(ConfigError, match="latent.autoencoder='': task 'class_latent' trains on"):
        make_task(tiny_config(folders, **{"latent.autoencoder": ""}))
    with pytest.raises(ConfigError, match=r"latent.text_encoder: task 'class_latent' reads only latent.autoencoder"):
        make_task(tiny_config(folders, **{"latent.text_encoder": "x"}))
    with pytest.raises(ConfigError, match="model.in_channels=3 but the autoencoder"):
        config = tiny_config(folders)
        config.model.in_channels = 3
        make_task(config)
    with pytest.raises(WeightsError, match="does not exist"):
        make_task(tiny_config(folders, **{"latent.autoencoder": str(folders["root"] / "missing")}))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resumed_run_equals_an_uninterrupted_one_and_samples_by_class(folders, tmp_path):
    from jaxdiff.sampling.pipeline import Pipeline
    from jaxdiff.training.checkpoint import read_params
    from jaxdiff.training.loop import train_and_evaluate

    config = tiny_config(folders, "flow")
    train_and_evaluate(tiny_config(folders, "flow", **{"training.sample_every_steps": 4}), str(tmp_path / "whole"),
                       progress=False)  # fmt: skip
    with PIL.Image.open(tmp_path / "whole" / "samples" / "step_00000004.png") as grid:  # decoded latents
        assert np.asarray(grid).std() > 0
    half = tiny_config(folders, "flow", **{"training.num_train_steps": 2})
    train_and_evaluate(half, str(tmp_path / "resumed"), progress=False)
    train_and_evaluate(config, str(tmp_path / "resumed"), progress=False)
    whole = read_params(tmp_path / "whole", make_task)[2]
    resumed = read_params(tmp_path / "resumed", make_task)[2]
    for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(x, y)

    pipe = Pipeline.from_checkpoint(tmp_path / "whole")
    assert pipe.image_shape == (IMAGE, IMAGE, 3) and pipe.class_names == {"n00": 0, "n01": 1, "n02": 2}
    by_name = pipe.sample(2, class_label=["n02", "n00"], guidance=0.5, steps=3, seed=1)
    by_index = pipe.sample(2, class_label=[2, 0], guidance=0.5, steps=3, seed=1)
    assert by_name.dtype == np.uint8 and by_name.shape == (2, IMAGE, IMAGE, 3)
    np.testing.assert_array_equal(by_name, by_index)
    swapped = pipe.sample(2, class_label=[0, 2], guidance=0.5, steps=3, seed=1)
    assert np.abs(swapped.astype(int) - by_index.astype(int)).max() > 0
    kept = make_task(config, load_class_folder(str(folders["images"]), IMAGE)).vae_params  # the folder's weights
    for x, y in zip(jax.tree.leaves(pipe.decoder_params), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_data_encode_cli_writes_a_cache_and_refuses_an_existing_one(folders, tmp_path):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "import sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from tests.test_class_latent import tiny_config\n"
        f"FOLDERS = {{'images': {str(folders['images'])!r}, 'vae': {str(folders['vae'])!r}}}\n"
        "def get_config():\n"
        "    return tiny_config(FOLDERS)\n"
    )  # fmt: skip
    out = tmp_path / "cache"
    command = [sys.executable, "-m", "jaxdiff.cli", "data", "encode", "--config", str(config_file), "--out", str(out),
               "--batch-size", "8", "--config.data.random_flip=False"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"encoded 12 images (3 classes, 1 orientation) of class_folder {folders['images']}")
    assert "encoding: 100%" in done.stderr and "img" in done.stderr  # the progress bar, with its rate
    source = load_latent_cache(str(out))
    assert source.moments.shape == (12, 1, 2, *LATENT) and not os.path.exists(str(out) + PARTIAL_SUFFIX)
    again = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    last = again.stderr.strip().splitlines()[-1]
    assert again.returncode == 2 and last.startswith("jaxdiff: error: ") and "already exists" in last
