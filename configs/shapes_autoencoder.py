"""The first stage of the shapes text-to-image demo: a small KL autoencoder, 32×32×3 images -> 8×8×4 latents.

Three levels (widths 32, 64, 64; two stride-2 downsamplings), L1 reconstruction with KL weight 1e-6, no
discriminator. No random flips: the captions name left and right. The latent scaling factor is saved
with every checkpoint (`jaxdiff.checkpoint.read_extras`).
"""

from jaxdiff.config import default_config


def get_config():
    config = default_config()
    config.task = "autoencoder"
    config.data.dataset = "shapes"
    config.data.random_flip = False
    config.autoencoder.block_out_channels = (32, 64, 64)
    config.autoencoder.layers_per_block = 1
    config.autoencoder.latent_channels = 4
    config.autoencoder.norm_num_groups = 32
    config.autoencoder.sample_size = 32
    config.autoencoder_loss.reconstruction_loss = "l1"
    config.autoencoder_loss.kl_weight = 1e-6
    config.training.batch_size = 32
    config.training.num_train_steps = 1500
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 100
    config.training.ema_decay = 0.99
    config.training.log_every_steps = 50
    config.training.checkpoint_every_steps = 500
    config.training.keep_checkpoints = 2
    config.training.sample_every_steps = 500
    config.training.num_sample_images = 16
    return config
