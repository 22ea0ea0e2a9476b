"""The first stage of the shapes text-to-image demo: a KL autoencoder, 32×32×3 images -> 8×8×4 latents.

Three levels (widths 32, 64, 64; two stride-2 downsamplings), L1 reconstruction with KL weight 1e-6, no
discriminator. No random flips: the captions name left and right. The latent scaling factor is saved
with every checkpoint (`jaxdiff.training.checkpoint.read_extras`).

Chosen for what the latent stage makes of it, not for its own reconstruction error: a narrower autoencoder
(widths 16, 32, 32; 1,500 steps at lr 2e-3) reconstructs held-out images as well in less time (L1 0.047),
but the latent model trained on it follows prompts far worse (shape 66%, size 77% at guidance 3, against
84% and 97% on this one). At lr 2e-3 this width drifts in colour (71% of reconstructions keep their colour),
so it trains at 1e-3 for 1,000 steps (BUILD_NOTES.md has the runs).
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
    config.training.num_train_steps = 1000
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 100
    config.training.ema_decay = 0.99
    config.training.log_every_steps = 50
    config.training.checkpoint_every_steps = 500
    config.training.keep_checkpoints = 2
    config.training.sample_every_steps = 500
    config.training.num_sample_images = 16
    return config
