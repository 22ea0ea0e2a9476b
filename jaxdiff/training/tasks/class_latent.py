"""The class-conditional latent task: a pixel-family network (DiT / SiT, or a class-conditional U-Net) trained as
DiT's and SiT's `train.py` train on ImageNet, on the latents of a frozen autoencoder (`latent.autoencoder`: a
diffusers AutoencoderKL folder such as stabilityai/sd-vae-ft-ema, a Stable Diffusion folder's vae/, or an
autoencoder run's workdir).

One step on a batch {"image": uint8 [B, H, W, 3], "label": int32 [B]} (or, reading a latent cache,
{"moments": float32 [B, F, 2, h, w, C], "label"}):
images -> [-1, 1] -> each mirrored left-right with probability ½ (`data.random_flip`; from a cache: its mirrored
posterior) -> the autoencoder's posterior q(z | x) = N(mean, exp(logvar)) -> z_0 = (mean + exp(logvar / 2)·ε −
shift_factor)·scaling_factor, a draw from the posterior as DiT's `vae.encode(x).latent_dist.sample().mul_(0.18215)`
(not its mode), not differentiated -> labels replaced by the null class `model.num_classes` with probability
`training.label_dropout` (a DiT with a flow process drops them itself, `model.dit.class_dropout_prob`) -> the loss
of the config's family (`jaxdiff.families`: the discrete family's hybrid loss for DiT's learned σ, flow matching for
SiT) on z_0 [B, h, w, C] -> gradient (accumulated over `training.grad_accum_steps` micro-batches) -> clip, Adam,
EMA (`jaxdiff.training.step.apply_gradients`). Every draw of step s comes from fold_in(state.rng, s); a cached step
draws its orientation and ε exactly as the on-the-fly step, so both train alike on the same examples.

The train state is the network's (`jaxdiff.training.step.init_train_state`); checkpoints keep the autoencoder's
weights ("vae") and config, and the dataset's class names, so `Pipeline.from_checkpoint` samples the run
class-conditionally (`class_label=` by index or class name, `guidance=`) and decodes through that autoencoder,
whatever becomes of its path. Grids: `training.num_sample_images` samples of the EMA parameters with
`config.sampling`, labels cycling through the classes, decoded.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxdiff import data
from jaxdiff.config.defaults import default_config
from jaxdiff.data.latent_cache import CacheWriter, FORMAT, VERSION, LatentCacheSource
from jaxdiff.errors import ConfigError, DataError
from jaxdiff.families import family_of
from jaxdiff.latent.pipeline import decode_latents
from jaxdiff.models.autoencoder import DiagonalGaussian, create_autoencoder
from jaxdiff.models.networks import create_model
from jaxdiff.training.step import (
    TrainState,
    accumulated_grads,
    apply_gradients,
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    preprocess,
    training_labels,
)
from jaxdiff.training.tasks.diffusion import sample_images
from jaxdiff.training.latent_parts import KEPT_CONFIG, FrozenAutoencoder, check_same_autoencoder, describe_autoencoder
from jaxdiff.training.lora_base import weights_digest

Array = jax.Array
TASK = "class_latent"
# The latent task's keys this task does not read (it reads latent.autoencoder only).
UNREAD_LATENT_KEYS = ("text_encoder", "unet_init", "caption_dropout", "unet", "text")


# --------------------------------------------------------------------------- config and autoencoder


def check_class_latent_config(config: ml_collections.ConfigDict) -> None:
    """ConfigError (one line) unless the config fits the task: an autoencoder given, the latent task's other keys at
    their defaults, data in [-1, 1] (latents are not rescaled)."""
    lc, defaults = config.latent, default_config().latent
    if not lc.autoencoder:
        raise ConfigError(f"config latent.autoencoder='': task {TASK!r} trains on an autoencoder's latents; give a "
                          "diffusers AutoencoderKL folder (e.g. stabilityai/sd-vae-ft-ema), a Stable Diffusion "
                          "folder or an autoencoder run's workdir")  # fmt: skip
    changed = [f"latent.{key}" for key in UNREAD_LATENT_KEYS
               if (lc[key].to_dict() if isinstance(lc[key], ml_collections.ConfigDict) else lc[key])
               != (defaults[key].to_dict() if isinstance(defaults[key], ml_collections.ConfigDict) else defaults[key])]
    if changed:
        raise ConfigError(f"config {', '.join(changed)}: task {TASK!r} reads only latent.autoencoder; leave the "
                          "text-to-image keys at their defaults")  # fmt: skip
    if not config.data.centered:
        raise ConfigError(f"config data.centered=False: task {TASK!r} trains on latents as the autoencoder scales "
                          "them; set data.centered=True")  # fmt: skip


def read_autoencoder(config: ml_collections.ConfigDict, workdir: str | None = None) -> FrozenAutoencoder:
    """The autoencoder of `latent.autoencoder` (the copy the run at `workdir` keeps, if it was trained on that
    path), checked to draw latents of `model.in_channels` channels."""
    path = os.path.abspath(config.latent.autoencoder)
    kept = FrozenAutoencoder.kept_in(workdir) if workdir is not None else None
    autoencoder = kept if kept is not None and kept.identity["path"] == path else FrozenAutoencoder.at(path)
    channels = autoencoder.config.latent_channels
    if channels != config.model.in_channels:
        raise ConfigError(f"config model.in_channels={config.model.in_channels} but the autoencoder "
                          f"{describe_autoencoder(autoencoder.identity)} has {channels} latent channels")  # fmt: skip
    return autoencoder


def autoencoder_factor(vae_config: ml_collections.ConfigDict) -> int:
    """Image pixels per latent pixel along each side: 2^(levels − 1)."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def class_latent_image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(H, W, C) of the images the task encodes: the model's latent size times the autoencoder's factor (its config
    is read, not its weights)."""
    check_class_latent_config(config)
    vae_config = FrozenAutoencoder.at(config.latent.autoencoder).config
    size = config.model.image_size * autoencoder_factor(vae_config)
    return (size, size, vae_config.in_channels)


def class_names_of(source) -> tuple[str, ...]:
    """The names of a source's classes (a class folder's or a cache's), else "0".."K−1"."""
    return tuple(getattr(source, "class_names", None) or (str(k) for k in range(source.num_classes)))


