"""Class-conditional CIFAR-10 for classifier-free guidance: the DDPM recipe plus labels (10 = null, dropped 10%)."""

from jaxdiff.config.recipes import cifar10_cond


def get_config():
    return cifar10_cond()
