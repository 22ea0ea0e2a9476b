"""DreamBooth's prior preservation (`training.prior_preservation`, `jaxdiff.data.prior`): the combined loss against
float64 NumPy; the pairing of instance example i with class example i % n; refusals in one line; a tiny LoRA run
with a class folder written here (both loss parts logged); class images generated once by the base pipeline."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from jaxdiff import data
from jaxdiff.config import default_config
from jaxdiff.config.validation import validate
from jaxdiff.data.prior import add_class_images, class_indices, load_class_examples
from jaxdiff.errors import ConfigError
from jaxdiff.training import latent_step as lt
from tests.test_lora_training import lora_config, train, write_sd_folder

IMAGE = 16


def write_folder(folder, count, caption, seed):
    """`count` random 20×20 PNGs with captions.jsonl, each captioned f"{caption} {k}"."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = []
    for k in range(count):
        PIL.Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{k:02d}.png")
        lines.append(json.dumps({"file": f"{k:02d}.png", "text": f"{caption} {k}"}))
    (folder / "captions.jsonl").write_text("\n".join(lines))
    return folder


def dreambooth_config(sd, instance, classes, *, steps=3, num_class_images=3, weight=0.5):
    c = lora_config(sd, steps=steps)
    c.data.dataset, c.data.data_dir, c.model.image_size = "folder", str(instance), IMAGE
    p = c.training.prior_preservation
    p.class_data_dir, p.class_prompt, p.num_class_images, p.weight = str(classes), "a shape", num_class_images, weight
    return c


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return write_sd_folder(tmp_path_factory.mktemp("dreambooth"))


# --------------------------------------------------------------------------- the pure parts


def test_pairing_is_index_mod_n_and_moves_on_through_more_class_images():
    np.testing.assert_array_equal(class_indices([0, 4, 7, 2, 9], [0, 0, 1, 3, 2], 10, 3), [0, 1, 1, 2, 0])
    # 2 instance, 5 class images: c = 3 epochs pair each instance image with every class image once.
    np.testing.assert_array_equal(class_indices([0, 1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 2, 2, 3], 2, 5),
                                  [0, 1, 3, 2, 4, 0, 1])  # fmt: skip