# --------------------------------------------------------------------------- the pure parts


def posterior_of_moments(moments: Array, flip_rng: Array | None) -> DiagonalGaussian:
    """The posterior of each example of a cached batch, moments float32 [B, F, 2, h, w, C]: orientation 0, or with
    `flip_rng` orientation 1 (mirrored) where bernoulli(flip_rng, ½) of shape [B, 1, 1, 1] holds, the draw
    `jaxdiff.training.step.preprocess` mirrors the same images by."""
    if flip_rng is None:
        chosen = moments[:, 0]
    else:
        flip = jax.random.bernoulli(flip_rng, 0.5, (moments.shape[0], 1, 1, 1)).reshape(-1).astype(jnp.int32)
        chosen = jnp.take_along_axis(moments, flip[:, None, None, None, None, None], axis=1)[:, 0]
    return DiagonalGaussian(chosen[:, 0], chosen[:, 1])


def model_latents(posterior: DiagonalGaussian, vae_config: ml_collections.ConfigDict, rng: Array) -> Array:
    """A draw of the posterior in the model's scale: (mean + exp(logvar / 2)·ε − shift_factor)·scaling_factor,
    ε ~ N(0, I) from `rng` (DiT's `latent_dist.sample().mul_(0.18215)`)."""
    return (posterior.sample(rng) - (vae_config.shift_factor or 0.0)) * vae_config.scaling_factor


