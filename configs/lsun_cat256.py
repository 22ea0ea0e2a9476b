"""DDPM on LSUN Cat 256×256 (the published 256×256 recipe: see `jaxdiff.config.recipes.ddpm256`)."""

from jaxdiff.config.recipes import ddpm256


def get_config():
    return ddpm256("lsun_cat256")
