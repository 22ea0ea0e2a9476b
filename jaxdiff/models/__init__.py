"""Denoising networks: the DDPM U-Net, its building blocks, and size/cost summaries."""

from jaxdiff.models.layers import timestep_embedding
from jaxdiff.models.summary import count_parameters, model_summary
from jaxdiff.models.unet import UNet, create_model

__all__ = ["UNet", "count_parameters", "create_model", "model_summary", "timestep_embedding"]
