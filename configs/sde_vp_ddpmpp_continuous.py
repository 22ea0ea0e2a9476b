"""score_sde's VP SDE with DDPM++ (continuous) on CIFAR-10 32×32, 61.80M parameters (see `jaxdiff.config.recipes.score_sde`)."""

from jaxdiff.config.recipes import score_sde


def get_config():
    return score_sde("sde_vp_ddpmpp_continuous")
