"""The embedded default: the offline 8×8 digits demo (see `jaxdiff.recipes.digits`)."""

from jaxdiff.recipes import digits


def get_config():
    return digits()
