"""EDM on CIFAR-10 32×32, unconditional, NCSN++ SongUNet (56.40M parameters) (see `jaxdiff.config.recipes.edm_cifar10`)."""

from jaxdiff.config.recipes import edm_cifar10


def get_config():
    return edm_cifar10("edm_cifar10_uncond_ve")
