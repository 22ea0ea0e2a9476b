"""The published training recipes as configs: DDPM (Ho et al. 2020, Appendix B, and the official scripts),
score SDEs (Song et al. 2021, score_sde's `configs/`), EDM (Karras et al. 2022, its `train.py`) and rectified flow
(Liu et al. 2022, its `configs/rectified_flow/`) on CIFAR-10, and the offline digits demos.

The files in `configs/` select these; conversion of released checkpoints picks the recipe of the
matching released model, so the recipes live in the package, not only in the repository.
"""

from __future__ import annotations

import math

import ml_collections

from jaxdiff.config.defaults import default_config
from jaxdiff.errors import ConfigError
from jaxdiff.models import dit, ncsnpp, song_unet

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
        raise ConfigError(f"no 256×256 recipe for dataset {dataset!r}; expected one of {sorted(_256_RUNS)}")
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
    no dropout (the run is far too short to overfit); 1,100 steps at learning rate 2e-3 after 50 warm-up steps
    (quality ratio 0.93, where 1,800 steps at 1e-3 gave 0.99 and 800 at 3e-3 0.90); EMA decay 0.993 (after
    1,100 steps the initial weights weigh 0.993^1100 ≈ 4e-4 in the EMA, which starts as a copy of them).
    Digits are not mirror-symmetric, so random flips are off. `benchmarks/digits_quality.py` measures the result.
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
    config.training.num_train_steps = 1100
    config.training.learning_rate = 2e-3
    config.training.warmup_steps = 50
    config.training.ema_decay = 0.993
    config.training.log_every_steps = 50
    config.training.checkpoint_every_steps = 1100
    config.training.keep_checkpoints = 2
    config.training.sample_every_steps = 1100
    config.training.num_sample_images = 64
    config.sampling.batch_size = 64
    return config


# score_sde's CIFAR-10 continuous-time runs: recipe name -> (process, network variant, training steps).
_SCORE_SDE_RUNS = {
    "sde_vp_ddpmpp_continuous": ("vp", "ddpmpp", 1_300_000),
    "sde_subvp_ddpmpp_deep_continuous": ("subvp", "ddpmpp_deep", 950_000),
    "sde_ve_ncsnpp_continuous": ("ve", "ncsnpp", 1_300_000),
    "sde_ve_ncsnpp_deep_continuous": ("ve", "ncsnpp_deep", 950_000),
}


def score_sde(name: str) -> ml_collections.ConfigDict:
    """A score_sde CIFAR-10 continuous-time run (`configs/{vp,subvp,ve}/cifar10_*_continuous.py`).

    NCSN++/DDPM++ (`model.network="ncsnpp"`), continuous denoising score matching with t ~ U[1e-5, 1],
    batch 128, Adam lr 2e-4 with 5,000 warm-up steps, gradient clip 1, dropout 0.1, random flips.
    VP/sub-VP: an ε-model (labels t·999) with per-dimension mean losses (`reduce_mean`), EMA 0.9999,
    Euler–Maruyama sampling. VE: a score model (labels σ, output / σ) with summed losses, EMA 0.999,
    reverse-diffusion predictor + Langevin corrector (snr 0.16, one step). 1,000 sampling steps, no
    clipping of x̂_0. Data are in [-1, 1] here; score_sde's VE runs used [0, 1] (σ_max 50 is far above
    either range's diameter, as the VE prior needs).
    """
    if name not in _SCORE_SDE_RUNS:
        raise ConfigError(f"no score_sde recipe {name!r}; expected one of {sorted(_SCORE_SDE_RUNS)}")
    process, variant, steps = _SCORE_SDE_RUNS[name]
    config = default_config()
    config.model.network = "ncsnpp"
    config.model.ncsnpp = ncsnpp.cifar10_config(variant)
    config.diffusion.process = process
    config.diffusion.loss_type = "dsm"
    config.diffusion.t_eps = 1e-5
    config.diffusion.parameterization = "score" if process == "ve" else "eps"
    config.diffusion.reduce_mean = process != "ve"
    config.training.num_train_steps = steps
    config.training.ema_decay = 0.999 if process == "ve" else 0.9999
    if process == "ve":
        config.sampling.sampler = "pc"
        config.sampling.predictor, config.sampling.corrector = "reverse_diffusion", "langevin"
        config.sampling.snr, config.sampling.n_corrector = 0.16, 1
    else:
        config.sampling.sampler = "euler_maruyama"
    config.sampling.clip_denoised = False
    return config


