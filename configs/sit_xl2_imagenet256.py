"""SiT-XL/2 on ImageNet 256×256 (Ma et al. 2024), a training recipe: DiT-XL/2's network (its σ channels computed
and dropped) on 32×32×4 SD-VAE latents, 1000 classes, on the linear interpolant with velocity prediction in SiT's
time, sampled by SiT's Euler–Maruyama SDE sampler in 250 steps with guidance w = 0.5 (cfg scale 1.5) on the first 3
latent channels: the sampling of the paper's FID 2.06.

Trained as SiT's `train.py` (`jaxdiff.training.tasks.class_latent.imagenet_training`): DiT's data, latents and
optimizer (ImageFolder classes, ADM's centre crop, flips, posterior draws × 0.18215, AdamW lr 1e-4 without weight
decay, batch 256, EMA 0.9999, 400K steps), flow matching with uniform t and per-dimension mean losses (SiT's
mean_flat), labels dropped to the null class by the network itself (class_dropout_prob 0.1). Give the two paths:

    jaxdiff train --config configs/sit_xl2_imagenet256.py --workdir runs/sit_xl2 \
        --config.data.data_dir=/path/to/imagenet/train --config.latent.autoencoder=/path/to/sd-vae-ft-ema

`jaxdiff info --config configs/sit_xl2_imagenet256.py` counts the network; SiT's released `SiT-XL-2-256x256.pt`
loads with `Pipeline.from_pretrained`.
"""

from jaxdiff.models import dit
from jaxdiff.readers.dit_checkpoint import dit_model_config, sit_run_config
from jaxdiff.training.tasks.class_latent import imagenet_training

PAPER_GUIDANCE = 0.5  # cfg scale 1.5 = 1 + w (the paper's FID 2.06)


def get_config():
    config = sit_run_config(dit_model_config(dit.preset_config("XL/2", output_sigma=False)))
    config.sampling.guidance = PAPER_GUIDANCE
    config.diffusion.reduce_mean = True  # SiT's loss: mean_flat of the squared velocity error
    return imagenet_training(config)