def make_class_latent_loss_fn(config: ml_collections.ConfigDict, model, vae, vae_config: ml_collections.ConfigDict,
                              vae_params, *, cached: bool) -> Callable:  # fmt: skip
    """loss(params, inputs, labels int32 [B], rng) -> float32 scalar: inputs uint8 images [B, H, W, 3] (`cached`
    False) or cached moments float32 [B, F, 2, h, w, C]; split(rng, 6) draws the flip, ε of the posterior, the
    family's noise level and noise, the network's dropout and the label dropout (module docstring)."""
    family_loss = family_of(config).loss_fn(model)
    num_classes, dropout, flips = config.model.num_classes, config.training.label_dropout, config.data.random_flip

    def loss_fn(params, inputs, labels, rng):
        flip_rng, encode_rng, t_rng, noise_rng, dropout_rng, label_rng = jax.random.split(rng, 6)
        flip_rng = flip_rng if flips else None
        if cached:
            posterior = posterior_of_moments(inputs, flip_rng)
        else:
            posterior = vae.apply({"params": vae_params}, preprocess(inputs, flip_rng), method=vae.encode)
        z_0 = jax.lax.stop_gradient(model_latents(posterior, vae_config, encode_rng))
        y = training_labels(labels, label_rng, num_classes, dropout)
        return family_loss(params, z_0, y, t_rng, noise_rng, dropout_rng)

    return loss_fn


def make_class_latent_step(loss_fn: Callable, training: ml_collections.ConfigDict, tx) -> Callable:
    """train_step(state, batch) -> (state, metrics) on {"image" or "moments", "label"} (module docstring)."""
    lr_schedule, decay, micro_batches = learning_rate_schedule(training), training.ema_decay, training.grad_accum_steps

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        inputs = batch["moments"] if "moments" in batch else batch["image"]
        loss, grads = accumulated_grads(loss_fn, state.params, inputs, batch["label"], rng, micro_batches)
        return apply_gradients(state, loss, grads, tx, ema_decay=decay, lr_schedule=lr_schedule)

    return train_step


def encode_moments(vae, vae_params, images: Array, flips: int) -> Array:
    """uint8 images [B, H, W, 3] -> float32 [B, F, 2, h, w, C]: the posterior's mean and clipped log-variance of
    each image (F = 1) and also of it mirrored left-right (F = 2)."""
    x = preprocess(images, None)
    views = (x, x[:, :, ::-1, :])[:flips]
    posteriors = [vae.apply({"params": vae_params}, view, method=vae.encode) for view in views]
    return jnp.stack([jnp.stack([p.mean, p.logvar], axis=1) for p in posteriors], axis=1)


# --------------------------------------------------------------------------- the task