# EDM's CIFAR-10 runs: recipe name -> (SongUNet variant, class-conditional).
_EDM_RUNS = {
    "edm_cifar10_uncond_vp": ("ddpmpp", False),
    "edm_cifar10_cond_vp": ("ddpmpp", True),
    "edm_cifar10_uncond_ve": ("ncsnpp", False),
    "edm_cifar10_cond_ve": ("ncsnpp", True),
}
EDM_BATCH = 512
EDM_EMA_HALF_LIFE_IMAGES = 500_000


def edm_cifar10(name: str) -> ml_collections.ConfigDict:
    """An EDM CIFAR-10 run (`train.py --arch=ddpmpp|ncsnpp [--cond=1]`, config F; "vp"/"ve" in the names of
    EDM's released models mean the DDPM++ / NCSN++ architecture, both with EDM's preconditioning).

    SongUNet (`model.network="song_unet"`), the EDM process (σ in [0.002, 80]) and loss (ln σ ~ N(−1.2, 1.2²),
    σ_data 0.5), batch 512, Adam lr 1e-3 (β 0.9/0.999, ε 1e-8, no gradient clipping) ramped up over 10 Mimg
    (19,531 steps), 200 Mimg (390,625 steps), dropout 0.13, no dataset flips (EDM's `--xflip` default).
    EMA: EDM's half-life of 0.5 Mimg as a decay per step at batch 512, 0.5^(512/500,000) = 0.999290
    (EDM also shortens the half-life during its first 10% of images; a fixed decay does not).
    Not reproduced: EDM's non-leaking augmentation (probability 0.12, `augment_dim` 9), so its networks
    here have no augmentation labels. Sampling: Heun, 18 steps (35 evaluations), no clipping.
    """
    if name not in _EDM_RUNS:
        raise ConfigError(f"no EDM recipe {name!r}; expected one of {sorted(_EDM_RUNS)}")
    variant, conditional = _EDM_RUNS[name]
    config = default_config()
    config.data.random_flip = False
    config.model.network = "song_unet"
    config.model.num_classes = 10 if conditional else 0
    config.model.song_unet = song_unet.cifar10_config(variant, label_dim=config.model.num_classes)
    config.diffusion.process = "edm"
    config.diffusion.loss_type = "edm"
    config.diffusion.parameterization = "edm"
    config.training.batch_size = EDM_BATCH
    config.training.num_train_steps = 200_000_000 // EDM_BATCH
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 10_000_000 // EDM_BATCH
    config.training.grad_clip_norm = 0.0
    config.training.ema_decay = math.pow(0.5, EDM_BATCH / EDM_EMA_HALF_LIFE_IMAGES)
    config.sampling.sampler = "heun"
    config.sampling.steps = 18
    config.sampling.clip_denoised = False
    return config


def digits_edm() -> ml_collections.ConfigDict:
    """EDM on the 8×8 digits, on a CPU in minutes: a small SongUNet (32 channels, levels 8 and 4 pixels,
    one block each, attention at 4), the EDM process, loss and preconditioning, Heun sampling (18 steps).
    Run settings (batch, steps, learning rate, EMA) as the `digits` DDPM demo."""
    config = digits()
    config.model.network = "song_unet"
    config.model.song_unet.update(
        img_resolution=8, in_channels=1, out_channels=1, model_channels=32, channel_mult=(1, 2), num_blocks=1,
        attn_resolutions=(4,), dropout=0.0,
    )  # fmt: skip
    config.diffusion.process = "edm"
    config.diffusion.loss_type = "edm"
    config.diffusion.parameterization = "edm"
    config.sampling.sampler = "heun"
    config.sampling.steps = 18
    config.sampling.clip_denoised = False
    return config


