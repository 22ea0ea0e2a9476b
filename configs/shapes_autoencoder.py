"""The first stage of the shapes text-to-image demo: a small KL autoencoder, 32×32×3 images -> 8×8×4 latents.

Three levels (widths 16, 32, 32; two stride-2 downsamplings), L1 reconstruction with KL weight 1e-6, no
discriminator. No random flips: the captions name left and right. The latent scaling factor is saved
with every checkpoint (`jaxdiff.checkpoint.read_extras`).

Sized for the README demo (this stage within 5 minutes on a 2-core CPU) by measurement: after 500 steps,
widths (32, 64, 64) at batch 16 and (32, 32, 32) at batch 32 reconstructed held-out images no better than
these (L1 ≈ 0.10 for all), and batch 32 beat batch 16 at equal steps, so the time goes to steps at batch 32.
Learning rate 2e-3 reached held-out L1 0.074 / 0.047 after 1,000 / 1,500 steps (1e-3: 0.082 / 0.060);
the whole run took 233 s on the 2-core CPU (load ≈ 2).
"""

from jaxdiff.config import default_config


def get_config():
    config = default_config()
    config.task = "autoencoder"
    config.data.dataset = "shapes"
    config.data.random_flip = False
    config.autoencoder.block_out_channels = (16, 32, 32)
    config.autoencoder.layers_per_block = 1
    config.autoencoder.latent_channels = 4
    config.autoencoder.norm_num_groups = 16
    config.autoencoder.sample_size = 32
    config.autoencoder_loss.reconstruction_loss = "l1"
    config.autoencoder_loss.kl_weight = 1e-6
    config.training.batch_size = 32
    config.training.num_train_steps = 1500
    config.training.learning_rate = 2e-3
    config.training.warmup_steps = 100
    config.training.ema_decay = 0.99
    config.training.log_every_steps = 50
    config.training.checkpoint_every_steps = 500
    config.training.keep_checkpoints = 2
    config.training.sample_every_steps = 500
    config.training.num_sample_images = 16
    return config
