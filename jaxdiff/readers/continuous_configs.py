"""What a score_sde / EDM / ScoreSdeVePipeline reader returned -> a validated jaxdiff config and its params.

The readers give (network name, network section, params, process info). The config starts from the recipe
of that network and process (`jaxdiff.config.recipes`): its training and sampling settings are kept, while the
network section, image size, channels, classes and the process parameters come from what was read.
A recipe the caller names must have the same network, network section and parameterisation; any
difference is an error naming the keys.

jaxdiff models see data in [-1, 1] unless `data.centered` is False ([0, 1]). score_sde's VE models were
trained on data y in [0, 1], fed 2y − 1 to the network, labelled by σ and return σ·score. In jaxdiff's
x = 2y − 1 every noise level doubles (σ = 2s) and D(x; σ) = 2·D_y((x + 1)/2; σ/2) − 1 = x + σ·net(x, σ/2):
the "score" parameterisation of a network whose label is halved. A Fourier embedding of log(σ/2) is a fixed
rotation of each sin/cos pair of the embedding of log σ, so the halving is folded into the first embedding
layer's kernel, exactly, and the model stays centred. A network fed the [0, 1] data itself (diffusers'
ScoreSdeVePipeline) has no such form: it becomes a model of uncentred data (`data.centered` False) with
the scheduler's σ range as it is.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np

from jaxdiff.config.specs import ConfigError, flat_keys
from jaxdiff.config.validation import validate
from jaxdiff.readers import score_sde_checkpoint
from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.processes import make_process
from jaxdiff.config.recipes import RECIPES, recipe

# jaxdiff's score_sde recipes and the score_sde config each reproduces ("sde_vp_ddpmpp_continuous" ->
# "vp/ddpmpp_continuous").
SCORE_SDE_RECIPES = {
    name: name.removeprefix("sde_").replace("_", "/", 1) for name in RECIPES if name.startswith("sde_")
}
# The recipe each (network, process) starts from when none is named.
BASE_RECIPES = {
    ("ncsnpp", "vp"): "sde_vp_ddpmpp_continuous",
    ("ncsnpp", "subvp"): "sde_subvp_ddpmpp_deep_continuous",
    ("ncsnpp", "ve"): "sde_ve_ncsnpp_continuous",
}
# EDM's released CIFAR-10 recipes by (class-conditional, Fourier embedding = NCSN++ architecture).
EDM_RECIPES = {
    (False, False): "edm_cifar10_uncond_vp", (True, False): "edm_cifar10_cond_vp",
    (False, True): "edm_cifar10_uncond_ve", (True, True): "edm_cifar10_cond_ve",
}  # fmt: skip
EDM_SIGMA_RANGE = (0.002, 80.0)  # EDM's sampling range, narrowed to what the preconditioning supports
VP_LABEL_SCALE = 999  # jaxdiff's continuous ε-models see labels t·999
VE_T_MIN = make_process("ve").t_min  # where jaxdiff's VE samplers stop: score_sde's and diffusers' sampling_eps


def score_sde_config_name(dataset: str | None) -> tuple[str, str | None]:
    """(score_sde config name, jaxdiff recipe named or None) of `dataset`: a score_sde config name such as
    "vp/ddpmpp_continuous" or a jaxdiff recipe that reproduces one, such as "sde_vp_ddpmpp_continuous"."""
    if dataset in SCORE_SDE_RECIPES:
        return SCORE_SDE_RECIPES[dataset], dataset
    if dataset in score_sde_checkpoint.CONFIGS:
        return dataset, None
    raise WeightsError(
        f"dataset={dataset!r}: a score_sde checkpoint needs the config it was trained with (`jaxdiff convert "
        f"--dataset NAME`, `jaxdiff sample --pretrained PATH --config NAME`, `Pipeline.from_pretrained(path, "
        f"config=NAME)`), one of score_sde's {sorted(score_sde_checkpoint.CONFIGS)} or of jaxdiff's recipes "
        f"{sorted(SCORE_SDE_RECIPES)}"
    )


def score_sde_recipe(config_name: str) -> str | None:
    """The jaxdiff recipe reproducing score_sde's config `config_name`, or None."""
    return next((name for name, theirs in SCORE_SDE_RECIPES.items() if theirs == config_name), None)