class ClassLatentTask:
    """Trains `config.model` on a frozen autoencoder's latents of a labelled dataset or of its latent cache."""

    name = TASK
    grid_captions = None

    def __init__(self, config: ml_collections.ConfigDict, source=None, workdir: str | None = None):
        check_class_latent_config(config)
        self.config = config
        self.autoencoder = read_autoencoder(config, workdir)
        self.vae_config = self.autoencoder.config
        self.vae = create_autoencoder(self.vae_config)
        self.model = create_model(config.model)
        self.family = family_of(config)
        self.tx = make_optimizer(config.training)
        self.image_size = config.model.image_size * autoencoder_factor(self.vae_config)
        self.class_names = self.vae_params = self._kept = self._step = None
        self.cached = isinstance(source, LatentCacheSource)
        if source is not None:
            self.class_names = class_names_of(source)
            self.vae_params = jax.device_put(self.autoencoder.params())
            loss_fn = make_class_latent_loss_fn(config, self.model, self.vae, self.vae_config, self.vae_params,
                                                cached=self.cached)  # fmt: skip
            self._step = make_class_latent_step(loss_fn, config.training, self.tx)

    def check_source(self, source) -> None:
        config, size = self.config, self.image_size
        if isinstance(source, LatentCacheSource):
            check_cache(source.header, self, source.directory)
        elif tuple(source.image_shape) != (size, size, self.vae_config.in_channels):
            raise ConfigError(f"dataset {config.data.dataset!r} has images of shape {tuple(source.image_shape)}; the "
                              f"model's {config.model.image_size}×{config.model.image_size} latents are "
                              f"{(size, size, self.vae_config.in_channels)} images for this autoencoder")  # fmt: skip
        if config.model.num_classes and source.num_classes != config.model.num_classes:
            raise ConfigError(f"model.num_classes={config.model.num_classes} but dataset {config.data.dataset!r} has "
                              f"{source.num_classes} classes")  # fmt: skip

    def init_state(self) -> TrainState:
        return init_train_state(self.config, self.model, self.tx)

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self._step(state, batch)

    def host_batch(self, local_batch: dict) -> dict:
        """{"image": uint8, "label"} as read, or {"moments": float32, "label"} from a cache (whose source gives its
        moments where a source gives images)."""
        return {"moments" if self.cached else "image": np.asarray(local_batch["image"]),
                "label": np.asarray(local_batch["label"])}  # fmt: skip

    def sample_grid(self, ema_params, rng) -> Array:
        latents = sample_images(self.family, self.model, ema_params, rng, self.config.training.num_sample_images)
        decoded = decode_latents(self.vae, self.vae_config, self.vae_params, latents)
        return jnp.clip(decoded.astype(jnp.float32), -1.0, 1.0)

    def checkpoint_extras(self, state: TrainState) -> dict:
        return {"autoencoder": self.autoencoder.identity, KEPT_CONFIG: self.vae_config.to_dict(),
                "class_names": list(self.class_names)}  # fmt: skip

    def kept_params(self) -> dict:
        """{"vae": the autoencoder's parameters} (NumPy), so that the run never depends on the autoencoder's path."""
        if self._kept is None:
            self._kept = {"vae": jax.tree.map(np.asarray, self.vae_params)}
        return self._kept

    def check_resumed(self, extras: dict) -> None:
        """WeightsError for another autoencoder (naming both), DataError for another list of classes."""
        check_same_autoencoder(extras["autoencoder"], self.autoencoder.identity)
        if extras["class_names"] != list(self.class_names):
            raise DataError(f"the checkpoint was trained on {len(extras['class_names'])} classes "
                            f"({', '.join(extras['class_names'][:3])}, ...) and this dataset's "
                            f"{len(self.class_names)} differ; resume on the same data")  # fmt: skip


# --------------------------------------------------------------------------- DiT's and SiT's ImageNet training

IMAGENET_TRAIN_STEPS = 400_000  # the papers' comparison length (DiT's FID-2.27 model trained 7M steps)