@pytest.mark.parametrize("instances, classes", [(5, 3), (2, 5)])
def test_batches_hold_both_halves_paired(tmp_path, instances, classes):
    instance = data.load_folder(write_folder(tmp_path / "sks", instances, "sks", 0), IMAGE)
    paired = load_class_examples(write_folder(tmp_path / "dog", classes + 1, "dog", 1), IMAGE, classes)
    assert paired.files == tuple(f"{k:02d}.png" for k in range(classes))  # the first in sorted order
    instance.class_examples = paired
    seen = set()
    for step in range(6):
        batch = data.batch_for_step(instance, seed=3, step=step, global_batch_size=2, process_index=0,
                                    process_count=1)  # fmt: skip
        again = data.batch_for_step(instance, seed=3, step=step, global_batch_size=2, process_index=0,
                                    process_count=1)  # fmt: skip
        np.testing.assert_array_equal(batch["class_image"], again["class_image"])  # a function of (seed, step)
        index = np.array([int(c.split()[-1]) for c in batch["caption"]])
        epochs = (2 * step + np.arange(2)) // instances
        expected = (index + instances * (epochs % -(-classes // instances))) % classes
        if classes <= instances:
            np.testing.assert_array_equal(expected, index % classes)
        assert [f"dog {k}" for k in expected] == batch["class_caption"].tolist()
        np.testing.assert_array_equal(batch["class_image"], paired.get(expected)[0])
        np.testing.assert_array_equal(batch["class_original_size"], [[20, 20]] * 2)
        if step < 3:
            seen.update(expected.tolist())
    if classes > instances:  # the first 3 steps are c = 3 epochs: every class image used
        assert seen == set(range(classes))


def test_combined_loss_is_instance_mse_plus_weight_times_class_mse(sd):
    from jaxdiff.training.tasks.latent import LatentTask

    task = LatentTask(lora_config(sd), data.ShapesSource(num_examples=4))
    rng = np.random.default_rng(0)
    z_0 = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    noise = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    t = np.array([10, 500, 999, 250], np.int32)
    ids = task.tokenize(["a red circle", "a blue square", "a shape", "a shape"])
    state = task.init_state()
    params = jax.tree.map(lambda a: a + 0.01, state.params)  # up ≠ 0: the adapters act
    schedule = task.scheduler.schedule
    losses = lt.latent_losses(task.networks, schedule, task.config.diffusion, params, jnp.asarray(z_0),
                              jnp.asarray(ids), jnp.asarray(t), jnp.asarray(noise))  # fmt: skip
    loss, parts = lt.prior_preservation_loss(losses, 0.3)
    # The reference: ε prediction at the same z_t, squared error averaged in float64 over each half.
    alpha_bar = np.cumprod(1 - np.asarray(schedule.betas, np.float64))[t].reshape(-1, 1, 1, 1)
    z_t = np.sqrt(alpha_bar) * z_0 + np.sqrt(1 - alpha_bar) * noise
    weights = lt.unet_params(task.networks, params)
    out = np.asarray(lt.apply_unet(task.networks, weights, jnp.asarray(z_t, jnp.float32), jnp.asarray(t),
                                   lt.conditioning(task.networks, params, jnp.asarray(ids))), np.float64)  # fmt: skip
    per_example = ((out - noise) ** 2).mean(axis=(1, 2, 3))
    instance, prior = per_example[:2].mean(), per_example[2:].mean()
    np.testing.assert_allclose(float(parts["loss_instance"]), instance, rtol=1e-4)
    np.testing.assert_allclose(float(parts["loss_prior"]), prior, rtol=1e-4)
    np.testing.assert_allclose(float(loss), instance + 0.3 * prior, rtol=1e-4)
    assert abs(prior - instance) > 1e-3 * instance  # the halves differ: a swapped weight would fail
    whole = lt.latent_loss(task.networks, schedule, task.config.diffusion, params, jnp.asarray(z_0), jnp.asarray(ids),
                           jnp.asarray(t), jnp.asarray(noise))  # fmt: skip
    np.testing.assert_allclose(float(whole), per_example.mean(), rtol=1e-4)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("key, value", [("class_prompt", "a dog"), ("num_class_images", 5), ("weight", 2.0)])
def test_prior_keys_without_a_class_folder_are_refused(sd, key, value):
    config = lora_config(sd)
    config.training.prior_preservation[key] = value
    with pytest.raises(ConfigError, match=f"training.prior_preservation.{key}=.*without training.prior_preservation"
                                          ".class_data_dir") as err:  # fmt: skip
        validate(config)
    assert "\n" not in str(err.value)


def test_refusals_name_the_key(sd, tmp_path):
    from jaxdiff.training.tasks.latent import check_latent_config

    config = lora_config(sd)
    config.task, config.training.lora.rank = "diffusion", 0
    config.training.prior_preservation.class_data_dir = str(tmp_path)
    with pytest.raises(ConfigError, match=r"class_data_dir=.*\(task 'latent'\); task 'diffusion'"):
        validate(config)
    config = dreambooth_config(sd, tmp_path, tmp_path)
    config.data.dataset = "shapes"
    with pytest.raises(ConfigError, match="data.dataset='folder'.*got data.dataset='shapes'"):
        check_latent_config(config)
    config = dreambooth_config(sd, tmp_path, tmp_path)
    config.latent.text_encoder, config.training.lora = "", default_config().training.lora  # full fine-tuning
    with pytest.raises(ConfigError, match="class_data_dir=.*give latent.unet_init and latent.text_encoder"):
        check_latent_config(config)
    for key, bad in (("num_class_images", 0), ("weight", -1.0)):
        config = dreambooth_config(sd, tmp_path, tmp_path)
        config.training.prior_preservation[key] = bad
        with pytest.raises(ConfigError, match=f"training.prior_preservation.{key}={bad!r} is not allowed"):
            validate(config)


def test_too_few_class_images_without_a_prompt_is_refused(sd, tmp_path):
    from jaxdiff.training.tasks.latent import LatentTask

    config = dreambooth_config(sd, tmp_path / "sks", write_folder(tmp_path / "dog", 2, "dog", 1))
    config.training.prior_preservation.class_prompt = ""
    source = data.load_folder(write_folder(tmp_path / "sks", 2, "sks", 0), IMAGE)
    with pytest.raises(ConfigError, match="has 2 of num_class_images=3 images: give .*class_prompt"):
        LatentTask(config, source)


# --------------------------------------------------------------------------- class images and a run


def test_add_class_images_writes_captioned_pngs_after_the_folder_s_own(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (2, IMAGE, IMAGE, 3), dtype=np.uint8)
    assert add_class_images(str(tmp_path / "new"), images, "a dog") == ["class_000000.png", "class_000001.png"]
    source = data.load_folder(tmp_path / "new", IMAGE)
    np.testing.assert_array_equal(source.get(np.arange(2))[0], images)
    assert source.texts == ("a dog", "a dog")
    folder = tmp_path / "text"  # captions in .txt files: the new ones too
    folder.mkdir()
    PIL.Image.fromarray(images[0]).save(folder / "mine.png")
    (folder / "mine.txt").write_text("my dog")
    assert add_class_images(str(folder), images[1:], "a dog") == ["class_000001.png"]
    assert data.load_folder(folder, IMAGE).texts == ("a dog", "my dog")
    assert not [name for name in os.listdir(folder) if name.startswith(".")]  # no temporary file left


def test_missing_class_images_are_generated_once(sd, tmp_path):
    from jaxdiff.latent.pipeline import LatentPipeline
    from jaxdiff.training.tasks.latent import LatentTask

    classes = write_folder(tmp_path / "dog", 1, "dog", 1)
    config = dreambooth_config(sd, tmp_path / "sks", classes)
    source = data.load_folder(write_folder(tmp_path / "sks", 2, "sks", 0), IMAGE)
    task = LatentTask(config, source)
    assert sorted(os.listdir(classes)) == ["00.png", "captions.jsonl", "class_000001.png", "class_000002.png"]
    assert source.class_examples.texts == ("dog 0", "a shape", "a shape")
    expected = LatentPipeline.from_pretrained(str(sd)).text_to_image(["a shape"] * 2, seed=config.seed,
                                                                       height=IMAGE, width=IMAGE)  # fmt: skip
    np.testing.assert_array_equal(source.class_examples.get(np.array([1, 2]))[0], expected)
    stamp = os.stat(classes / "class_000001.png").st_mtime_ns
    LatentTask(config, data.load_folder(tmp_path / "sks", IMAGE))
    assert os.stat(classes / "class_000001.png").st_mtime_ns == stamp  # enough images: used as they are
    assert task.host_batch(data.batch_for_step(source, seed=0, step=0, global_batch_size=2, process_index=0,
                                               process_count=1))["class_input_ids"].shape == (2, 77)  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_tiny_run_logs_both_loss_parts(sd, tmp_path):
    instance = write_folder(tmp_path / "sks", 3, "sks", 0)
    classes = write_folder(tmp_path / "dog", 4, "dog", 1)
    train(dreambooth_config(sd, instance, classes, steps=3, weight=0.5), tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "loss_prior" in line]
    assert [line["step"] for line in logged] == [1, 2, 3]
    for line in logged:
        assert np.isfinite(line["loss_instance"]) and np.isfinite(line["loss_prior"])
        np.testing.assert_allclose(line["loss"], line["loss_instance"] + 0.5 * line["loss_prior"], rtol=1e-5)
    assert len(set(os.listdir(classes))) == 5  # an existing folder is not written to
