"""DDPM on LSUN Cat 256×256 (Ho et al. 2020, Appendix B; official `scripts/run_lsun.py`).

The 114M-parameter 256×256 U-Net: ch_mult (1, 1, 2, 2, 4, 4), attention at 16×16, no dropout;
Adam lr 2e-5 at batch 64 for 1800k steps; sampling with the posterior variance ("fixedsmall").
Periodic sample grids are kept small: 256×256 sampling with 1000 steps is expensive.
No random flips: the official script's LSUN Cat run passes `--randflip 0` (the paper instead
names LSUN Bedroom as the dataset without flips); we follow the script.
"""

from jaxdiff.config import default_config


def get_config():
    config = default_config()
    config.data.dataset = "lsun_cat256"
    config.data.random_flip = False
    config.model.image_size = 256
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0
    config.diffusion.var_type = "fixedsmall"
    config.training.batch_size = 64
    config.training.learning_rate = 2e-5
    config.training.num_train_steps = 1_800_000
    config.training.num_sample_images = 16
    config.sampling.batch_size = 64
    return config
