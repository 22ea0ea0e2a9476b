"""1-Rectified Flow with DDPM++ on CIFAR-10 32×32 (Liu et al. 2022; see `jaxdiff.config.recipes.rectified_flow_cifar10`)."""

from jaxdiff.config.recipes import rectified_flow_cifar10


def get_config():
    return rectified_flow_cifar10()
