"""SiT-XL/2 on ImageNet 256×256 (Ma et al. 2024): DiT-XL/2's network (its σ channels computed and dropped) on
32×32×4 SD-VAE latents, 1000 classes, on the linear interpolant with velocity prediction in SiT's time, sampled by
SiT's Euler–Maruyama SDE sampler in 250 steps with guidance w = 0.5 (cfg scale 1.5) on the first 3 latent
channels: the setting of the paper's FID 2.06.

A model config, not a training recipe: jaxdiff has no class-conditional latent-space ImageNet training (its latent
task trains text-conditioned U-Nets; ImageNet is not among its datasets). Use it for `jaxdiff info --config
configs/sit_xl2_imagenet256.py`; to sample, load SiT's released `SiT-XL-2-256x256.pt` with `Pipeline.from_pretrained`.
"""

from jaxdiff.models import dit
from jaxdiff.readers.dit_checkpoint import dit_model_config, sit_run_config

PAPER_GUIDANCE = 0.5  # cfg scale 1.5 = 1 + w (the paper's FID 2.06)


def get_config():
    config = sit_run_config(dit_model_config(dit.preset_config("XL/2", output_sigma=False)))
    config.sampling.guidance = PAPER_GUIDANCE
    return config
