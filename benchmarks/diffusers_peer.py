"""The diffusers peer of `vs_diffusers.py`: the DDPM U-Net as a diffusers `UNet2DModel` and jaxdiff's training
step written in PyTorch. Imported only by the PyTorch worker, so that a jaxdiff worker needs no PyTorch."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from diffusers import UNet2DModel

from jaxdiff.models.unet import level_resolutions
from jaxdiff.schedule import schedule_from_config


def diffusers_unet(model_config) -> UNet2DModel:
    """`UNet2DModel` with the DDPM architecture of `model_config` (unconditional, convolutional resampling)."""
    if model_config.num_classes or not model_config.resamp_with_conv:
        raise ValueError(
            f"the peer supports unconditional models with resamp_with_conv=True, got num_classes="
            f"{model_config.num_classes}, resamp_with_conv={model_config.resamp_with_conv}"
        )
    resolutions = level_resolutions(model_config.image_size, len(model_config.ch_mult))
    attention = [res in model_config.attn_resolutions for res in resolutions]
    return UNet2DModel(
        sample_size=model_config.image_size,
        in_channels=model_config.in_channels,
        out_channels=model_config.out_channels,
        block_out_channels=tuple(model_config.ch * mult for mult in model_config.ch_mult),
        layers_per_block=model_config.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=None,  # one head over all channels, as in DDPM
        norm_eps=1e-6,
        dropout=model_config.dropout,
        downsample_padding=0,  # TF "SAME" for stride 2: pad 0 before, 1 after
        flip_sin_to_cos=False,
        freq_shift=1,  # sinusoid frequencies exp(-i·ln(10000) / (half - 1)), as DDPM
    )


class TorchTrainer:
    """The jaxdiff training step in PyTorch: flip, q_sample, ε-MSE, clip_grad_norm_, Adam, EMA."""

    def __init__(self, model: UNet2DModel, config, alphas_cumprod: np.ndarray):
        training = config.training
        self.model = model
        self.ema = [p.detach().clone() for p in model.parameters()]
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=training.learning_rate, betas=(training.adam_b1, training.adam_b2),
            eps=training.adam_eps, foreach=True,
        )  # fmt: skip
        self.clip, self.decay = training.grad_clip_norm, training.ema_decay
        self.random_flip = config.data.random_flip
        self.alphas_cumprod = torch.tensor(alphas_cumprod, dtype=torch.float32)
        self.generator = torch.Generator().manual_seed(0)

    def step(self, images: torch.Tensor) -> float:
        """One update on uint8 images NCHW; returns the loss."""
        self.model.train()
        x_start = images.float() / 127.5 - 1.0
        batch = x_start.shape[0]
        if self.random_flip:
            flip = torch.rand(batch, 1, 1, 1, generator=self.generator) < 0.5
            x_start = torch.where(flip, x_start.flip(3), x_start)
        t = torch.randint(0, len(self.alphas_cumprod), (batch,), generator=self.generator)
        noise = torch.randn(x_start.shape, generator=self.generator)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x_start + (1.0 - a).sqrt() * noise
        loss = torch.mean((self.model(x_t, t).sample - noise) ** 2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()], 1.0 - self.decay)
        return loss.item()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The eval-mode network output, no gradient."""
        self.model.eval()
        with torch.inference_mode():
            return self.model(x_t, t).sample


def torch_side(config, arrays: dict) -> tuple[dict, dict]:
    """({"train": fn, "sample": fn}, facts) of the diffusers peer; under bfloat16 autocast when config.model.dtype
    is bfloat16."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(config.seed)
    schedule = schedule_from_config(config.diffusion)
    peer = TorchTrainer(diffusers_unet(config.model), config, np.asarray(schedule.alphas_cumprod))
    images = torch.from_numpy(arrays["images"]).permute(0, 3, 1, 2).contiguous()
    x_t = torch.from_numpy(arrays["x_t"]).permute(0, 3, 1, 2).contiguous()
    t = torch.from_numpy(arrays["t"]).long()
    facts = {
        "version": f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}",
        "parameters": sum(p.numel() for p in peer.model.parameters()),
    }
    autocast = config.model.dtype == "bfloat16"

    def precision():
        return torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def train():
        with precision():
            peer.step(images)

    def sample():
        with precision():
            peer.forward(x_t, t)

    return {"train": train, "sample": sample}, facts
