"""The configuration schema: every key a run can set, with the DDPM CIFAR-10 recipe as defaults.

Files in `configs/` start from `default_config()` and override what differs.
The returned ConfigDict is locked, so setting a key that does not exist
(a typo in a config file or on the command line) raises an error naming it.
`SPECS` gives each key its type, allowed values and meaning; `validate`
checks a whole config against it before a run starts.

`task` says what a run trains (`jaxdiff.tasks`). Sections only some tasks read are ignored by the
others: the diffusion model reads `model` and `diffusion`, the autoencoder `autoencoder` and
`autoencoder_loss`; every task reads `seed`, `data`, `training` and `sampling` (where they apply).
"""

from __future__ import annotations

import dataclasses
import difflib
import math

import ml_collections

from jaxdiff.autoencoder_training import LOSS_DEFAULTS, RECONSTRUCTION_LOSSES, autoencoder_model_config
from jaxdiff.checks import is_int, is_real
from jaxdiff.continuous_model import CONTINUOUS_LOSSES, PARAMETERIZATIONS, process_from_config
from jaxdiff.diffusion import LOSS_TYPES, MEAN_TYPES, VAR_TYPES
from jaxdiff.models import NETWORKS, create_model, ncsnpp, song_unet
from jaxdiff.models.autoencoder import COMPUTE_DTYPES as AUTOENCODER_DTYPES
from jaxdiff.models.unet import DTYPES
from jaxdiff.processes import PROCESSES
from jaxdiff.samplers import CONTINUOUS_SAMPLERS, SAMPLERS, SPACINGS
from jaxdiff.samplers.pc import CORRECTORS, PREDICTORS
from jaxdiff.schedule import BETA_SCHEDULES

DATASETS = (
    "cifar10", "celebahq256", "lsun_church256", "lsun_bedroom256", "lsun_cat256", "digits", "shapes", "synthetic",
    "folder",
)  # fmt: skip
TASKS = ("diffusion", "autoencoder", "latent")


