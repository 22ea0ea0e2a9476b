"""A small ε-model for the 8×8 single-channel digits (1,797 images), trainable on a CPU in about ten minutes.

Width ch = 32 (not 64) keeps a batch-128 training step near 0.3 s on a 2-core CPU. Digits are not
mirror-symmetric, so random flips are off. Intervals are scaled down to the short run.
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
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (4,)
    config.training.batch_size = 128
    config.training.num_train_steps = 2000
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 100
    config.training.ema_decay = 0.999
    config.training.log_every_steps = 50
    config.training.checkpoint_every_steps = 500
    config.training.keep_checkpoints = 2
    config.training.sample_every_steps = 1000
    config.training.num_sample_images = 64
    config.sampling.batch_size = 64
    return config
