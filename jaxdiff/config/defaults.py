"""The schema's keys and their defaults: `default_config()` (the DDPM CIFAR-10 recipe, locked) and the names
`data.dataset`, `task` and `training.lora.base_dtype` may take (`DATASETS`, `TASKS`, `LORA_BASE_DTYPES`)."""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxdiff.models import dit, ncsnpp, song_unet
from jaxdiff.samplers.registry import config_options, flow_config_options

# The autoencoder's loss settings (config.autoencoder_loss; see jaxdiff.training.autoencoder_step).
RECONSTRUCTION_LOSSES = ("l1", "l2")
LOSS_DEFAULTS: dict[str, Any] = {
    "reconstruction_loss": "l1",
    "kl_weight": 1e-6,
    "disc_weight": 0.0,  # 0: no discriminator
    "disc_start": 0,  # first step with the discriminator terms
    "disc_layers": 3,  # stride-2 convolutions of the PatchGAN
    "disc_channels": 64,  # width of its first convolution
}

DATASETS = (
    "cifar10", "celebahq256", "lsun_church256", "lsun_bedroom256", "lsun_cat256", "digits", "shapes", "synthetic",
    "folder", "class_folder",
)  # fmt: skip
TASKS = ("diffusion", "autoencoder", "latent", "class_latent", "flow_lora")
LORA_BASE_DTYPES = ("float32", "bfloat16")  # training.lora.base_dtype


