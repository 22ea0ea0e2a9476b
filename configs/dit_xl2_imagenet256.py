"""DiT-XL/2 on ImageNet 256×256 (Peebles & Xie 2023), a training recipe: the network on 32×32×4 SD-VAE latents,
1000 classes, learned σ, with DiT's diffusion and sampling (250 respaced DDPM steps, guidance w = 0.5, i.e. cfg
scale 1.5, on the first 3 latent channels): the sampling of the paper's FID 2.27. 675M parameters, 118.6 G
multiply-adds per forward.

Trained as DiT's `train.py` (`jaxdiff.training.tasks.class_latent.imagenet_training`): ImageNet's train folder read
as torchvision's ImageFolder, ADM's centre crop to 256, random flips, latents drawn from the VAE posterior × 0.18215,
labels dropped to the null class 1000 at 10%, the hybrid loss (MSE on ε + the bound for σ), AdamW lr 1e-4 without
weight decay, batch 256, EMA 0.9999, 400K steps (the paper's FID-2.27 model: 7M, --config.training.num_train_steps=
7000000). Give the two paths:

    jaxdiff train --config configs/dit_xl2_imagenet256.py --workdir runs/dit_xl2 \
        --config.data.data_dir=/path/to/imagenet/train --config.latent.autoencoder=/path/to/sd-vae-ft-ema

(or encode once, `jaxdiff data encode --config ... --out DIR`, and train with --config.data.latent_cache=DIR).
`jaxdiff info --config configs/dit_xl2_imagenet256.py` counts the network; DiT's released `DiT-XL-2-256x256.pt` or
diffusers' `facebook/DiT-XL-2-256` folder load with `Pipeline.from_pretrained`, which reads their settings from the
files.
"""

from jaxdiff.schedule import ADM_SPACING
from jaxdiff.models import dit
from jaxdiff.readers.dit_checkpoint import DIT_GUIDANCE_CHANNELS, DIT_SAMPLING_STEPS, dit_model_config, dit_run_config
from jaxdiff.training.tasks.class_latent import imagenet_training

PAPER_GUIDANCE = 0.5  # cfg scale 1.5 = 1 + w (the paper's FID 2.27)


def get_config():
    config = dit_run_config(dit_model_config(dit.preset_config("XL/2")), guidance_channels=DIT_GUIDANCE_CHANNELS)
    config.sampling.spacing, config.sampling.steps = ADM_SPACING, DIT_SAMPLING_STEPS
    config.sampling.guidance = PAPER_GUIDANCE
    return imagenet_training(config)
