"""score_sde's VE SDE with NCSN++ (continuous) on CIFAR-10 32×32, 62.76M parameters (see `jaxdiff.config.recipes.score_sde`)."""

from jaxdiff.config.recipes import score_sde


def get_config():
    return score_sde("sde_ve_ncsnpp_continuous")
