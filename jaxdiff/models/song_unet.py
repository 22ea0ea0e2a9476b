"""EDM's SongUNet (Karras et al. 2022, `training/networks.py`), its version of DDPM++ and NCSN++, in Flax Linen.

(x [B,S,S,in_channels] float, noise_labels [B], class_labels) -> float32 [B,S,S,out_channels]. The noise
labels are EDM's c_noise (e.g. ln(σ)/4), used as raw numbers by the positional (DDPM++) or Fourier
(NCSN++) embedding; the network knows nothing of the preconditioning around it.

Parameter names follow EDM's modules, with its `enc.32x32_block0`-style keys as `enc_32x32_block0`:

    map_noise/W                   "fourier" only: the fixed frequencies (EDM's buffer `freqs`; no gradient)
    map_label, map_augment        label_dim > 0 / augment_dim > 0 (map_augment has no bias)
    map_layer0, map_layer1        noise_channels -> emb_channels -> emb_channels
    enc_{R}x{R}_conv              level 0: 3×3, in_channels -> model_channels
    enc_{R}x{R}_down              levels > 0: UNetBlock with down-sampling
    enc_{R}x{R}_aux_skip          encoder_type "skip": 1×1 conv of the down-sampled input
    enc_{R}x{R}_aux_residual      encoder_type "residual": 3×3 conv fused with FIR down-sampling
    enc_{R}x{R}_block{i}          i < num_blocks
    dec_{R}x{R}_in0, _in1         lowest level (in0 with attention); other levels dec_{R}x{R}_up
    dec_{R}x{R}_block{i}          i <= num_blocks, attention only in the last one at attention resolutions
    dec_{R}x{R}_aux_norm, _aux_conv   decoder_type "skip": every level; "standard": level 0 only

UNetBlock: norm0, conv0, affine, norm1, conv1[, skip][, norm2, qkv, proj]. Convolutions are HWIO with
bias, dense kernels [in, out]; `qkv` output channels are ordered (channel, q/k/v) as in EDM.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.checks import require_choice, require_int
from jaxdiff.errors import ConfigError, UsageError
from jaxdiff.models.layers import single_head_attention, timestep_embedding
from jaxdiff.models.resample import conv_downsample_2d, downsample_2d, upsample_2d
from jaxdiff.models.score_layers import (
    GaussianFourierEmbedding,
    group_norm,
    module_fields,
    scaled_init,
)

Array = jax.Array

EMBEDDINGS = ("positional", "fourier")
ENCODERS = ("standard", "skip", "residual")
DECODERS = ("standard", "skip")
FOURIER_SCALE = 16.0
ATTENTION_INIT_SCALE = 0.2  # EDM's init_attn: weights × √0.2
ZERO_INIT = 0.0  # EDM's init_zero (weights × 1e-5) is `scaled_init(0)`: variance × 1e-10
SKIP_SCALE = float(np.sqrt(0.5))


class ResampleConv(nn.Module):
    """EDM's Conv2d: FIR ×2 resampling (`up`/`down`, filter `resample_filter`), then a k×k convolution
    (k = 0: resampling only, no parameters). `fused_down` pads once for filter and convolution together."""

    features: int
    kernel_size: int
    resample_filter: tuple[int, ...] = (1, 1)
    up: bool = False
    down: bool = False
    fused_down: bool = False
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        if self.fused_down:
            kernel = self.param("kernel", scaled_init(self.init_scale), (k, k, x.shape[-1], self.features))
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
            return conv_downsample_2d(x, kernel, self.resample_filter) + bias
        if self.up:
            x = upsample_2d(x, self.resample_filter)
        if self.down:
            x = downsample_2d(x, self.resample_filter)
        if k == 0:
            return x
        return nn.Conv(self.features, (k, k), padding="SAME", kernel_init=scaled_init(self.init_scale), name="conv")(x)


class UNetBlock(nn.Module):
    """EDM's UNetBlock as SongUNet configures it (one head, additive embedding, skip scale √½):
    x = (conv1(dropout(silu(norm1(conv0(silu(norm0(x))) + affine(emb))))) + skip(x))·√½, then with attention
    x = (proj(attn(qkv(norm2(x)))) + x)·√½. `skip` is a 1×1 conv when channels change or the block resamples."""

    out_channels: int
    resample_filter: tuple[int, ...]
    dropout: float
    up: bool = False
    down: bool = False
    attention: bool = False

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool) -> Array:
        c, f = self.out_channels, self.resample_filter
        orig = x
        x = ResampleConv(c, 3, f, self.up, self.down, name="conv0")(nn.silu(group_norm(x, name="norm0")))
        x = x + nn.Dense(c, kernel_init=scaled_init(1.0), name="affine")(emb)[:, None, None, :]
        x = nn.silu(group_norm(x, name="norm1"))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = ResampleConv(c, 3, init_scale=ZERO_INIT, name="conv1")(x)
        if orig.shape[-1] != c or self.up or self.down:
            orig = ResampleConv(c, 1, f, self.up, self.down, name="skip")(orig)
        x = (x + orig) * SKIP_SCALE
        if self.attention:
            b, height, width, _ = x.shape
            qkv = ResampleConv(3 * c, 1, init_scale=ATTENTION_INIT_SCALE, name="qkv")(group_norm(x, name="norm2"))
            qkv = qkv.reshape(b, height * width, c, 3)
            q, k, v = (qkv[..., i][:, :, None, :] for i in range(3))
            a = single_head_attention(q, k, v).reshape(b, height, width, c)
            x = (ResampleConv(c, 1, init_scale=ZERO_INIT, name="proj")(a) + x) * SKIP_SCALE
        return x


class SongUNet(nn.Module):
    """EDM's SongUNet. Fields are the keys of `default_config()`; they are checked on construction."""

    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int
    augment_dim: int
    model_channels: int
    channel_mult: tuple[int, ...]
    channel_mult_emb: int
    num_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    embedding_type: str
    channel_mult_noise: int
    encoder_type: str
    decoder_type: str
    resample_filter: tuple[int, ...]

    def __post_init__(self):
        self._check_fields()
        super().__post_init__()

    def _check_fields(self) -> None:
        for name in ("img_resolution", "in_channels", "out_channels", "model_channels", "channel_mult_emb",
                     "num_blocks", "channel_mult_noise"):  # fmt: skip
            require_int(name, getattr(self, name), 1)
        require_int("label_dim", self.label_dim, 0)
        require_int("augment_dim", self.augment_dim, 0)
        require_choice("embedding_type", self.embedding_type, EMBEDDINGS)
        require_choice("encoder_type", self.encoder_type, ENCODERS)
        require_choice("decoder_type", self.decoder_type, DECODERS)
        if not isinstance(self.channel_mult, tuple) or not self.channel_mult:
            raise ConfigError(f"channel_mult={self.channel_mult!r} must be a non-empty tuple of ints")
        for mult in self.channel_mult:
            require_int("channel_mult entry", mult, 1)
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.img_resolution % factor:
            raise ConfigError(
                f"img_resolution={self.img_resolution} is not divisible by 2^(len(channel_mult)-1) = {factor}"
            )
        if self.model_channels % 4 or (self.model_channels * self.channel_mult_noise) % 4:
            raise ConfigError(f"model_channels={self.model_channels} must be divisible by 4")
        resolutions = tuple(self.img_resolution >> i for i in range(len(self.channel_mult)))
        for res in self.attn_resolutions:
            if res not in resolutions:
                raise ConfigError(f"attn_resolutions entry {res!r} never occurs; the resolutions are {resolutions}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r} must be a number in [0, 1)")
        if not self.resample_filter or any(not isinstance(t, (int, float)) for t in self.resample_filter):
            raise ConfigError(f"resample_filter={self.resample_filter!r} must be a non-empty tuple of numbers")

    def _labels(self, class_labels, batch: int) -> Array:
        """Class labels as EDM's [B, label_dim] float vectors: ints [B] one-hot, None all zeros."""
        if class_labels is None:
            return jnp.zeros((batch, self.label_dim), jnp.float32)
        class_labels = jnp.asarray(class_labels)
        if class_labels.shape == (batch,) and jnp.issubdtype(class_labels.dtype, jnp.integer):
            return jax.nn.one_hot(class_labels, self.label_dim, dtype=jnp.float32)
        if class_labels.shape == (batch, self.label_dim):
            return class_labels.astype(jnp.float32)
        raise ConfigError(
            f"class_labels must be ints of shape [{batch}] or floats of shape [{batch}, {self.label_dim}], "
            f"got shape {class_labels.shape} dtype {class_labels.dtype}"
        )

    def _embedding(self, noise_labels, class_labels, augment_labels, batch: int) -> Array:
        noise_channels = self.model_channels * self.channel_mult_noise
        emb_channels = self.model_channels * self.channel_mult_emb
        if self.embedding_type == "positional":
            emb = timestep_embedding(noise_labels, noise_channels)  # EDM's endpoint=True embedding, sin first
        else:
            emb = GaussianFourierEmbedding(noise_channels // 2, FOURIER_SCALE, name="map_noise")(noise_labels)
        if self.label_dim:
            labels = self._labels(class_labels, batch) * np.sqrt(self.label_dim)
            emb = emb + nn.Dense(noise_channels, kernel_init=scaled_init(1.0), name="map_label")(labels)
        elif class_labels is not None:
            raise UsageError("class_labels were given but the network is unconditional (label_dim=0)")
        if self.augment_dim:
            augment = jnp.zeros((batch, self.augment_dim)) if augment_labels is None else jnp.asarray(augment_labels)
            if augment.shape != (batch, self.augment_dim):
                raise UsageError(f"augment_labels must have shape [{batch}, {self.augment_dim}], got {augment.shape}")
            dense = nn.Dense(noise_channels, use_bias=False, kernel_init=scaled_init(1.0), name="map_augment")
            emb = emb + dense(augment.astype(jnp.float32))
        elif augment_labels is not None:
            raise UsageError("augment_labels were given but augment_dim=0")
        emb = nn.silu(nn.Dense(emb_channels, kernel_init=scaled_init(1.0), name="map_layer0")(emb))
        return nn.silu(nn.Dense(emb_channels, kernel_init=scaled_init(1.0), name="map_layer1")(emb))

    @nn.compact
    def __call__(
        self, x: Array, noise_labels: Array, class_labels: Array | None = None, train: bool = False,
        augment_labels: Array | None = None,
    ) -> Array:  # fmt: skip
        """x [B,S,S,in_channels]; noise_labels [B] (EDM's c_noise); class_labels ints [B], one-hot-like floats
        [B, label_dim] or None (zeros, EDM's unconditional input); augment_labels [B, augment_dim] or None.
        Dropout is active only with train=True (rngs={"dropout": key})."""
        x, noise_labels = jnp.asarray(x, jnp.float32), jnp.asarray(noise_labels, jnp.float32)
        expected = (self.img_resolution, self.img_resolution, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise UsageError(f"x must have shape [B, {', '.join(map(str, expected))}] (NHWC), got {x.shape}")
        batch = x.shape[0]
        if noise_labels.shape != (batch,):
            raise UsageError(f"noise_labels must have shape [{batch}], got {noise_labels.shape}")
        emb = self._embedding(noise_labels, class_labels, augment_labels, batch)
        f, last = tuple(self.resample_filter), len(self.channel_mult) - 1

        def block(name: str, channels: int, h: Array, **kw) -> Array:
            return UNetBlock(channels, f, self.dropout, name=name, **kw)(h, emb, train)

        skips, aux = [], x
        for level, mult in enumerate(self.channel_mult):
            res = f"{self.img_resolution >> level}x{self.img_resolution >> level}"
            if level == 0:
                x = ResampleConv(self.model_channels, 3, name=f"enc_{res}_conv")(x)
            else:
                x = block(f"enc_{res}_down", x.shape[-1], x, down=True)
                if self.encoder_type == "skip":
                    aux = downsample_2d(aux, f)
                    x = x + ResampleConv(x.shape[-1], 1, name=f"enc_{res}_aux_skip")(aux)
                elif self.encoder_type == "residual":
                    residual = ResampleConv(x.shape[-1], 3, f, fused_down=True, name=f"enc_{res}_aux_residual")
                    x = aux = (x + residual(aux)) / np.sqrt(2.0)
            skips.append(x)
            for idx in range(self.num_blocks):
                attention = (self.img_resolution >> level) in self.attn_resolutions
                x = block(f"enc_{res}_block{idx}", self.model_channels * mult, x, attention=attention)
                skips.append(x)

        aux = None
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            res = f"{self.img_resolution >> level}x{self.img_resolution >> level}"
            if level == last:
                x = block(f"dec_{res}_in0", x.shape[-1], x, attention=True)
                x = block(f"dec_{res}_in1", x.shape[-1], x)
            else:
                x = block(f"dec_{res}_up", x.shape[-1], x, up=True)
            for idx in range(self.num_blocks + 1):
                attention = idx == self.num_blocks and (self.img_resolution >> level) in self.attn_resolutions
                x = block(f"dec_{res}_block{idx}", self.model_channels * mult, jnp.concatenate([x, skips.pop()], -1),
                          attention=attention)  # fmt: skip
            if self.decoder_type == "skip" or level == 0:
                if aux is not None:
                    aux = upsample_2d(aux, f)
                out = nn.silu(group_norm(x, name=f"dec_{res}_aux_norm"))
                out = ResampleConv(self.out_channels, 3, init_scale=ZERO_INIT, name=f"dec_{res}_aux_conv")(out)
                aux = out if aux is None else out + aux
        return aux


def default_config() -> ml_collections.ConfigDict:
    """SongUNet's defaults (DDPM++ flavour, 32×32 RGB, unconditional): the keys of `SongUNet`."""
    return ml_collections.ConfigDict(
        dict(
            img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=0, model_channels=128,
            channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
            embedding_type="positional", channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
            resample_filter=(1, 1),
        )
    )  # fmt: skip


CIFAR10_VARIANTS = ("ddpmpp", "ncsnpp")


def cifar10_config(variant: str, *, label_dim: int = 0, augment_dim: int = 0) -> ml_collections.ConfigDict:
    """EDM's CIFAR-10 networks (`train.py --arch=ddpmpp|ncsnpp`): 128 channels, channel_mult (2, 2, 2),
    dropout 0.13; label_dim 10 for the class-conditional model, augment_dim 9 with augmentation."""
    require_choice("variant", variant, CIFAR10_VARIANTS)
    config = default_config()
    config.update(channel_mult=(2, 2, 2), dropout=0.13, label_dim=label_dim, augment_dim=augment_dim)
    if variant == "ncsnpp":
        config.update(
            embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=(1, 3, 3, 1)
        )
    return config


def create_song_unet(config: ml_collections.ConfigDict) -> SongUNet:
    """The network of a config with the keys of `default_config()`; unknown or missing keys raise ValueError."""
    tuple_keys = ("channel_mult", "attn_resolutions", "resample_filter")
    return SongUNet(**module_fields(config, default_config(), tuple_keys, "SongUNet"))