def digits_flow() -> ml_collections.ConfigDict:
    """Flow matching with a small class-conditional DiT on the 8×8 digits, on a CPU in minutes.

    The linear interpolant (process `flow`, x_t = (1 − t)·x_0 + t·ε) with velocity prediction and per-dimension
    mean losses, t ~ U[0, 1), the network at t·1000 (the frequency embedding's usual range). The DiT: patch 2 (16
    tokens of the 8×8×1 digits), width 64, depth 4, 4 heads, no σ channels, 10 classes and the null class,
    dropping labels at 10% itself (its class_dropout_prob; training.label_dropout stays 0) for classifier-free
    guidance. Width 64 rather than 96–128: a batch-128 step costs ~2.5× less (the step time is what bounds a
    CPU run), and 4 blocks at 64 already give recognisable digits of the requested class. Run settings as the
    `digits` DDPM demo (batch 128, 50 warm-up steps, EMA 0.993, no flips) but 1,000 steps at learning rate 1e-3,
    a usual rate for a small transformer under Adam. Sampling: Euler, 32 steps (32 network calls, on a doubled
    batch with guidance), from N(0, I) at t = 1; x̂_0 is not clipped (the images are clipped to [-1, 1] at the end).
    `benchmarks/digits_flow.py` measures how often the samples are digits of the requested class.
    """
    config = digits()
    config.model.network = "dit"
    config.model.num_classes = 10
    config.model.dit = dit.preset_config(
        "S/2", input_size=8, in_channels=1, num_classes=10, hidden_size=64, depth=4, num_heads=4,
        class_dropout_prob=0.1, learn_sigma=False,
    )  # fmt: skip
    config.diffusion.process = "flow"
    config.diffusion.loss_type = "flow_matching"
    config.diffusion.parameterization = "velocity"
    config.diffusion.reduce_mean = True
    config.training.num_train_steps = 1000
    config.training.learning_rate = 1e-3
    config.training.checkpoint_every_steps = 1000
    config.training.sample_every_steps = 1000
    config.sampling.sampler = "euler"
    config.sampling.steps = 32
    config.sampling.clip_denoised = False
    return config


# Liu et al. 2022 ("Flow Straight and Fast"), gnobitab/RectifiedFlow configs/rectified_flow/cifar10_rf_gaussian_ddpmpp.py
RF_TRAIN_STEPS = 1_300_000  # default_cifar10_configs.py: n_iters 1300001
RF_EMA_DECAY = 0.999999
RF_DROPOUT = 0.15
RF_TRAIN_T_MAX = 0.999  # their training τ = 1 − t ~ U[eps, 1], sde.eps = 1e-3
RF_TIME_SCALE = 999.0  # the network sees labels τ·999, τ = 1 − t (their `model_fn(perturbed_data, t*999)`)


def rectified_flow_cifar10() -> ml_collections.ConfigDict:
    """1-Rectified Flow on CIFAR-10 (Liu et al. 2022, `cifar10_rf_gaussian_ddpmpp.py`): score_sde's DDPM++
    (`model.network="ncsnpp"`, `ncsnpp.cifar10_config("ddpmpp")`) with dropout 0.15, on the linear interpolant
    (process `flow`). RectifiedFlow runs in the time τ = 1 − t (τ = 0 noise, 1 data): its network sees τ·999 and
    predicts dx/dτ = x_0 − ε, here `time_reversed` with time_scale 999 and velocity prediction. Per-dimension mean
    squared loss (`reduce_mean`), uniform t; batch 128, Adam lr 2e-4 (β 0.9/0.999, ε 1e-8, no weight decay) with
    5,000 linear warm-up steps, gradient clip 1, EMA 0.999999, 1.3M steps, random flips, data in [-1, 1].
    Sampling: their RK45 (scipy `solve_ivp`, rtol = atol = 1e-5) from τ = 1e-3 to 1 is the `ode` sampler with the
    same tolerances (pass `solver="dopri5"` for RK45's Dormand–Prince pair; the default is Tsit5) from the flow
    process's t_max = 0.999 (their eps 1e-3) to t_min = 0.001, then x̂_0 = x_t − t·u there; no clipping.
    Published (Table 1): FID 2.58, IS 9.60, 127 evaluations with RK45.
    Their training τ ~ U[1e-3, 1] is t ~ U[0, 0.999] here (`diffusion.train_t_max`).
    """
    config = default_config()
    config.model.network = "ncsnpp"
    config.model.ncsnpp = ncsnpp.cifar10_config("ddpmpp")
    config.model.ncsnpp.dropout = RF_DROPOUT
    config.diffusion.process = "flow"
    config.diffusion.loss_type = "flow_matching"
    config.diffusion.parameterization = "velocity"
    config.diffusion.time_scale = RF_TIME_SCALE
    config.diffusion.time_reversed = True
    config.diffusion.t_sampling = "uniform"
    config.diffusion.train_t_max = RF_TRAIN_T_MAX
    config.diffusion.reduce_mean = True
    config.training.num_train_steps = RF_TRAIN_STEPS
    config.training.ema_decay = RF_EMA_DECAY
    config.sampling.sampler = "ode"
    config.sampling.rtol = config.sampling.atol = 1e-5
    config.sampling.clip_denoised = False
    return config