def default_config() -> ml_collections.ConfigDict:
    """The DDPM CIFAR-10 recipe (Ho et al. 2020, official code), locked: values may change, keys may not."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "diffusion"  # diffusion | autoencoder | latent | class_latent | flow_lora (training.tasks)

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "cifar10"
    c.data.split = "train"
    c.data.data_dir = ""  # TFDS data_dir; "" means TFDS' default (~/tensorflow_datasets)
    c.data.random_flip = True
    c.data.centered = True  # model data in [-1, 1]; False: [0, 1] (score_sde's data.centered), continuous only
    c.data.latent_cache = ""  # task class_latent: a folder `jaxdiff data encode` wrote, read instead of the images

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
    c.model.dit = dit.default_config()  # DiT / SiT (models/dit.py); presets: dit.preset_config("B/4")

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
    c.diffusion.process = "discrete"  # discrete: the β schedule above; ve | vp | subvp | edm; flow | gvp (flow matching)
    c.diffusion.sigma_min = 0.0  # ve/edm; 0: the process's default (ve 0.01, edm 0.002)
    c.diffusion.sigma_max = 0.0  # ve/edm; 0: the process's default (ve 50, edm 80)
    c.diffusion.beta_min = 0.1  # vp/subvp
    c.diffusion.beta_max = 20.0  # vp/subvp
    # continuous: eps (labels t·999) | score (labels σ) | edm (c_noise); flow/gvp: velocity | x0 | eps | v
    c.diffusion.parameterization = "eps"
    c.diffusion.sigma_data = 0.5  # EDM preconditioning and loss
    c.diffusion.t_eps = 1e-5  # dsm: t ~ U[t_eps, t_max]
    c.diffusion.reduce_mean = False  # dsm/edm: mean over each example's dimensions instead of the sum
    c.diffusion.likelihood_weighting = False  # dsm: weight g(t)² (score_sde's likelihood weighting)
    c.diffusion.p_mean = -1.2  # edm: ln σ ~ N(p_mean, p_std²)
    c.diffusion.p_std = 1.2
    # Flow matching (process flow | gvp, loss_type flow_matching; jaxdiff.diffusion.flow).
    c.diffusion.time_scale = 1000.0  # flow/gvp: the network's time input is t·time_scale (SiT 1, SD3/Flux 1000)
    c.diffusion.time_reversed = False  # flow/gvp: the network runs in SiT's time 1 − t (0 noise), velocity negated
    c.diffusion.t_sampling = "uniform"  # flow_matching: training t uniform | logit_normal | mode (SD3's)
    c.diffusion.logit_mean = 0.0  # logit_normal: t = sigmoid(logit_mean + logit_std·n)
    c.diffusion.logit_std = 1.0
    c.diffusion.mode_scale = 1.29  # mode: SD3's scale, in [-1, 2/(π − 2)]
    c.diffusion.shift = 1.0  # flow_matching: training t shifted to s·t/(1 + (s − 1)·t); 1: none
    c.diffusion.train_t_max = 1.0  # flow_matching: training t mapped onto [0, train_t_max] (RectifiedFlow: 0.999)
    c.diffusion.loss_weighting = "none"  # flow_matching: none | edm (EDM's λ(σ/α) with sigma_data)

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
    # task "autoencoder": its loss (jaxdiff.training.autoencoder_step).
    c.autoencoder_loss = ml_collections.ConfigDict(dict(LOSS_DEFAULTS))
    # task "latent": text-conditioned diffusion on the latents of a frozen autoencoder (jaxdiff.training.tasks.latent).
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
    # task "latent" with latent.unet_init: LoRA adapters of that U-Net trained, the U-Net frozen (training.latent_step).
    c.training.lora = ml_collections.ConfigDict()
    c.training.lora.rank = 0  # r of each adapter; 0: no adapters, every U-Net weight is trained
    c.training.lora.alpha = 0.0  # adapters added as (alpha / r)·up @ down; 0: alpha = r
    c.training.lora.target_modules = "to_q,to_k,to_v,to_out.0"  # comma-separated suffixes of diffusers module names
    c.training.lora.base_dtype = "float32"  # storage dtype of the frozen U-Net: float32 | bfloat16
    # task "latent": DreamBooth's prior preservation (jaxdiff.data.prior); class_data_dir "": off.
    c.training.prior_preservation = ml_collections.ConfigDict()
    c.training.prior_preservation.class_data_dir = ""  # captioned folder of class images (missing ones generated)
    c.training.prior_preservation.class_prompt = ""  # the prompt class images are generated from
    c.training.prior_preservation.num_class_images = 100  # class images used (the first in sorted file order)
    c.training.prior_preservation.weight = 1.0  # loss = instance mse + weight·class mse

    # task "flow_lora": LoRA adapters of an SD3 / Flux folder's frozen transformer (training.tasks.flow_lora).
    c.flow = ml_collections.ConfigDict()
    c.flow.pretrained = ""  # an SD3 / SD3.5 or Flux.1 diffusers folder (transformer, text encoders, VAE, scheduler)
    c.flow.t_sampling = "logit_normal"  # training t: uniform | logit_normal | mode (diffusers' weighting_scheme)
    c.flow.logit_mean = 0.0  # logit_normal: t = sigmoid(logit_mean + logit_std·n)
    c.flow.logit_std = 1.0
    c.flow.mode_scale = 1.29  # mode: SD3's scale
    c.flow.shift = 0.0  # training t shifted to s·t/(1 + (s − 1)·t); 0: the folder scheduler's (1 if dynamic)
    c.flow.weighting = "none"  # loss weight: none | sigma_sqrt | cosmap (diffusers' compute_loss_weighting_for_sd3)
    c.flow.guidance = 3.5  # guidance-distilled Flux (dev): the embedded guidance scale in training
    c.flow.caption_dropout = 0.0  # probability of training on the empty prompt
    c.flow.max_sequence_length = 0  # T5 tokens per caption; 0: the scripts' defaults (SD3 77, Flux 512)

    c.sampling = ml_collections.ConfigDict()
    c.sampling.sampler = "ddpm"
    c.sampling.steps = 0  # 0: all T steps
    c.sampling.spacing = ""  # "": the sampler's default (uniform for ddpm/ddim, karras for the ODE solvers)
    c.sampling.clip_denoised = True
    c.sampling.guidance = 0.0
    c.sampling.guidance_channels = 0  # guide only the first N output channels (DiT's sample.py: 3); 0: all
    c.sampling.batch_size = 256
    # The samplers' options with their defaults, from the sampler registry: eta (ddim); predictor, corrector, snr,
    # n_corrector (pc); rtol, atol (ode); s_churn, s_min, s_max, s_noise (edm_stochastic).
    for name, (default, _, _) in config_options().items():
        c.sampling[name] = default
    # Flow processes: the flow samplers' options (shift; diffusion_form, diffusion_norm, last_step, last_step_size of
    # euler_maruyama), and classifier-free guidance applied only where t in [guidance_t_min, guidance_t_max].
    for name, (default, _, _) in flow_config_options().items():
        c.sampling[name] = default
    c.sampling.guidance_t_min = 0.0
    c.sampling.guidance_t_max = 1.0
    c.lock()
    return c