def default_config() -> ml_collections.ConfigDict:
    """The DDPM CIFAR-10 recipe (Ho et al. 2020, official code), locked: values may change, keys may not."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "diffusion"  # what the run trains: diffusion | autoencoder | latent (jaxdiff.tasks)

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "cifar10"
    c.data.split = "train"
    c.data.data_dir = ""  # TFDS data_dir; "" means TFDS' default (~/tensorflow_datasets)
    c.data.random_flip = True
    c.data.centered = True  # model data in [-1, 1]; False: [0, 1] (score_sde's data.centered), continuous only

    c.model = ml_collections.ConfigDict()
    c.model.image_size = 32
    c.model.in_channels = 3
    c.model.out_channels = 3  # 2 * in_channels for the learned variances
    c.model.ch = 128
    c.model.ch_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.1
    c.model.resamp_with_conv = True
    c.model.num_classes = 0  # > 0: class-conditional, label `num_classes` is the null label
    c.model.dtype = "float32"  # compute dtype; parameters stay float32
    c.model.remat = False  # recompute ResBlock activations in the backward pass (saves memory)
    # Options of diffusers' UNet2DModel; the defaults are the official DDPM network.
    c.model.null_label = True  # class-conditional: label_emb has a row for "no label" (index num_classes)
    c.model.flip_sin_to_cos = False  # timestep embedding [cos, sin] instead of [sin, cos]
    c.model.freq_shift = 1  # timestep frequencies exp(-i·ln(10000) / (ch/2 - freq_shift))
    c.model.norm_groups = 32  # GroupNorm groups
    c.model.norm_eps = 1e-6  # GroupNorm epsilon
    c.model.act = "silu"  # ResBlock activation: silu (= swish), mish, gelu, relu
    c.model.attn_head_dim = 0  # channels per attention head; 0: one head over all channels
    c.model.temb_scale_shift = False  # the timestep embedding scales and shifts norm2 (diffusers' scale_shift)
    c.model.downsample_padding = 0  # strided conv padding: 0 = TF (0 before, 1 after), 1 = 1 each side
    c.model.resblock_down_levels = ()  # levels whose downsampler is a ResBlock with average pooling
    c.model.resblock_up_levels = ()  # levels whose upsampler is a ResBlock with nearest upsampling
    c.model.mid_attn = True  # self-attention between the two middle ResBlocks
    c.model.mid_attn_norm = True  # GroupNorm in that attention block
    # The network: "ddpm_unet" is the U-Net of the keys above; the others read only their own section
    # (image size, channels and classes there must agree with image_size, in_channels and num_classes).
    c.model.network = "ddpm_unet"
    c.model.ncsnpp = ncsnpp.default_config()  # score_sde's NCSN++ / DDPM++ (models/ncsnpp.py)
    c.model.song_unet = song_unet.default_config()  # EDM's SongUNet (models/song_unet.py)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.diffusion.mean_type = "eps"
    c.diffusion.var_type = "fixedlarge"
    c.diffusion.loss_type = "mse"
    c.diffusion.hybrid_lambda = 0.001
    c.diffusion.min_snr_gamma = 0.0  # 0 turns min-SNR-γ weighting off
    # Continuous time (score SDEs, EDM): the process, what the network predicts, and the losses' settings.
    c.diffusion.process = "discrete"  # discrete: the β schedule above; ve | vp | subvp | edm
    c.diffusion.sigma_min = 0.0  # ve/edm; 0: the process's default (ve 0.01, edm 0.002)
    c.diffusion.sigma_max = 0.0  # ve/edm; 0: the process's default (ve 50, edm 80)
    c.diffusion.beta_min = 0.1  # vp/subvp
    c.diffusion.beta_max = 20.0  # vp/subvp
    c.diffusion.parameterization = "eps"  # continuous: eps (labels t·999) | score (labels σ) | edm (c_noise)
    c.diffusion.sigma_data = 0.5  # EDM preconditioning and loss
    c.diffusion.t_eps = 1e-5  # dsm: t ~ U[t_eps, t_max]
    c.diffusion.reduce_mean = False  # dsm/edm: mean over each example's dimensions instead of the sum
    c.diffusion.likelihood_weighting = False  # dsm: weight g(t)² (score_sde's likelihood weighting)
    c.diffusion.p_mean = -1.2  # edm: ln σ ~ N(p_mean, p_std²)
    c.diffusion.p_std = 1.2

    # task "autoencoder": the KL autoencoder in diffusers' AutoencoderKL keys (one DownEncoderBlock2D /
    # UpDecoderBlock2D per block_out_channels entry), plus our dtype and remat; defaults are diffusers'.
    c.autoencoder = ml_collections.ConfigDict()
    c.autoencoder.in_channels = 3
    c.autoencoder.out_channels = 3
    c.autoencoder.block_out_channels = (64,)
    c.autoencoder.layers_per_block = 1
    c.autoencoder.latent_channels = 4
    c.autoencoder.norm_num_groups = 32
    c.autoencoder.sample_size = 32  # height = width of the images it trains on
    c.autoencoder.act_fn = "silu"
    c.autoencoder.use_quant_conv = True
    c.autoencoder.use_post_quant_conv = True
    c.autoencoder.mid_block_add_attention = True
    c.autoencoder.dtype = "float32"  # compute dtype; parameters stay float32
    c.autoencoder.remat = False
    # task "autoencoder": its loss (jaxdiff.autoencoder_training).
    c.autoencoder_loss = ml_collections.ConfigDict(dict(LOSS_DEFAULTS))
    # task "latent": text-conditioned diffusion on the latents of a frozen autoencoder (jaxdiff.tasks.latent).
    c.latent = ml_collections.ConfigDict()
    c.latent.autoencoder = ""  # an autoencoder run's workdir (its newest checkpoint) or a Stable Diffusion folder
    c.latent.text_encoder = ""  # "": a CLIP-style transformer trained with the U-Net; an SD folder: its, frozen
    c.latent.unet_init = ""  # an SD folder: fine-tune its U-Net (architecture and weights); "": latent.unet
    c.latent.caption_dropout = 0.1  # probability of training on the empty prompt (classifier-free guidance)
    c.latent.unet = ml_collections.ConfigDict()  # the cross-attention U-Net trained from scratch
    c.latent.unet.block_out_channels = (64, 128)
    c.latent.unet.layers_per_block = 1
    c.latent.unet.attention_levels = (0, 1)  # levels with cross-attention transformer blocks
    c.latent.unet.attention_heads = 4  # heads of each transformer block
    c.latent.unet.norm_num_groups = 32
    c.latent.unet.use_linear_projection = True
    c.latent.unet.dtype = "float32"  # compute dtype; parameters stay float32
    c.latent.text = ml_collections.ConfigDict()  # the text transformer trained from scratch (word-level vocabulary)
    c.latent.text.vocab_size = 256  # rows of the token embedding: at least 4 special tokens + the captions' words
    c.latent.text.max_length = 16  # tokens per prompt: start, at most max_length - 2 words, end, padding
    c.latent.text.hidden_size = 64
    c.latent.text.intermediate_size = 256
    c.latent.text.num_hidden_layers = 2
    c.latent.text.num_attention_heads = 4
    c.latent.text.hidden_act = "quick_gelu"

    c.training = ml_collections.ConfigDict()
    c.training.batch_size = 128  # global, over all devices and hosts
    c.training.num_train_steps = 800_000
    c.training.learning_rate = 2e-4
    c.training.warmup_steps = 5000
    c.training.grad_clip_norm = 1.0
    c.training.adam_b1 = 0.9
    c.training.adam_b2 = 0.999
    c.training.adam_eps = 1e-8
    c.training.ema_decay = 0.9999
    c.training.grad_accum_steps = 1
    c.training.fsdp = 1  # devices each large state array is split over (FSDP mesh axis); 1: state replicated
    c.training.label_dropout = 0.0  # probability of the null label (classifier-free guidance)
    c.training.max_consecutive_nonfinite = 10
    c.training.log_every_steps = 100
    c.training.checkpoint_every_steps = 10_000
    c.training.keep_checkpoints = 3
    c.training.sample_every_steps = 50_000
    c.training.num_sample_images = 64

    c.sampling = ml_collections.ConfigDict()
    c.sampling.sampler = "ddpm"
    c.sampling.steps = 0  # 0: all T steps
    c.sampling.eta = 0.0
    c.sampling.spacing = ""  # "": the sampler's default (uniform for ddpm/ddim, karras for the ODE solvers)
    c.sampling.clip_denoised = True
    c.sampling.guidance = 0.0
    c.sampling.batch_size = 256
    # Continuous samplers (jaxdiff.samplers.sample_continuous).
    c.sampling.predictor = "reverse_diffusion"  # pc
    c.sampling.corrector = "langevin"  # pc: langevin | ald | none
    c.sampling.snr = 0.16  # pc: corrector signal-to-noise ratio
    c.sampling.n_corrector = 1  # pc: corrector steps per predictor step
    c.sampling.rtol = 1e-5  # ode
    c.sampling.atol = 1e-5  # ode
    c.sampling.s_churn = 0.0  # edm_stochastic
    c.sampling.s_min = 0.0  # edm_stochastic
    c.sampling.s_max = math.inf  # edm_stochastic
    c.sampling.s_noise = 1.0  # edm_stochastic
    c.lock()
    return c


class ConfigError(ValueError):
    """A config key that does not exist, or a value its spec does not allow; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one config key accepts. For tuples, `low`/`high` bound every item and `min_items` the length."""

    type: type  # bool, int, float, str or tuple (of ints)
    meaning: str
    choices: tuple = ()  # the allowed values, when they form a fixed set
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `low` itself is not allowed
    high_open: bool = False  # `high` itself is not allowed
    min_items: int = 0
    infinite: bool = False  # floats: +inf is allowed too

    def allowed(self) -> str:
        """What the spec accepts, in words: "an int >= 1", "a float in (0, 1]", "one of ('a', 'b')"."""
        if self.choices:
            return f"one of {self.choices}"
        name = {bool: "a bool", int: "an int", float: "a number", str: "a string", tuple: "a tuple of ints"}[self.type]
        if self.low is not None and self.high is not None:
            bounds = f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            bounds = f" {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            bounds = f" {'<' if self.high_open else '<='} {self.high:g}"
        else:
            bounds = ""
        if self.type is tuple:
            length = f", at least {self.min_items}" if self.min_items else ""
            return f"{name}{bounds}{length}"
        return name + bounds + (" or inf" if self.infinite else "")

    def accepts(self, value) -> bool:
        if self.choices:
            return value in self.choices
        if self.type is tuple:
            items = value if isinstance(value, (tuple, list)) else None
            return (
                items is not None and len(items) >= self.min_items
                and all(is_int(item, numpy=False) and self._in_range(item) for item in items)
            )  # fmt: skip
        if self.type is bool:
            return isinstance(value, bool)
        if self.type is int:
            return is_int(value, numpy=False) and self._in_range(value)
        if self.type is float:
            finite = is_real(value, finite=True, numpy=False) or (self.infinite and value == math.inf)
            return is_real(value, numpy=False) and finite and self._in_range(value)
        return isinstance(value, self.type)

    def _in_range(self, value) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below


def _positive_int(meaning: str) -> Spec:
    return Spec(int, meaning, low=1)


def _fraction(meaning: str, *, high_open: bool = True) -> Spec:
    return Spec(float, meaning, low=0, high=1, high_open=high_open)


SPECS: dict[str, Spec] = {
    "seed": Spec(int, "seed of parameter initialisation, data order and sampling", low=0, high=2**32 - 1),
    "task": Spec(str, "what the run trains", choices=TASKS),
    "data.dataset": Spec(str, "training data", choices=DATASETS),
    "data.split": Spec(str, "split to train on, e.g. 'train'"),
    "data.data_dir": Spec(str, "TFDS data_dir; '' means TFDS' default"),
    "data.random_flip": Spec(bool, "random horizontal flips of the training images"),
    "data.centered": Spec(bool, "the model's data range: [-1, 1] (True) or [0, 1] (False; continuous processes only)"),
    "model.image_size": _positive_int("height = width of the images, pixels"),
    "model.in_channels": _positive_int("image channels"),
    "model.out_channels": _positive_int("model output channels: in_channels, or twice that for learned variances"),
    "model.ch": _positive_int("base channel width of the U-Net"),
    "model.ch_mult": Spec(tuple, "width multiplier of each resolution level", low=1, min_items=1),
    "model.num_res_blocks": _positive_int("ResBlocks per resolution level"),
    "model.attn_resolutions": Spec(tuple, "resolutions (pixels) with self-attention", low=1),
    "model.dropout": _fraction("dropout rate in the ResBlocks"),
    "model.resamp_with_conv": Spec(bool, "3×3 convolutions in up/downsampling (else nearest/average pooling)"),
    "model.num_classes": Spec(int, "classes of a class-conditional model; 0: unconditional", low=0),
    "model.dtype": Spec(str, "compute dtype (parameters stay float32)", choices=DTYPES),
    "model.remat": Spec(bool, "recompute ResBlock activations in the backward pass"),
    "model.null_label": Spec(bool, "class-conditional models: a label num_classes meaning 'no label'"),
    "model.flip_sin_to_cos": Spec(bool, "timestep embedding [cos, sin] instead of [sin, cos]"),
    "model.freq_shift": Spec(int, "timestep frequencies exp(-i·ln(10000) / (ch/2 - freq_shift))", low=0),
    "model.norm_groups": _positive_int("GroupNorm groups"),
    "model.norm_eps": Spec(float, "GroupNorm epsilon", low=0, low_open=True),
    "model.act": Spec(str, "ResBlock activation", choices=("silu", "swish", "mish", "gelu", "relu")),
    "model.attn_head_dim": Spec(int, "channels per attention head; 0: one head", low=0),
    "model.temb_scale_shift": Spec(bool, "the timestep embedding scales and shifts the second GroupNorm"),
    "model.downsample_padding": Spec(int, "strided conv padding: 0 = TF (0 before, 1 after), 1 = 1 each side",
                                     low=0, high=1),  # fmt: skip
    "model.resblock_down_levels": Spec(tuple, "levels downsampled by a ResBlock with average pooling", low=0),
    "model.resblock_up_levels": Spec(tuple, "levels upsampled by a ResBlock with nearest upsampling", low=1),
    "model.mid_attn": Spec(bool, "self-attention between the two middle ResBlocks"),
    "model.mid_attn_norm": Spec(bool, "GroupNorm in the middle attention block"),
    "model.network": Spec(str, "the network: ddpm_unet (the keys above), ncsnpp or song_unet (their sections)",
                          choices=NETWORKS),  # fmt: skip
    "model.ncsnpp.image_size": _positive_int("NCSN++: height = width, pixels (= model.image_size)"),
    "model.ncsnpp.num_channels": _positive_int("NCSN++: image channels (= model.in_channels)"),
    "model.ncsnpp.nf": _positive_int("NCSN++: base width, a multiple of 4"),
    "model.ncsnpp.ch_mult": Spec(tuple, "NCSN++: width multiplier of each level", low=1, min_items=1),
    "model.ncsnpp.num_res_blocks": _positive_int("NCSN++: residual blocks per level"),
    "model.ncsnpp.attn_resolutions": Spec(tuple, "NCSN++: resolutions (pixels) with self-attention", low=1),
    "model.ncsnpp.dropout": _fraction("NCSN++: dropout rate"),
    "model.ncsnpp.resamp_with_conv": Spec(bool, "NCSN++: convolutions in plain (non-FIR) resampling"),
    "model.ncsnpp.conditional": Spec(bool, "NCSN++: the network sees the noise level"),
    "model.ncsnpp.fir": Spec(bool, "NCSN++: FIR-filtered resampling"),
    "model.ncsnpp.fir_kernel": Spec(tuple, "NCSN++: FIR kernel taps", low=0, min_items=1),
    "model.ncsnpp.skip_rescale": Spec(bool, "NCSN++: skip connections scaled by 1/√2"),
    "model.ncsnpp.resblock_type": Spec(str, "NCSN++: residual block", choices=ncsnpp.RESBLOCK_TYPES),
    "model.ncsnpp.progressive": Spec(str, "NCSN++: progressive output", choices=ncsnpp.PROGRESSIVE),
    "model.ncsnpp.progressive_input": Spec(str, "NCSN++: progressive input", choices=ncsnpp.PROGRESSIVE_INPUT),
    "model.ncsnpp.progressive_combine": Spec(str, "NCSN++: combining the input pyramid", choices=ncsnpp.COMBINE),
    "model.ncsnpp.init_scale": Spec(float, "NCSN++: scale of the last convolutions' init; 0: near zero", low=0),
    "model.ncsnpp.embedding_type": Spec(str, "NCSN++: noise embedding: fourier (of log σ) or positional",
                                        choices=ncsnpp.EMBEDDINGS),  # fmt: skip
    "model.ncsnpp.fourier_scale": Spec(float, "NCSN++: scale of the Fourier features", low=0, low_open=True),
    "model.song_unet.img_resolution": _positive_int("SongUNet: height = width, pixels (= model.image_size)"),
    "model.song_unet.in_channels": _positive_int("SongUNet: input channels (= model.in_channels)"),
    "model.song_unet.out_channels": _positive_int("SongUNet: output channels (= model.in_channels)"),
    "model.song_unet.label_dim": Spec(int, "SongUNet: classes (= model.num_classes); 0: unconditional", low=0),
    "model.song_unet.augment_dim": Spec(int, "SongUNet: augmentation labels; 0: none", low=0),
    "model.song_unet.model_channels": _positive_int("SongUNet: base width, a multiple of 4"),
    "model.song_unet.channel_mult": Spec(tuple, "SongUNet: width multiplier of each level", low=1, min_items=1),
    "model.song_unet.channel_mult_emb": _positive_int("SongUNet: embedding width / model_channels"),
    "model.song_unet.num_blocks": _positive_int("SongUNet: blocks per level"),
    "model.song_unet.attn_resolutions": Spec(tuple, "SongUNet: resolutions (pixels) with self-attention", low=1),
    "model.song_unet.dropout": _fraction("SongUNet: dropout rate"),
    "model.song_unet.embedding_type": Spec(str, "SongUNet: noise embedding", choices=song_unet.EMBEDDINGS),
    "model.song_unet.channel_mult_noise": _positive_int("SongUNet: noise embedding width / model_channels"),
    "model.song_unet.encoder_type": Spec(str, "SongUNet: encoder", choices=song_unet.ENCODERS),
    "model.song_unet.decoder_type": Spec(str, "SongUNet: decoder", choices=song_unet.DECODERS),
    "model.song_unet.resample_filter": Spec(tuple, "SongUNet: resampling filter taps", low=0, min_items=1),
    "diffusion.schedule": Spec(str, "beta schedule", choices=tuple(BETA_SCHEDULES)),
    "diffusion.num_timesteps": Spec(int, "T, the number of diffusion steps", low=2),
    "diffusion.beta_start": Spec(float, "beta of the first step (linear-like schedules)", low=0, high=1, low_open=True),
    "diffusion.beta_end": Spec(float, "beta of the last step (linear-like schedules)", low=0, high=1, low_open=True),
    "diffusion.mean_type": Spec(str, "what the model predicts", choices=MEAN_TYPES),
    "diffusion.var_type": Spec(str, "reverse-process variance", choices=VAR_TYPES),
    "diffusion.loss_type": Spec(str, "training loss (dsm, edm: continuous processes)",
                                choices=LOSS_TYPES + CONTINUOUS_LOSSES),  # fmt: skip
    "diffusion.hybrid_lambda": Spec(float, "weight of the variational bound in the hybrid loss", low=0),
    "diffusion.min_snr_gamma": Spec(float, "min-SNR-γ loss weighting; 0: off", low=0),
    "diffusion.process": Spec(str, "noise process: the discrete schedule or a continuous one",
                              choices=("discrete",) + PROCESSES),  # fmt: skip
    "diffusion.sigma_min": Spec(float, "ve/edm: smallest noise level; 0: the process's default", low=0),
    "diffusion.sigma_max": Spec(float, "ve/edm: largest noise level; 0: the process's default", low=0),
    "diffusion.beta_min": Spec(float, "vp/subvp: β(0)", low=0),
    "diffusion.beta_max": Spec(float, "vp/subvp: β(1)", low=0, low_open=True),
    "diffusion.parameterization": Spec(str, "continuous processes: what the network predicts",
                                       choices=PARAMETERIZATIONS),  # fmt: skip
    "diffusion.sigma_data": Spec(float, "edm: the data's standard deviation", low=0, low_open=True),
    "diffusion.t_eps": Spec(float, "dsm: smallest training time t", low=0, high=0.1, low_open=True, high_open=True),
    "diffusion.reduce_mean": Spec(bool, "dsm/edm: average each example's squared errors instead of summing"),
    "diffusion.likelihood_weighting": Spec(bool, "dsm: score_sde's likelihood weighting g(t)²"),
    "diffusion.p_mean": Spec(float, "edm: mean of ln σ in training"),
    "diffusion.p_std": Spec(float, "edm: standard deviation of ln σ in training", low=0, low_open=True),
    "autoencoder.in_channels": _positive_int("autoencoder: image channels"),
    "autoencoder.out_channels": _positive_int("autoencoder: reconstructed channels (= in_channels to train it)"),
    "autoencoder.block_out_channels": Spec(tuple, "autoencoder: width of each resolution level", low=1, min_items=1),
    "autoencoder.layers_per_block": _positive_int("autoencoder: ResNet blocks per encoder level"),
    "autoencoder.latent_channels": _positive_int("autoencoder: latent channels"),
    "autoencoder.norm_num_groups": _positive_int("autoencoder: GroupNorm groups, dividing every width"),
    "autoencoder.sample_size": _positive_int("autoencoder: height = width of the images, pixels"),
    "autoencoder.act_fn": Spec(str, "autoencoder: activation", choices=("silu", "swish")),
    "autoencoder.use_quant_conv": Spec(bool, "autoencoder: 1×1 convolution after the encoder"),
    "autoencoder.use_post_quant_conv": Spec(bool, "autoencoder: 1×1 convolution before the decoder"),
    "autoencoder.mid_block_add_attention": Spec(bool, "autoencoder: self-attention in the middle blocks"),
    "autoencoder.dtype": Spec(str, "autoencoder: compute dtype (parameters stay float32)", choices=AUTOENCODER_DTYPES),
    "autoencoder.remat": Spec(bool, "autoencoder: recompute ResNet-block activations in the backward pass"),
    "autoencoder_loss.reconstruction_loss": Spec(str, "autoencoder: per-pixel reconstruction loss",
                                                 choices=RECONSTRUCTION_LOSSES),  # fmt: skip
    "autoencoder_loss.kl_weight": Spec(float, "autoencoder: weight of the KL term", low=0),
    "autoencoder_loss.disc_weight": Spec(float, "autoencoder: weight of the PatchGAN term; 0: no discriminator", low=0),
    "autoencoder_loss.disc_start": Spec(int, "autoencoder: first step with the discriminator terms", low=0),
    "autoencoder_loss.disc_layers": _positive_int("autoencoder: stride-2 convolutions of the PatchGAN"),
    "autoencoder_loss.disc_channels": _positive_int("autoencoder: width of the PatchGAN's first convolution"),
    "latent.autoencoder": Spec(str, "latent: the frozen autoencoder, an autoencoder run's workdir or an SD folder"),
    "latent.text_encoder": Spec(str, "latent: '' trains a text transformer; an SD folder: its frozen text encoder"),
    "latent.unet_init": Spec(str, "latent: an SD folder whose U-Net is fine-tuned; '' trains latent.unet from scratch"),
    "latent.caption_dropout": _fraction("latent: probability of the empty prompt in training", high_open=False),
    "latent.unet.block_out_channels": Spec(tuple, "latent U-Net: width of each level", low=1, min_items=1),
    "latent.unet.layers_per_block": _positive_int("latent U-Net: ResNet blocks per down level"),
    "latent.unet.attention_levels": Spec(tuple, "latent U-Net: levels with cross-attention", low=0),
    "latent.unet.attention_heads": _positive_int("latent U-Net: attention heads per transformer block"),
    "latent.unet.norm_num_groups": _positive_int("latent U-Net: GroupNorm groups, dividing every width"),
    "latent.unet.use_linear_projection": Spec(bool, "latent U-Net: dense (not 1×1 conv) transformer projections"),
    "latent.unet.dtype": Spec(str, "latent U-Net: compute dtype (parameters stay float32)", choices=DTYPES),
    "latent.text.vocab_size": Spec(int, "latent text: token embedding rows (>= 4 + the captions' words)", low=5),
    "latent.text.max_length": Spec(int, "latent text: tokens per prompt, start and end included", low=3),
    "latent.text.hidden_size": _positive_int("latent text: width, the U-Net's cross-attention width"),
    "latent.text.intermediate_size": _positive_int("latent text: MLP width"),
    "latent.text.num_hidden_layers": _positive_int("latent text: transformer layers"),
    "latent.text.num_attention_heads": _positive_int("latent text: attention heads, dividing hidden_size"),
    "latent.text.hidden_act": Spec(str, "latent text: MLP activation", choices=("quick_gelu", "gelu")),
    "training.batch_size": _positive_int("global batch size, over all devices and hosts"),
    "training.num_train_steps": _positive_int("optimizer steps of the whole run"),
    "training.learning_rate": Spec(float, "Adam learning rate after warm-up", low=0, low_open=True),
    "training.warmup_steps": Spec(int, "steps of linear learning-rate warm-up", low=0),
    "training.grad_clip_norm": Spec(float, "global gradient-norm clip; 0: off", low=0),
    "training.adam_b1": _fraction("Adam β1"),
    "training.adam_b2": _fraction("Adam β2"),
    "training.adam_eps": Spec(float, "Adam ε", low=0, low_open=True),
    "training.ema_decay": _fraction("decay of the parameters' exponential moving average", high_open=False),
    "training.grad_accum_steps": _positive_int("micro-batches accumulated per optimizer step"),
    "training.fsdp": _positive_int("devices each large parameter and optimizer-state array is split over (FSDP)"),
    "training.label_dropout": _fraction("probability of the null label (classifier-free guidance)"),
    "training.max_consecutive_nonfinite": _positive_int("non-finite steps in a row that stop the run"),
    "training.log_every_steps": _positive_int("steps between metric logs"),
    "training.checkpoint_every_steps": _positive_int("steps between checkpoints"),
    "training.keep_checkpoints": _positive_int("checkpoints kept in the workdir"),
    "training.sample_every_steps": _positive_int("steps between sample grids"),
    "training.num_sample_images": _positive_int("images in each sample grid"),
    "sampling.sampler": Spec(str, "sampler", choices=tuple(dict.fromkeys(SAMPLERS + CONTINUOUS_SAMPLERS))),
    "sampling.steps": Spec(int, "sampling steps; 0: all T (discrete) or the sampler's default (continuous)", low=0),
    "sampling.eta": Spec(float, "DDIM noise scale", low=0),
    "sampling.spacing": Spec(str, "timestep spacing; '': the sampler's default", choices=("",) + tuple(SPACINGS)),
    "sampling.clip_denoised": Spec(bool, "clip each predicted x_0 to [-1, 1]"),
    "sampling.guidance": Spec(float, "classifier-free guidance scale w", low=0),
    "sampling.batch_size": _positive_int("images per sampling batch"),
    "sampling.predictor": Spec(str, "pc: predictor", choices=PREDICTORS),
    "sampling.corrector": Spec(str, "pc: corrector", choices=CORRECTORS),
    "sampling.snr": Spec(float, "pc: corrector signal-to-noise ratio", low=0),
    "sampling.n_corrector": Spec(int, "pc: corrector steps per predictor step", low=0),
    "sampling.rtol": Spec(float, "ode: relative tolerance", low=0, low_open=True),
    "sampling.atol": Spec(float, "ode: absolute tolerance", low=0, low_open=True),
    "sampling.s_churn": Spec(float, "edm_stochastic: S_churn", low=0),
    "sampling.s_min": Spec(float, "edm_stochastic: S_min", low=0),
    "sampling.s_max": Spec(float, "edm_stochastic: S_max", low=0, infinite=True),
    "sampling.s_noise": Spec(float, "edm_stochastic: S_noise", low=0),
}


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """{"section.key": value} of every leaf of `config`."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def spec_of(key: str, default) -> Spec | None:
    """The spec of `key`: its entry in `SPECS`, else a type check derived from its default value (None: no check)."""
    if key in SPECS:
        return SPECS[key]
    kind = type(default)
    return Spec(kind, "no spec yet: type of the default") if kind in (bool, int, float, str, tuple) else None


