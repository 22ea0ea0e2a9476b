"""What each config key accepts: `Spec`, the `SPECS` table, and the lookups on the schema's flat key names
(`flat_keys`, `spec_of`, `keys_without_spec`, `unknown_key_error`) that raise or build `ConfigError`."""

from __future__ import annotations

import dataclasses
import difflib

import ml_collections

from jaxdiff.checks import Spec
from jaxdiff.config.defaults import DATASETS, LORA_BASE_DTYPES, RECONSTRUCTION_LOSSES, TASKS, default_config
from jaxdiff.diffusion.continuous import CONTINUOUS_LOSSES, FLOW_LOSSES, PARAMETERIZATIONS
from jaxdiff.diffusion.flow import MODE_SCALE_MAX, PARAMETERIZATIONS as FLOW_PARAMETERIZATIONS, T_SAMPLINGS
from jaxdiff.diffusion.losses import FLOW_WEIGHTINGS
from jaxdiff.diffusion import LOSS_TYPES, MEAN_TYPES, VAR_TYPES
from jaxdiff.errors import ConfigError
from jaxdiff.models.networks import NETWORKS
from jaxdiff.models import dit, ncsnpp, song_unet
from jaxdiff.models.autoencoder import COMPUTE_DTYPES as AUTOENCODER_DTYPES
from jaxdiff.models.unet import DTYPES
from jaxdiff.processes import PROCESSES
from jaxdiff.samplers import CONTINUOUS_SAMPLERS, SAMPLERS, SPACINGS
from jaxdiff.samplers.registry import config_options, flow_config_options
from jaxdiff.schedule import ADM_SPACING, BETA_SCHEDULES


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
    "data.latent_cache": Spec(str, "class_latent: a latent cache folder (jaxdiff data encode) read instead of images"),
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
    "model.network": Spec(str, "the network: ddpm_unet (the keys above), ncsnpp, song_unet or dit (their sections)",
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
    "model.dit.input_size": _positive_int("DiT: height = width of its input (latent), a multiple of patch_size"),
    "model.dit.patch_size": _positive_int("DiT: side of the square patches"),
    "model.dit.in_channels": _positive_int("DiT: input channels"),
    "model.dit.hidden_size": _positive_int("DiT: token width, divisible by 4 and by num_heads"),
    "model.dit.depth": _positive_int("DiT: transformer blocks"),
    "model.dit.num_heads": _positive_int("DiT: attention heads"),
    "model.dit.mlp_ratio": Spec(float, "DiT: MLP width / hidden_size", low=0, low_open=True),
    "model.dit.num_classes": Spec(int, "DiT: classes (= model.num_classes); 0: unconditional", low=0),
    "model.dit.class_dropout_prob": _fraction("DiT: rate of training on the null class; > 0 adds its table row"),
    "model.dit.learn_sigma": Spec(bool, "DiT: also predict the variance (2·in_channels output weights)"),
    "model.dit.output_sigma": Spec(bool, "DiT: output the σ channels (False: SiT's forward, which drops them)"),
    "model.dit.per_block_embedders": Spec(bool, "DiT: each block has its own timestep + label embedder (diffusers)"),
    "model.dit.freq_shift": Spec(int, "DiT: timestep frequencies exp(-i·ln(10000) / (128 - freq_shift))", low=0,
                                 high=127),  # fmt: skip
    "model.dit.mlp_norm_eps": Spec(float, "DiT: epsilon of the layer norm before the MLP", low=0, low_open=True),
    "model.dit.dtype": Spec(str, "DiT: compute dtype (parameters stay float32)", choices=dit.COMPUTE_DTYPES),
    "model.dit.remat": Spec(bool, "DiT: recompute each block's activations in the backward pass"),
    "model.dit.attention": Spec(str, "DiT: attention kernel (cudnn: GPU flash attention, bfloat16)",
                                choices=dit.ATTENTION_IMPLEMENTATIONS),  # fmt: skip
    "diffusion.schedule": Spec(str, "beta schedule", choices=tuple(BETA_SCHEDULES)),
    "diffusion.num_timesteps": Spec(int, "T, the number of diffusion steps", low=2),
    "diffusion.beta_start": Spec(float, "beta of the first step (linear-like schedules)", low=0, high=1, low_open=True),
    "diffusion.beta_end": Spec(float, "beta of the last step (linear-like schedules)", low=0, high=1, low_open=True),
    "diffusion.mean_type": Spec(str, "what the model predicts", choices=MEAN_TYPES),
    "diffusion.var_type": Spec(str, "reverse-process variance", choices=VAR_TYPES),
    "diffusion.loss_type": Spec(str, "training loss (dsm, edm: continuous processes; flow_matching: flow, gvp)",
                                choices=LOSS_TYPES + CONTINUOUS_LOSSES + FLOW_LOSSES),  # fmt: skip
    "diffusion.hybrid_lambda": Spec(float, "weight of the variational bound in the hybrid loss", low=0),
    "diffusion.min_snr_gamma": Spec(float, "min-SNR-γ loss weighting; 0: off", low=0),
    "diffusion.process": Spec(str, "noise process: the discrete schedule or a continuous one",
                              choices=("discrete",) + PROCESSES),  # fmt: skip
    "diffusion.sigma_min": Spec(float, "ve/edm: smallest noise level; 0: the process's default", low=0),
    "diffusion.sigma_max": Spec(float, "ve/edm: largest noise level; 0: the process's default", low=0),
    "diffusion.beta_min": Spec(float, "vp/subvp: β(0)", low=0),
    "diffusion.beta_max": Spec(float, "vp/subvp: β(1)", low=0, low_open=True),
    "diffusion.parameterization": Spec(str, "continuous processes: what the network predicts (eps, score, edm; "
                                       "flow/gvp: velocity, x0, eps, v)",
                                       choices=tuple(dict.fromkeys(PARAMETERIZATIONS + FLOW_PARAMETERIZATIONS))),
    "diffusion.sigma_data": Spec(float, "edm: the data's standard deviation", low=0, low_open=True),
    "diffusion.t_eps": Spec(float, "dsm: smallest training time t", low=0, high=0.1, low_open=True, high_open=True),
    "diffusion.reduce_mean": Spec(bool, "dsm/edm: average each example's squared errors instead of summing"),
    "diffusion.likelihood_weighting": Spec(bool, "dsm: score_sde's likelihood weighting g(t)²"),
    "diffusion.p_mean": Spec(float, "edm: mean of ln σ in training"),
    "diffusion.p_std": Spec(float, "edm: standard deviation of ln σ in training", low=0, low_open=True),
    "diffusion.time_scale": Spec(float, "flow/gvp: the network's time input is t·time_scale", low=0, low_open=True),
    "diffusion.time_reversed": Spec(bool, "flow/gvp: the network sees (1 − t)·time_scale and predicts the velocity "
                                          "in that time (SiT's: t = 0 noise, 1 data)"),
    "diffusion.t_sampling": Spec(str, "flow_matching: distribution of the training t", choices=T_SAMPLINGS),
    "diffusion.logit_mean": Spec(float, "flow_matching, logit_normal: mean m of logit t"),
    "diffusion.logit_std": Spec(float, "flow_matching, logit_normal: standard deviation s of logit t", low=0,
                                low_open=True),  # fmt: skip
    "diffusion.mode_scale": Spec(float, "flow_matching, mode: SD3's scale", low=-1, high=MODE_SCALE_MAX),
    "diffusion.train_t_max": Spec(float, "flow_matching: the drawn training t mapped onto [0, train_t_max]", low=0,
                                  high=1, low_open=True),  # fmt: skip
    "diffusion.shift": Spec(float, "flow_matching: shift s of the training t, s·t/(1 + (s − 1)·t); 1: none", low=0,
                            low_open=True),  # fmt: skip
    "diffusion.loss_weighting": Spec(str, "flow_matching: per-example weight", choices=FLOW_WEIGHTINGS),
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
    "training.lora.rank": Spec(int, "latent.unet_init / flow.pretrained: rank of the LoRA adapters of its frozen "
                                    "network; 0: off", low=0),  # fmt: skip
    "training.lora.alpha": Spec(float, "LoRA: adapters scaled by alpha / rank; 0: alpha = rank", low=0),
    "training.lora.target_modules": Spec(str, "LoRA: comma-separated suffixes of the diffusers names of the U-Net "
                                              "modules adapted (peft's target_modules)"),  # fmt: skip
    "training.lora.base_dtype": Spec(str, "LoRA: storage dtype of the frozen U-Net", choices=LORA_BASE_DTYPES),
    "training.prior_preservation.class_data_dir": Spec(str, "latent: folder of class images for DreamBooth's "
                                                       "prior preservation (missing ones generated); '': off"),
    "training.prior_preservation.class_prompt": Spec(str, "prior preservation: the prompt of generated class images"),
    "training.prior_preservation.num_class_images": _positive_int("prior preservation: class images used"),
    "training.prior_preservation.weight": Spec(float, "prior preservation: weight of the class images' loss", low=0),
    "flow.pretrained": Spec(str, "flow_lora: the SD3 / Flux diffusers folder whose frozen transformer gets adapters"),
    "flow.t_sampling": Spec(str, "flow_lora: distribution of the training t", choices=T_SAMPLINGS),
    "flow.logit_mean": Spec(float, "flow_lora, logit_normal: mean m of logit t"),
    "flow.logit_std": Spec(float, "flow_lora, logit_normal: standard deviation s of logit t", low=0, low_open=True),
    "flow.mode_scale": Spec(float, "flow_lora, mode: SD3's scale", low=-1, high=MODE_SCALE_MAX),
    "flow.shift": Spec(float, "flow_lora: shift of the training t; 0: the folder scheduler's", low=0),
    "flow.weighting": Spec(str, "flow_lora: loss weight of diffusers' compute_loss_weighting_for_sd3",
                           choices=("none", "sigma_sqrt", "cosmap")),  # fmt: skip
    "flow.guidance": Spec(float, "flow_lora: embedded guidance scale of a guidance-distilled Flux in training", low=0),
    "flow.caption_dropout": _fraction("flow_lora: probability of the empty prompt in training", high_open=False),
    "flow.max_sequence_length": Spec(int, "flow_lora: T5 tokens per caption (2..512); 0: SD3 77, Flux 512", low=0,
                                     high=512),  # fmt: skip
    "sampling.sampler": Spec(str, "sampler", choices=tuple(dict.fromkeys(SAMPLERS + CONTINUOUS_SAMPLERS))),
    "sampling.steps": Spec(int, "sampling steps; 0: all T (discrete) or the sampler's default (continuous)", low=0),
    "sampling.spacing": Spec(str, "timestep spacing; '': the sampler's default", choices=("", *SPACINGS, ADM_SPACING)),
    "sampling.clip_denoised": Spec(bool, "clip each predicted x_0 to [-1, 1]"),
    "sampling.guidance": Spec(float, "classifier-free guidance scale w", low=0),
    "sampling.guidance_channels": Spec(int, "guide only the first N output channels (DiT's sample.py: 3); 0: all",
                                       low=0),  # fmt: skip
    "sampling.batch_size": _positive_int("images per sampling batch"),
    # The samplers' options, from the sampler registry: "<the samplers that take it>: <meaning>".
    **{f"sampling.{name}": dataclasses.replace(spec, meaning=f"{', '.join(users)}: {spec.meaning}")
       for name, (_, spec, users) in config_options().items()},  # fmt: skip
    **{f"sampling.{name}": dataclasses.replace(spec, meaning=f"flow processes, {', '.join(users)}: {spec.meaning}")
       for name, (_, spec, users) in flow_config_options().items()},  # fmt: skip
    "sampling.guidance_t_min": _fraction("flow processes: guidance only where t >= this", high_open=False),
    "sampling.guidance_t_max": _fraction("flow processes: guidance only where t <= this", high_open=False),
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
