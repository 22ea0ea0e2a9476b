"""score_sde's sub-VP SDE with deep DDPM++ (continuous) on CIFAR-10 32×32, 106.63M parameters (see `jaxdiff.config.recipes.score_sde`)."""

from jaxdiff.config.recipes import score_sde


def get_config():
    return score_sde("sde_subvp_ddpmpp_deep_continuous")
