"""EDM on the 8×8 digits, a CPU demo (see `jaxdiff.config.recipes.digits_edm`)."""

from jaxdiff.config.recipes import digits_edm


def get_config():
    return digits_edm()
