"""Class-conditional CIFAR-10: the DDPM recipe plus a label embedding trained with 10% null labels.

Label 10 is the null label, so one network also serves classifier-free guidance
(sampling.guidance = 0 samples the plain conditional model).
"""

from jaxdiff.config import default_config


def get_config():
    config = default_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    config.sampling.guidance = 0.0
    return config