def keys_without_spec() -> list[str]:
    """The schema's keys missing from `SPECS` (they get only a type check)."""
    return [key for key in flat_keys(default_config()) if key not in SPECS]


def unknown_key_error(key: str) -> ConfigError:
    """The error for a key the schema lacks, naming the closest valid keys (by full name, then by last part)."""
    valid = list(flat_keys(default_config()))
    by_leaf = {}
    for name in valid:
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    for leaf in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=3, cutoff=0.6):
        close += by_leaf[leaf]
    close = list(dict.fromkeys(close))[:3]
    sections = [f"{name}.*" for name, value in default_config().items() if isinstance(value, ml_collections.ConfigDict)]
    top = [name for name in default_config() if f"{name}.*" not in sections]
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys are {', '.join(top + sections)}"
    return ConfigError(f"unknown config key {key!r}; {hint}")


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
    """A locked config from a (saved, JSON-like) nested dict: defaults for absent keys, lists back to tuples.

    Unknown keys are errors, so a file from a different program is not silently misread.
    """
    config = default_config()

    def assign(target: ml_collections.ConfigDict, source: dict, prefix: str) -> None:
        for key, value in source.items():
            if key not in target:
                raise unknown_key_error(f"{prefix}{key}")
            if isinstance(target[key], ml_collections.ConfigDict):
                assign(target[key], value, f"{prefix}{key}.")
            else:
                target[key] = tuple(value) if isinstance(value, list) else value

    assign(config, values, "")
    return config


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check every value against its spec, then the values that must agree; returns `config`.

    Raises ConfigError naming the key, the value and what is allowed.
    """
    defaults = flat_keys(default_config())
    for key, value in flat_keys(config).items():
        if key not in defaults:
            raise unknown_key_error(key)
        spec = spec_of(key, defaults[key])
        if spec is not None and not spec.accepts(value):
            raise ConfigError(f"config {key}={value!r} is not allowed: expected {spec.allowed()} ({spec.meaning})")
    if config.task == "autoencoder":
        _check_autoencoder(config.autoencoder)
        return config
    if config.model.network == "ddpm_unet":
        _check_unet(config)
    else:
        _check_network_section(config.model)
    _check_process(config)
    return config


def _check_autoencoder(ae: ml_collections.ConfigDict) -> None:
    """The autoencoder builds, reconstructs what it encodes and fits its images."""
    try:
        autoencoder_model_config(ae)
    except ValueError as err:
        raise ConfigError(f"config autoencoder: {err}") from None
    if ae.out_channels != ae.in_channels:
        raise ConfigError(f"config autoencoder.out_channels={ae.out_channels} must equal autoencoder.in_channels="
                          f"{ae.in_channels} to train it on reconstructions")  # fmt: skip
    factor = 2 ** (len(ae.block_out_channels) - 1)
    if ae.sample_size % factor:
        raise ConfigError(
            f"config autoencoder.sample_size={ae.sample_size} must be divisible by 2^{len(ae.block_out_channels) - 1} "
            f"(autoencoder.block_out_channels has {len(ae.block_out_channels)} levels, each but the last halving)"
        )


def _check_unet(config: ml_collections.ConfigDict) -> None:
    learned = config.diffusion.var_type in ("learned", "learned_range")
    expected_out = config.model.in_channels * (2 if learned else 1)
    if config.model.out_channels != expected_out:
        raise ConfigError(
            f"config model.out_channels={config.model.out_channels} but var_type="
            f"{config.diffusion.var_type!r} with {config.model.in_channels} input channels needs {expected_out}"
        )
    levels = len(config.model.ch_mult)
    if config.model.image_size % 2 ** (levels - 1):
        raise ConfigError(
            f"config model.image_size={config.model.image_size} must be divisible by 2^{levels - 1} "
            f"(model.ch_mult has {levels} levels, each but the last halving the resolution)"
        )


def _check_network_section(model: ml_collections.ConfigDict) -> None:
    """The NCSN++ / SongUNet section agrees with the model's image size, channels and classes, and builds."""
    if model.network == "ncsnpp":
        if model.num_classes:
            raise ConfigError(f"config model.num_classes={model.num_classes} but model.network='ncsnpp' is "
                              "unconditional; expected 0 or model.network='song_unet'")  # fmt: skip
        pairs = (("ncsnpp.image_size", "image_size"), ("ncsnpp.num_channels", "in_channels"))
    else:
        pairs = (("song_unet.img_resolution", "image_size"), ("song_unet.in_channels", "in_channels"),
                 ("song_unet.out_channels", "in_channels"), ("song_unet.label_dim", "num_classes"))  # fmt: skip
    for own, shared in pairs:
        section, key = own.split(".")
        if model[section][key] != model[shared]:
            raise ConfigError(f"config model.{own}={model[section][key]} must equal model.{shared}={model[shared]}")
    try:
        create_model(model)
    except ValueError as err:
        raise ConfigError(f"config model.{model.network}: {err}") from None


