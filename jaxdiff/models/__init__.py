"""Denoising networks: the DDPM U-Net, score_sde's NCSN++/DDPM++, EDM's SongUNet, and size/cost summaries."""

from jaxdiff.models.layers import timestep_embedding
from jaxdiff.models.networks import NETWORKS, create_model, example_inputs
from jaxdiff.models.summary import count_parameters, model_summary
from jaxdiff.models.unet import UNet

__all__ = [
    "NETWORKS", "UNet", "count_parameters", "create_model", "example_inputs", "model_summary", "timestep_embedding"
]  # fmt: skip
