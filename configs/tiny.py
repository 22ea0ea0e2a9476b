"""A tiny model and run for tests: 16×16×3 synthetic data, ch 32, two levels, a few steps."""

from jaxdiff.config import default_config


def get_config():
    config = default_config()
    config.data.dataset = "synthetic"
    config.model.image_size = 16
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
    config.training.batch_size = 8
    config.training.num_train_steps = 10
    config.training.warmup_steps = 2
    config.training.log_every_steps = 2
    config.training.checkpoint_every_steps = 5
    config.training.keep_checkpoints = 2
    config.training.sample_every_steps = 10
    config.training.num_sample_images = 4
    config.sampling.batch_size = 4
    config.sampling.steps = 10
    return config