def _check_process(config: ml_collections.ConfigDict) -> None:
    """The loss, network and sampler suit the process; a continuous process's parameters are consistent."""
    dc, sc = config.diffusion, config.sampling
    if dc.process == "discrete":
        if not config.data.centered:
            raise ConfigError("config data.centered=False needs a continuous diffusion.process; the discrete schedule "
                              "models data in [-1, 1]")  # fmt: skip
        if dc.loss_type in CONTINUOUS_LOSSES:
            raise ConfigError(f"config diffusion.loss_type={dc.loss_type!r} needs a continuous diffusion.process "
                              f"(one of {PROCESSES}), got 'discrete'")  # fmt: skip
        if config.model.network != "ddpm_unet":
            raise ConfigError(f"config model.network={config.model.network!r} needs a continuous diffusion.process "
                              f"(one of {PROCESSES}); the discrete schedule runs model.network='ddpm_unet'")  # fmt: skip
        if sc.sampler not in SAMPLERS:
            raise ConfigError(f"config sampling.sampler={sc.sampler!r} needs a continuous diffusion.process; "
                              f"the discrete schedule takes one of {SAMPLERS}")  # fmt: skip
        if sc.steps > dc.num_timesteps:
            raise ConfigError(
                f"config sampling.steps={sc.steps} exceeds diffusion.num_timesteps={dc.num_timesteps}"
            )
        return
    if dc.loss_type not in CONTINUOUS_LOSSES:
        raise ConfigError(f"config diffusion.loss_type={dc.loss_type!r} is a discrete-schedule loss; "
                          f"diffusion.process={dc.process!r} needs one of {CONTINUOUS_LOSSES}")  # fmt: skip
    if sc.sampler not in CONTINUOUS_SAMPLERS:
        raise ConfigError(f"config sampling.sampler={sc.sampler!r} is for the discrete schedule; "
                          f"diffusion.process={dc.process!r} takes one of {CONTINUOUS_SAMPLERS}")  # fmt: skip
    if sc.s_max < sc.s_min:
        raise ConfigError(f"config sampling.s_max={sc.s_max} must be >= sampling.s_min={sc.s_min}")
    try:
        process_from_config(dc)
    except ValueError as err:
        raise ConfigError(f"config diffusion (process {dc.process!r}): {err}") from None
