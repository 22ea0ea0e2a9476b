"""The FID Inception network: InceptionV3 with the TF "2015-12-05" graph's quirks, in Flax Linen.

This is the network behind FID and IS as published (TTUR / openai code), in the
form pytorch-fid ported it: average pools exclude padding, the pool branch of
the last block (Mixed_7c) is a max pool, BatchNorm has eps 1e-3, inputs are
`(x - 128) / 128` after a TF1 bilinear resize to 299x299. Images are NHWC.

Outputs: `pool_3`, the 2048-d global average pool, and the 1008-way IS logits
`pool_3 @ W` (no bias). Every convolution and the classifier run at
`Precision.HIGHEST`, so TPUs and GPUs do not drop to bf16/TF32 passes.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UsageError

FID_IMAGE_SIZE = 299
POOL3_FEATURES = 2048
NUM_CLASSES = 1008
BATCHNORM_EPS = 1e-3
_PRECISION = jax.lax.Precision.HIGHEST


def _tf1_source_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF1 (align_corners=False, no half-pixel) sampling: source = dest * in/out, all in float32."""
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.arange(out_size, dtype=np.float32) * scale
    floor = np.floor(source)
    lower = floor.astype(np.int64)
    upper = np.minimum(np.ceil(source).astype(np.int64), in_size - 1)
    return lower, upper, (source - floor).astype(np.float32)


def resize_tf1_bilinear(images: jax.Array, size: int = FID_IMAGE_SIZE) -> jax.Array:
    """`tf.compat.v1.image.resize_bilinear(images, [size, size], align_corners=False)`.

    images: [B, H, W, C] (any real dtype); returns float32 [B, size, size, C].
    Same float32 operation order as TF's CPU kernel (width lerp, then height).
    Called eagerly the result equals TF's bit for bit; under `jit`, XLA may fuse
    each lerp into an FMA, which moves results by at most a few ulp.
    """
    x = jnp.asarray(images, jnp.float32)
    y_lo, y_hi, y_frac = _tf1_source_indices(x.shape[1], size)
    x_lo, x_hi, x_frac = _tf1_source_indices(x.shape[2], size)
    left, right = x[:, :, x_lo], x[:, :, x_hi]
    rows = left + (right - left) * x_frac[None, None, :, None]
    top, bottom = rows[:, y_lo], rows[:, y_hi]
    return top + (bottom - top) * y_frac[None, :, None, None]


def check_images(images) -> None:
    """Raise ValueError unless `images` is NHWC, 1 or 3 channels, uint8 or float in [0, 255]."""
    shape = np.shape(images)
    dtype = np.dtype(getattr(images, "dtype", np.asarray(images).dtype))
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise UsageError(f"images must be NHWC with 1 or 3 channels, got shape {shape}")
    if min(shape) == 0:
        raise UsageError(f"images must not be empty, got shape {shape}")
    if dtype == np.uint8:
        return
    if not np.issubdtype(dtype, np.floating):
        raise UsageError(f"images must be uint8 or float in [0, 255], got dtype {dtype}")
    low, high = float(jnp.min(images)), float(jnp.max(images))
    if not (0.0 <= low and high <= 255.0):
        raise UsageError(f"float images must lie in [0, 255], got values in [{low}, {high}]")


@jax.jit
def _resize_and_normalise(images: jax.Array) -> jax.Array:
    x = resize_tf1_bilinear(images, FID_IMAGE_SIZE)
    x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
    return (x - 128.0) / 128.0


def preprocess(images) -> jax.Array:
    """Pixels -> network input: [B, H, W, 1|3] uint8 or float in [0, 255] -> float32 [B, 299, 299, 3].

    Grayscale is repeated to 3 channels; values become (x - 128) / 128, in [-1, 0.9921875].
    """
    check_images(images)
    return _resize_and_normalise(jnp.asarray(images))


class FrozenBatchNorm(nn.Module):
    """Inference BatchNorm: (x - mean) / sqrt(var + 1e-3) * scale + bias; all four are params."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        mean = self.param("mean", nn.initializers.zeros, (features,))
        var = self.param("var", nn.initializers.ones, (features,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + BATCHNORM_EPS)) + bias


class ConvBN(nn.Module):
    """Conv (no bias) -> FrozenBatchNorm -> ReLU; padding as explicit (low, high) pairs like torch."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features, self.kernel_size, self.strides, self.padding,
            use_bias=False, precision=_PRECISION, name="conv",
        )(x)
        return nn.relu(FrozenBatchNorm(name="bn")(x))


