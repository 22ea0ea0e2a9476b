"""`DecodingAutoencoder`: the autoencoder a pixel-family model draws the latents of (DiT, in the Stable Diffusion VAE's
latent space), held by `jaxdiff.sampling.pipeline.Pipeline` to turn its samples into images.

Latents are NHWC in the model's scale z = (vae_latent − shift_factor)·scaling_factor (`decode_latents`), the
factors those of the autoencoder's config; images come out NHWC in [0, 1], clipped as diffusers' pipelines do.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from jaxdiff.errors import WeightsError
from jaxdiff.latent.pipeline import decode_latents, to_pixels
from jaxdiff.models.autoencoder import create_autoencoder

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class DecodingAutoencoder:
    """A diffusers `AutoencoderKL`: `config` as `jaxdiff.latent.component_weights.read_autoencoder` reads it
    (with its scaling_factor and shift_factor), `params` its float32 parameters (NumPy or device arrays)."""

    config: ml_collections.ConfigDict
    params: dict

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel along each side: 2^(levels − 1)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(H, W, C) of the images decoded from latents of shape (h, w, latent_channels)."""
        height, width, _ = latent_shape
        return (height * self.factor, width * self.factor, self.config.out_channels)

    def check_latents(self, latent_shape: tuple[int, int, int], source: str) -> None:
        """A WeightsError unless the model's latents (h, w, C) have this autoencoder's channels."""
        if latent_shape[-1] != self.latent_channels:
            raise WeightsError(f"{source}: the model draws latents of {latent_shape[-1]} channels, but the autoencoder "
                               f"has latent_channels={self.latent_channels}")  # fmt: skip

    def decode(self, params, latents: Array) -> Array:
        """Latents [B, h, w, C] in the model's scale -> float32 images [B, H, W, C_out] in [0, 1] (pure: jit it)."""
        return to_pixels(decode_latents(create_autoencoder(self.config), self.config, params, latents))
