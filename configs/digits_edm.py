"""EDM on the 8×8 digits, a CPU demo (see `jaxdiff.recipes.digits_edm`)."""

from jaxdiff.recipes import digits_edm


def get_config():
    return digits_edm()
