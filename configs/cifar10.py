"""DDPM on CIFAR-10 32×32 (Ho et al. 2020): the official recipe, which is exactly the schema's defaults."""

from jaxdiff.config import default_config


def get_config():
    return default_config()
