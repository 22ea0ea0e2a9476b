"""The embedded default: a small ε-model for the 8×8 single-channel digits (1,797 images), on a CPU in minutes.

DDPM (ε-prediction, T = 1000, ancestral sampling) at the native 8×8 resolution. Choices for a short CPU run:
width ch = 32 with one ResBlock per level (a batch-128 step ≈ 0.15 s on 2 cores); the cosine schedule
(improved DDPM), which spends fewer steps on near-pure noise than the linear one at this tiny resolution;
no dropout (the run is far too short to overfit); EMA decay 0.996 (after 1,800 steps the initial weights
weigh 0.996^1800 ≈ 7e-4 in the EMA, which starts as a copy of them). Digits are not mirror-symmetric, so
random flips are off. `benchmarks/digits_quality.py` measures the result.
"""

from jaxdiff.config import default_config


def get_config():
    config = default_config()
    config.data.dataset = "digits"
    config.data.random_flip = False
    config.model.image_size = 8
    config.model.in_channels = 1
    config.model.out_channels = 1
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.diffusion.schedule = "cosine"
    config.training.batch_size = 128
    config.training.num_train_steps = 1800
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 100
    config.training.ema_decay = 0.996
    config.training.log_every_steps = 50
    config.training.checkpoint_every_steps = 1800
    config.training.keep_checkpoints = 2
    config.training.sample_every_steps = 1800
    config.training.num_sample_images = 64
    config.sampling.batch_size = 64
    return config
