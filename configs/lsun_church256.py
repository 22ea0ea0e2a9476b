"""DDPM on LSUN Church 256×256 (the published 256×256 recipe: see `jaxdiff.config.recipes.ddpm256`)."""

from jaxdiff.config.recipes import ddpm256


def get_config():
    return ddpm256("lsun_church256")