def check_recipe_name(name: str | None) -> None:
    """None or a jaxdiff recipe name; ValueError naming the recipes otherwise."""
    if name is not None and name not in RECIPES:
        raise UsageError(f"dataset={name!r} is not a jaxdiff recipe; expected one of {RECIPES}")


def _refuse(source: str, differences: dict) -> None:
    if differences:
        listed = "; ".join(f"{key}: {value}" for key, value in differences.items())
        raise ConfigError(f"{source}: cannot be a jaxdiff model: {listed}")


def _ncsnpp_process(info: dict, network: ml_collections.ConfigDict, source: str) -> tuple[dict, bool]:
    """(the diffusion keys, data.centered) of score_sde's process info; raises naming what jaxdiff cannot
    express."""
    process = info["process"]
    if process in ("vp", "subvp"):
        expected = (("parameterization", "eps"), ("data_range", (-1.0, 1.0)), ("network_input", "x"),
                    ("scale_by_sigma", False))  # fmt: skip
        differences = {key: f"{info[key]!r}, expected {want!r}" for key, want in expected if info[key] != want}
        # score_sde labels its discrete-time VP models t·(N − 1), the continuous ones t·999: the same for N = 1000.
        step_labels = info["noise_labels"] == "step" and info["num_scales"] == VP_LABEL_SCALE + 1
        if info["noise_labels"] != "999t" and not step_labels:
            differences["noise_labels"] = (f"{info['noise_labels']!r} with num_scales {info['num_scales']}, expected "
                                           f"labels t·{VP_LABEL_SCALE}")  # fmt: skip
        _refuse(source, differences)
        diffusion = dict(process=process, parameterization="eps", beta_min=info["beta_min"], beta_max=info["beta_max"])
        return diffusion, True
    expected = (("parameterization", "score"), ("noise_labels", "sigma"), ("scale_by_sigma", True),
                ("data_range", (0.0, 1.0)))  # fmt: skip
    differences = {key: f"{info[key]!r}, expected {want!r}" for key, want in expected if info[key] != want}
    if info["network_input"] not in ("2x-1", "x"):
        differences["network_input"] = f"{info['network_input']!r}, expected '2x-1' or 'x'"
    centered = info["network_input"] == "2x-1"
    if centered and network.conditional and network.embedding_type != "fourier":
        differences["model.ncsnpp.embedding_type"] = f"{network.embedding_type!r}, expected 'fourier'"
    if info.get("sampling_eps", VE_T_MIN) != VE_T_MIN:
        differences["sampling_eps"] = f"{info['sampling_eps']!r}, expected {VE_T_MIN} (the VE process's t_min)"
    _refuse(source, differences)
    scale = 2 if centered else 1  # noise levels of x = 2y − 1, or of y itself
    return dict(process="ve", parameterization="score", sigma_min=scale * info["sigma_min"],
                sigma_max=scale * info["sigma_max"]), centered  # fmt: skip


def halve_fourier_labels(params: dict) -> dict:
    """NCSN++ params that, given label σ, compute what `params` compute for label σ/2.

    The embedding [sin θ, cos θ], θ = 2π·W·log σ, feeds temb_dense0 (kernel rows: sin part, then cos part).
    With φ = 2π·W·log 2, sin(θ − φ) = sin θ cos φ − cos θ sin φ and cos(θ − φ) = cos θ cos φ + sin θ sin φ,
    so the rows become cos φ·K_sin + sin φ·K_cos and −sin φ·K_sin + cos φ·K_cos (computed in float64).
    """
    w = np.asarray(params["fourier_embedding"]["W"], np.float64)
    phase = 2 * np.pi * w * math.log(2.0)
    cos, sin = np.cos(phase)[:, None], np.sin(phase)[:, None]
    kernel = np.asarray(params["temb_dense0"]["kernel"], np.float64)
    k_sin, k_cos = kernel[: w.size], kernel[w.size :]
    rotated = np.concatenate([cos * k_sin + sin * k_cos, -sin * k_sin + cos * k_cos]).astype(np.float32)
    return {**params, "temb_dense0": {**params["temb_dense0"], "kernel": rotated}}


