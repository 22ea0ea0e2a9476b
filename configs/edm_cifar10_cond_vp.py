"""EDM on CIFAR-10 32×32, class-conditional, DDPM++ SongUNet (see `jaxdiff.config.recipes.edm_cifar10`)."""

from jaxdiff.config.recipes import edm_cifar10


def get_config():
    return edm_cifar10("edm_cifar10_cond_vp")
