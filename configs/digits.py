"""The embedded default: the offline 8×8 digits demo (see `jaxdiff.config.recipes.digits`)."""

from jaxdiff.config.recipes import digits


def get_config():
    return digits()
