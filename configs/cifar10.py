"""DDPM on CIFAR-10 32×32 (Ho et al. 2020): the official recipe, which is exactly the schema's defaults."""

from jaxdiff.config.recipes import cifar10


def get_config():
    return cifar10()
