"""Flow matching with a small class-conditional DiT on the 8×8 digits, a CPU demo (see
`jaxdiff.config.recipes.digits_flow`)."""

from jaxdiff.config.recipes import digits_flow


def get_config():
    return digits_flow()