def _same(kh: int, kw: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric padding keeping the size of an odd (kh, kw) kernel at stride 1."""
    return ((kh // 2, kh // 2), (kw // 2, kw // 2))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool; the zero padding does not count (TF "SAME" avg pool)."""
    return nn.avg_pool(x, (3, 3), (1, 1), _same(3, 3), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (pool_features)."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = ConvBN(64, (1, 1), name="branch1x1")(x)
        b5 = ConvBN(48, (1, 1), name="branch5x5_1")(x)
        b5 = ConvBN(64, (5, 5), padding=_same(5, 5), name="branch5x5_2")(b5)
        b3 = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = ConvBN(96, (3, 3), padding=_same(3, 3), name="branch3x3dbl_2")(b3)
        b3 = ConvBN(96, (3, 3), padding=_same(3, 3), name="branch3x3dbl_3")(b3)
        bp = ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = ConvBN(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvBN(96, (3, 3), padding=_same(3, 3), name="branch3x3dbl_2")(bd)
        bd = ConvBN(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: 1x1 | factorised 7x7 | double factorised 7x7 | avgpool-1x1."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.channels_7x7
        b1 = ConvBN(192, (1, 1), name="branch1x1")(x)
        b7 = ConvBN(c, (1, 1), name="branch7x7_1")(x)
        b7 = ConvBN(c, (1, 7), padding=_same(1, 7), name="branch7x7_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=_same(7, 1), name="branch7x7_3")(b7)
        bd = ConvBN(c, (1, 1), name="branch7x7dbl_1")(x)
        bd = ConvBN(c, (7, 1), padding=_same(7, 1), name="branch7x7dbl_2")(bd)
        bd = ConvBN(c, (1, 7), padding=_same(1, 7), name="branch7x7dbl_3")(bd)
        bd = ConvBN(c, (7, 1), padding=_same(7, 1), name="branch7x7dbl_4")(bd)
        bd = ConvBN(192, (1, 7), padding=_same(1, 7), name="branch7x7dbl_5")(bd)
        bp = ConvBN(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = ConvBN(192, (1, 1), name="branch3x3_1")(x)
        b3 = ConvBN(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = ConvBN(192, (1, 7), padding=_same(1, 7), name="branch7x7x3_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=_same(7, 1), name="branch7x7x3_3")(b7)
        b7 = ConvBN(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

    `max_pool_branch`: Mixed_7c of the FID graph max-pools in its pool branch
    (Mixed_7b and the paper average-pool).
    """

    max_pool_branch: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = ConvBN(320, (1, 1), name="branch1x1")(x)
        b3 = ConvBN(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            ConvBN(384, (1, 3), padding=_same(1, 3), name="branch3x3_2a")(b3),
            ConvBN(384, (3, 1), padding=_same(3, 1), name="branch3x3_2b")(b3),
        ], axis=-1)
        bd = ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvBN(384, (3, 3), padding=_same(3, 3), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            ConvBN(384, (1, 3), padding=_same(1, 3), name="branch3x3dbl_3a")(bd),
            ConvBN(384, (3, 1), padding=_same(3, 1), name="branch3x3dbl_3b")(bd),
        ], axis=-1)
        if self.max_pool_branch:
            pooled = nn.max_pool(x, (3, 3), (1, 1), _same(3, 3))
        else:
            pooled = _avg_pool_3x3(x)
        bp = ConvBN(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID InceptionV3. Input: float32 [B, 299, 299, 3] from `preprocess`.

    Returns `(pool_3 [B, 2048], logits [B, 1008])`; with `with_logits=False`
    (weights without the classifier) the params have no `fc` and logits is None.
    Parameter names follow pytorch-fid / torchvision (`Mixed_5b/branch1x1/conv/kernel`, ...).
    """

    with_logits: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, Optional[jax.Array]]:
        x = ConvBN(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = ConvBN(64, (3, 3), padding=_same(3, 3), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = ConvBN(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool_branch=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool_branch=True, name="Mixed_7c")(x)
        pool_3 = jnp.mean(x, axis=(1, 2))
        if not self.with_logits:
            return pool_3, None
        logits = nn.Dense(NUM_CLASSES, use_bias=False, precision=_PRECISION, name="fc")(pool_3)
        return pool_3, logits


@jax.jit
def _features(params, images: jax.Array) -> tuple[jax.Array, Optional[jax.Array]]:
    model = InceptionV3(with_logits="fc" in params)
    return model.apply({"params": params}, _resize_and_normalise(images))


def inception_features(params, images) -> tuple[jax.Array, Optional[jax.Array]]:
    """Pixels -> (pool_3 [B, 2048], logits [B, 1008] or None), jitted per input shape.

    images: [B, H, W, 1|3] uint8 or float in [0, 255] (checked on the host first);
    params: the `InceptionV3` params tree (see `inception_weights.load_inception_params`).
    """
    check_images(images)
    return _features(params, jnp.asarray(images))
