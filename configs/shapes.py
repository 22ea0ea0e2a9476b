"""The second stage of the shapes text-to-image demo: latent diffusion with a jointly trained text transformer.

The cross-attention U-Net (widths 32, 64, cross-attention at both levels) denoises the 8×8×4 latents of the
autoencoder trained by `configs/shapes_autoencoder.py` (`--config.latent.autoencoder=PATH` to use another);
a 2-layer CLIP-style text transformer (width 64) learns the captions' 23-token vocabulary with it. Captions
are dropped to the empty prompt 10% of the time, for classifier-free guidance. No random flips: the
captions name left and right. Grids: 50 DDIM steps at guidance 3 on the first 16 training captions.
"""

from jaxdiff.config import default_config


def get_config():
    config = default_config()
    config.task = "latent"
    config.data.dataset = "shapes"
    config.data.random_flip = False
    config.latent.autoencoder = "runs/shapes_autoencoder"
    config.latent.caption_dropout = 0.1
    config.latent.unet.block_out_channels = (32, 64)
    config.latent.unet.norm_num_groups = 16
    config.latent.unet.layers_per_block = 1
    config.latent.unet.attention_levels = (0, 1)
    config.latent.unet.attention_heads = 4
    config.latent.text.vocab_size = 32
    config.latent.text.max_length = 12
    config.latent.text.hidden_size = 64
    config.latent.text.intermediate_size = 128
    config.latent.text.num_hidden_layers = 2
    config.latent.text.num_attention_heads = 4
    config.training.batch_size = 32
    config.training.num_train_steps = 3000
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 200
    config.training.ema_decay = 0.995
    config.training.log_every_steps = 100
    config.training.checkpoint_every_steps = 500
    config.training.keep_checkpoints = 2
    config.training.sample_every_steps = 1000
    config.training.num_sample_images = 16
    config.sampling.sampler = "ddim"
    config.sampling.steps = 50
    config.sampling.guidance = 3.0
    return config