def imagenet_training(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` (a DiT or SiT run config, `jaxdiff.readers.dit_checkpoint.dit_run_config` / `sit_run_config`) set,
    in place, to train as DiT's and SiT's `train.py` on ImageNet: task class_latent on a class folder (ImageFolder's
    classes, ADM's centre crop), random flips; AdamW at lr 1e-4 without weight decay (Adam with β (0.9, 0.999),
    ε 1e-8), no warm-up, no gradient clipping, global batch 256, EMA 0.9999, `IMAGENET_TRAIN_STEPS`; checkpoints
    and 16-image grids every 50K steps (DiT's ckpt_every). `data.data_dir` and `latent.autoencoder` are left to
    the user (the ImageNet train folder and a diffusers AutoencoderKL folder, e.g. stabilityai/sd-vae-ft-ema)."""
    config.task = TASK
    config.data.dataset, config.data.random_flip = "class_folder", True
    t = config.training
    t.batch_size, t.learning_rate, t.warmup_steps, t.grad_clip_norm = 256, 1e-4, 0, 0.0
    t.adam_b1, t.adam_b2, t.adam_eps, t.ema_decay = 0.9, 0.999, 1e-8, 0.9999
    t.num_train_steps = IMAGENET_TRAIN_STEPS
    t.log_every_steps, t.checkpoint_every_steps, t.sample_every_steps = 100, 50_000, 50_000
    t.num_sample_images = 16
    return config


# --------------------------------------------------------------------------- the latent cache


def cache_header(config: ml_collections.ConfigDict, autoencoder: FrozenAutoencoder, sha256: str, source,
                 image_size: int) -> dict:  # fmt: skip
    """The header (`jaxdiff.data.latent_cache`) of the cache of `source` encoded by `autoencoder` (weights `sha256`):
    both orientations stored when `data.random_flip`."""
    size = config.model.image_size
    dc = config.data
    return {
        "format": FORMAT, "version": VERSION, "autoencoder": {**autoencoder.identity, "sha256": sha256},
        "dataset": {"dataset": dc.dataset, "data_dir": os.path.abspath(dc.data_dir) if dc.data_dir else "",
                    "split": dc.split, "num_examples": int(source.num_examples),
                    "class_names": list(class_names_of(source))},
        "image_size": image_size, "latent_shape": [size, size, autoencoder.config.latent_channels],
        "flips": 2 if dc.random_flip else 1,
    }  # fmt: skip


def check_cache(header: dict, task: ClassLatentTask, directory: str) -> None:
    """DataError (one line) when the cache at `directory` was not made for this run: another autoencoder (its
    weights' SHA-256), image size or latent shape, or without the mirrored latents `data.random_flip` needs."""
    recorded = header["autoencoder"]
    sha256 = weights_digest(task.vae_params)
    if recorded["sha256"] != sha256:
        raise DataError(f"latent cache {directory} was encoded by the autoencoder {recorded['path']} (weights sha256 "
                        f"{recorded['sha256'][:12]}), not by latent.autoencoder={task.config.latent.autoencoder!r} "
                        f"(sha256 {sha256[:12]}); encode it again with this autoencoder")  # fmt: skip
    size, latent = task.image_size, [task.config.model.image_size] * 2 + [task.config.model.in_channels]
    if header["image_size"] != size or header["latent_shape"] != latent:
        raise DataError(f"latent cache {directory} holds {header['image_size']}-pixel images as latents "
                        f"{header['latent_shape']}; this run trains on {size}-pixel images as latents {latent} "
                        "(model.image_size)")  # fmt: skip
    if task.config.data.random_flip and header["flips"] != 2:
        raise DataError(f"latent cache {directory} holds no mirrored latents (encoded with data.random_flip=False); "
                        "set data.random_flip=False or encode it again with data.random_flip=True")  # fmt: skip


def encode_latent_cache(config: ml_collections.ConfigDict, out: str, *, batch_size: int = 64,
                        progress: bool = True) -> tuple[str, dict]:  # fmt: skip
    """Encodes the dataset of `config.data` once through `latent.autoencoder` into the cache `out`
    (`jaxdiff.data.latent_cache`), resuming a partial one made for the same header; batches of `batch_size`
    (the last padded) on this process's first device, with a progress bar (images per second). Returns (the
    cache's path, its header)."""
    check_class_latent_config(config)
    if config.data.latent_cache:
        raise ConfigError(f"config data.latent_cache={config.data.latent_cache!r}: encoding reads the images of "
                          "data.dataset; leave data.latent_cache empty and give the cache's folder as --out")
    task = ClassLatentTask(config)
    source = data.load_dataset(config.data, image_shape_for_synthetic=(task.image_size, task.image_size, 3),
                               image_size=task.image_size)  # fmt: skip
    task.check_source(source)
    params = jax.device_put(task.autoencoder.params())
    header = cache_header(config, task.autoencoder, weights_digest(params), source, task.image_size)
    writer = CacheWriter(out, header)
    encode = jax.jit(lambda p, images: encode_moments(task.vae, p, images, header["flips"]))
    total = source.num_examples
    with tqdm(total=total, initial=writer.done, unit="img", disable=not progress, desc="encoding") as bar:
        for start in range(writer.done, total, batch_size):
            indices = np.arange(start, min(start + batch_size, total))
            images, labels = source.get(indices)
            padded = np.concatenate([images, np.zeros((batch_size - len(indices), *images.shape[1:]), images.dtype)])
            writer.write(start, np.asarray(encode(params, padded))[: len(indices)], labels)
            bar.update(len(indices))
    return writer.finish(), header

