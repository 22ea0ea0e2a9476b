"""The published DDPM training recipes (Ho et al. 2020, Appendix B, and the official scripts) as configs,
and the offline digits demo.

The files in `configs/` select these; conversion of released checkpoints picks the recipe of the
matching released model, so the recipes live in the package, not only in the repository.
"""

from __future__ import annotations

import ml_collections

from jaxdiff.config import default_config

# dataset: (training steps of the paper, random horizontal flips)
_256_RUNS = {
    "celebahq256": (500_000, True),
    "lsun_church256": (1_200_000, True),
    "lsun_bedroom256": (2_400_000, True),
    # The official script's LSUN Cat run passes `--randflip 0` (the paper names Bedroom instead); the code wins.
    "lsun_cat256": (1_800_000, False),
}


def cifar10() -> ml_collections.ConfigDict:
    """CIFAR-10 32×32, 35.7M parameters: the schema's defaults are exactly this recipe."""
    return default_config()


def cifar10_cond() -> ml_collections.ConfigDict:
    """CIFAR-10 with a label embedding trained with 10% null labels (label 10), for classifier-free guidance."""
    config = default_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    return config


def ddpm256(dataset: str) -> ml_collections.ConfigDict:
    """The 114M-parameter 256×256 recipe: ch_mult (1, 1, 2, 2, 4, 4), attention at 16×16, no dropout,
    Adam lr 2e-5 at batch 64, sampling with the posterior variance ("fixedsmall"). Periodic sample
    grids are kept small: 256×256 sampling with 1000 steps is expensive."""
    if dataset not in _256_RUNS:
        raise ValueError(f"no 256×256 recipe for dataset {dataset!r}; expected one of {sorted(_256_RUNS)}")
    steps, flip = _256_RUNS[dataset]
    config = default_config()
    config.data.dataset = dataset
    config.data.random_flip = flip
    config.model.image_size = 256
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0
    config.diffusion.var_type = "fixedsmall"
    config.training.batch_size = 64
    config.training.learning_rate = 2e-5
    config.training.num_train_steps = steps
    config.training.num_sample_images = 16
    config.sampling.batch_size = 64
    return config


def digits() -> ml_collections.ConfigDict:
    """The embedded default: a small ε-model for the 8×8 single-channel digits (1,797 images), on a CPU in minutes.

    DDPM (ε-prediction, T = 1000, ancestral sampling) at the native 8×8 resolution. Choices for a short CPU run:
    width ch = 32 with one ResBlock per level (a batch-128 step ≈ 0.15 s on 2 cores); the cosine schedule
    (improved DDPM), which spends fewer steps on near-pure noise than the linear one at this tiny resolution;
    no dropout (the run is far too short to overfit); EMA decay 0.996 (after 1,800 steps the initial weights
    weigh 0.996^1800 ≈ 7e-4 in the EMA, which starts as a copy of them). Digits are not mirror-symmetric, so
    random flips are off. `benchmarks/digits_quality.py` measures the result.
    """
    config = default_config()
    config.data.dataset = "digits"
    config.data.random_flip = False
    config.model.image_size = 8
    config.model.in_channels = 1
    config.model.out_channels = 1
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.diffusion.schedule = "cosine"
    config.training.batch_size = 128
    config.training.num_train_steps = 1800
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 100
    config.training.ema_decay = 0.996
    config.training.log_every_steps = 50
    config.training.checkpoint_every_steps = 1800
    config.training.keep_checkpoints = 2
    config.training.sample_every_steps = 1800
    config.training.num_sample_images = 64
    config.sampling.batch_size = 64
    return config


RELEASED = ("cifar10", "celebahq256", "lsun_church256", "lsun_bedroom256", "lsun_cat256")
RECIPES = ("cifar10", "cifar10_cond", *_256_RUNS, "digits")


def recipe(name: str) -> ml_collections.ConfigDict:
    """The config of a recipe by name (`cifar10`, `cifar10_cond`, a 256×256 dataset, or `digits`)."""
    if name == "cifar10":
        return cifar10()
    if name == "cifar10_cond":
        return cifar10_cond()
    if name in _256_RUNS:
        return ddpm256(name)
    if name == "digits":
        return digits()
    raise ValueError(f"no recipe named {name!r}; expected one of {RECIPES}")
