"""DiT-XL/2 on ImageNet 256×256 (Peebles & Xie 2023): the network on 32×32×4 SD-VAE latents, 1000 classes, learned σ,
with DiT's diffusion and sampling (250 respaced DDPM steps, guidance w = 0.5, i.e. cfg scale 1.5, on the first 3
latent channels): the setting of the paper's FID 2.27. 675M parameters, 118.6 G multiply-adds per forward.

A model config, not a training recipe: jaxdiff has no class-conditional latent-space ImageNet training (its latent
task trains text-conditioned U-Nets; ImageNet is not among its datasets). Use it for `jaxdiff info --config
configs/dit_xl2_imagenet256.py`; to sample, load DiT's released `DiT-XL-2-256x256.pt` or diffusers' `facebook/DiT-XL-2-256`
folder with `Pipeline.from_pretrained`, which reads their settings from the files.
"""

from jaxdiff.families.discrete import ADM_SPACING
from jaxdiff.models import dit
from jaxdiff.readers.dit_checkpoint import DIT_GUIDANCE_CHANNELS, DIT_SAMPLING_STEPS, dit_model_config, dit_run_config

PAPER_GUIDANCE = 0.5  # cfg scale 1.5 = 1 + w (the paper's FID 2.27)


def get_config():
    config = dit_run_config(dit_model_config(dit.preset_config("XL/2")), guidance_channels=DIT_GUIDANCE_CHANNELS)
    config.sampling.spacing, config.sampling.steps = ADM_SPACING, DIT_SAMPLING_STEPS
    config.sampling.guidance = PAPER_GUIDANCE
    return config