def _read_keys(network_name: str, network: ml_collections.ConfigDict, info: dict, source: str) -> tuple[str, dict]:
    """(base recipe, {config key: value}) of what was read."""
    if network_name == "ncsnpp":
        diffusion, centered = _ncsnpp_process(info, network, source)
        model = dict(network="ncsnpp", ncsnpp=network, image_size=network.image_size,
                     in_channels=network.num_channels, out_channels=network.num_channels, num_classes=0)  # fmt: skip
        keys = dict(data=dict(centered=centered), model=model, diffusion=diffusion)
        if "sampling" in info:  # a ScoreSdeVePipeline scheduler's predictor-corrector loop
            keys["sampling"] = info["sampling"]
        return BASE_RECIPES["ncsnpp", diffusion["process"]], keys
    if network_name == "song_unet":
        if info["parameterization"] != "edm_precond":
            _refuse(source, {"diffusion.parameterization": f"EDM's {info['parameterization']!r} preconditioning; "
                             "jaxdiff runs EDM networks with EDMPrecond ('edm') only"})  # fmt: skip
        sigma_min = max(EDM_SIGMA_RANGE[0], info["sigma_min"])
        sigma_max = min(EDM_SIGMA_RANGE[1], info["sigma_max"])
        diffusion = dict(process="edm", parameterization="edm", sigma_data=info["sigma_data"], sigma_min=sigma_min,
                         sigma_max=sigma_max)  # fmt: skip
        model = dict(network="song_unet", song_unet=network, image_size=network.img_resolution,
                     in_channels=network.in_channels, out_channels=network.out_channels, num_classes=network.label_dim)
        base = EDM_RECIPES[network.label_dim > 0, network.embedding_type == "fourier"]
        return base, dict(data=dict(centered=True), model=model, diffusion=diffusion)
    raise WeightsError(f"{source}: network {network_name!r} has no jaxdiff config; expected 'ncsnpp' or 'song_unet'")


def _structure(config: ml_collections.ConfigDict) -> dict:
    """The keys a named recipe must share with converted weights: network, its section, data shape, parameterisation."""
    section = f"model.{config.model.network}."
    shared = ("model.network", "model.image_size", "model.in_channels", "model.num_classes", "diffusion.process",
              "diffusion.parameterization")  # fmt: skip
    return {k: v for k, v in flat_keys(config).items() if k in shared or k.startswith(section)}


def continuous_config(
    network_name: str, network: ml_collections.ConfigDict, params: dict, info: dict, *, source: str,
    recipe_name: str | None = None, base_recipe: str | None = None,
) -> tuple[ml_collections.ConfigDict, dict]:  # fmt: skip
    """(validated config, params) of a reader's output (see the module docstring).

    `recipe_name`: a recipe the weights must fit (error naming every differing key); `base_recipe`: the
    recipe to start from without that check (default: the one of the network and process read).
    `source` names the weights in errors.
    """
    check_recipe_name(recipe_name)
    base, keys = _read_keys(network_name, network, info, source)
    config = recipe(recipe_name or base_recipe or base)
    for section, values in keys.items():
        for key, value in values.items():
            config[section][key] = ml_collections.ConfigDict(dict(value)) if key == network_name else value
    if recipe_name is not None:
        read, wanted = _structure(config), _structure(recipe(recipe_name))
        differing = {k: f"read {read.get(k)!r}, recipe {wanted.get(k)!r}" for k in sorted(read.keys() | wanted.keys())
                     if read.get(k) != wanted.get(k)}  # fmt: skip
        if differing:
            listed = "; ".join(f"{key} {value}" for key, value in differing.items())
            raise ConfigError(f"{source} does not fit recipe {recipe_name!r}: {listed}")
    if network_name == "ncsnpp" and info["process"] == "ve" and config.data.centered and network.conditional:
        params = halve_fourier_labels(params)
    return validate(config), params