def flow_lora(family: str) -> ml_collections.ConfigDict:
    """DreamBooth LoRA of an SD3 ("sd3") or Flux.1 [dev] ("flux") folder as diffusers' READMEs run
    train_dreambooth_lora_sd3.py / train_dreambooth_lora_flux.py (task `flow_lora`; `configs/sd3_lora.py`,
    `configs/flux_lora.py`): rank 4 adapters of to_k, to_q, to_v, to_out.0, Adam at 1e-4, constant rate without
    warm-up, gradient norm clipped to 1, batch 1, 500 steps, t logit-normal(0, 1) with weight 1
    (--weighting_scheme=logit_normal), no EMA (the scripts keep none), the frozen transformer in bfloat16
    (--mixed_precision=bf16); SD3 at 1024×1024 with 77 T5 tokens, Flux at 512×512 with 512 T5 tokens and the
    embedded guidance 1 in training (--guidance_scale=1). flow.pretrained and data.data_dir (a captioned image
    folder) are left to give."""
    c = default_config()
    c.task = "flow_lora"
    c.data.dataset, c.data.random_flip = "folder", False
    c.model.image_size = {"sd3": 1024, "flux": 512}[family]  # --resolution
    c.flow.t_sampling, c.flow.weighting = "logit_normal", "none"
    c.flow.max_sequence_length = {"sd3": 77, "flux": 512}[family]
    if family == "flux":
        c.flow.guidance = 1.0
    t = c.training
    t.batch_size, t.num_train_steps, t.learning_rate, t.warmup_steps = 1, 500, 1e-4, 0
    t.grad_clip_norm, t.ema_decay = 1.0, 0.0
    t.lora.rank, t.lora.alpha, t.lora.target_modules = 4, 4.0, "to_k,to_q,to_v,to_out.0"
    t.lora.base_dtype = "bfloat16"
    t.log_every_steps, t.checkpoint_every_steps, t.sample_every_steps, t.num_sample_images = 10, 100, 500, 4
    c.sampling.steps, c.sampling.guidance = 28, {"sd3": 7.0, "flux": 3.5}[family]
    return c


RELEASED = ("cifar10", "celebahq256", "lsun_church256", "lsun_bedroom256", "lsun_cat256")
RECIPES = ("cifar10", "cifar10_cond", *_256_RUNS, "digits", *_SCORE_SDE_RUNS, *_EDM_RUNS, "digits_edm", "digits_flow",
           "rectified_flow_cifar10")


def recipe(name: str) -> ml_collections.ConfigDict:
    """The config of a recipe by name (`RECIPES`)."""
    if name == "cifar10":
        return cifar10()
    if name == "cifar10_cond":
        return cifar10_cond()
    if name in _256_RUNS:
        return ddpm256(name)
    if name == "digits":
        return digits()
    if name in _SCORE_SDE_RUNS:
        return score_sde(name)
    if name in _EDM_RUNS:
        return edm_cifar10(name)
    if name == "digits_edm":
        return digits_edm()
    if name == "digits_flow":
        return digits_flow()
    if name == "rectified_flow_cifar10":
        return rectified_flow_cifar10()
    raise ConfigError(f"no recipe named {name!r}; expected one of {RECIPES}")
