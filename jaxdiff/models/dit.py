"""DiT (Peebles & Xie 2023, facebookresearch/DiT `models.py`) and SiT (Ma et al. 2024, willisma/SiT: the same
network) as a Flax Linen module, in two embedder layouts.

(x [B,S,S,C] NHWC float, labels [B], class_labels int [B] or None) -> float32 [B,S,S,C_out]. S = input_size is
the side of the (latent) input; labels are the timestep as a real number (DDPM steps 0..999 for DiT, whatever its
family passes for SiT, e.g. t in [0, 1]), used as raw numbers by the frequency embedding; class_labels are in
0..num_classes-1, or num_classes, the null class of classifier-free guidance (None: all null). C_out is 2·C with
learn_sigma (ε then the variance interpolation v, DiT's order) and C without, or with output_sigma=False (SiT's
forward, which drops the σ half its learn_sigma weights still compute).

The network: patchify (a p×p stride-p convolution) + the fixed 2-D sin-cos position embedding; conditioning
c = MLP(freq(t)) + table[y]; `depth` adaLN-Zero blocks x += gate·attn(modulate(LN(x))), x += gate·mlp(modulate(LN(x)))
with (shift, scale, gate) ×2 = Linear(silu(c)); the final adaLN layer, a linear to p·p·C_out, unpatchify.

Parameter tree (DiT's state-dict names, `blocks.3.adaLN_modulation.1` as `blocks_3/adaLN_modulation_1`):

    x_embedder/proj                         p×p conv, in_channels -> hidden_size (HWIO kernel, bias)
    t_embedder/mlp_0, t_embedder/mlp_2      256 -> hidden -> hidden (SiLU between)
    y_embedder/embedding_table/embedding    [num_classes (+1 null row when class_dropout_prob > 0), hidden]
    blocks_{i}/adaLN_modulation_1           hidden -> 6·hidden (shift, scale, gate of attention, then of the MLP)
    blocks_{i}/attn/qkv, blocks_{i}/attn/proj   hidden -> 3·hidden (q, k, v, each head-major), hidden -> hidden
    blocks_{i}/mlp/fc1, blocks_{i}/mlp/fc2  hidden -> hidden·mlp_ratio -> hidden (GELU, tanh approximation)
    final_layer/adaLN_modulation_1          hidden -> 2·hidden (shift, scale)
    final_layer/linear                      hidden -> p·p·C_out (per patch: row, column, channel)

With per_block_embedders (diffusers' `DiTTransformer2DModel`) there is no top-level t_embedder / y_embedder:
each block holds its own (`blocks_{i}/t_embedder`, `blocks_{i}/y_embedder`) and the final layer is conditioned
by block 0's. Dense kernels are [in, out]. Initialised parameters are float32 (the readers hold read ones in
`dtype`); `dtype` is the compute dtype of the matmuls and convolution, while layer norms, modulation, the residual
stream and the attention softmax stay float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.checks import is_real, require_bool, require_choice, require_int
from jaxdiff.errors import ConfigError, UsageError
from jaxdiff.models.layers import multi_head_attention, timestep_embedding
from jaxdiff.models.score_layers import module_fields

Array = jax.Array

# Sizes of the paper's Table 1: (depth, hidden_size, num_heads); presets are "<size>/<patch>", e.g. "XL/2".
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCH_SIZES = (2, 4, 8)
PRESETS = tuple(f"{size}/{patch}" for size in SIZES for patch in PATCH_SIZES)
PRESET_PREFIXES = ("DiT-", "SiT-")  # "DiT-XL/2" and "SiT-XL/2" name the preset "XL/2"
COMPUTE_DTYPES = ("float32", "bfloat16")
# "auto": jax.nn.dot_product_attention's own choice (its XLA implementation, einsum-softmax-einsum, on every backend
# as of JAX 0.12); "cudnn": cuDNN's fused flash attention (GPU only, bfloat16 compute).
ATTENTION_IMPLEMENTATIONS = ("auto", "cudnn")
FREQUENCY_EMBEDDING_SIZE = 256  # channels of the timestep's sinusoid before the MLP
LAYER_NORM_EPS = 1e-6  # every layer norm but the one before the MLP (mlp_norm_eps)
LABEL_INIT_STD = 0.02  # DiT's init of the label table and the timestep MLP


def preset_config(preset: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The `config.model.dit` section of a named size: "XL/2" (or "DiT-XL/2", "SiT-XL/2"), ... of `PRESETS`,
    DiT's ImageNet 256² setting (32×32×4 latents, 1000 classes, learned σ) with `overrides` of any other key."""
    name = preset
    for prefix in PRESET_PREFIXES:
        if isinstance(name, str) and name.startswith(prefix):
            name = name[len(prefix):]
    if name not in PRESETS:
        raise ConfigError(f"unknown DiT preset {preset!r}; expected one of {PRESETS} (optionally 'DiT-'/'SiT-' first)")
    size, patch = name.split("/")
    depth, hidden, heads = SIZES[size]
    config = ml_collections.ConfigDict(
        dict(
            input_size=32, patch_size=int(patch), in_channels=4, hidden_size=hidden, depth=depth, num_heads=heads,
            mlp_ratio=4.0, num_classes=1000, class_dropout_prob=0.1, learn_sigma=True, output_sigma=True,
            per_block_embedders=False, freq_shift=0, mlp_norm_eps=LAYER_NORM_EPS, dtype="float32", remat=False,
            attention="auto",
        )
    )  # fmt: skip
    unknown = sorted(set(overrides) - set(config.keys()))
    if unknown:
        raise ConfigError(f"unknown DiT config keys {unknown}; the keys are {sorted(config.keys())}")
    config.update(overrides)
    return config


def default_config() -> ml_collections.ConfigDict:
    """DiT-XL/2 at 256² (latent 32×32×4), class-conditional on ImageNet's 1000 classes, learned σ."""
    return preset_config("XL/2")


def preset_of(depth: int, hidden_size: int) -> str | None:
    """The size ("S", "B", "L", "XL") with this depth and width, or None."""
    return next((size for size, (d, h, _) in SIZES.items() if (d, h) == (depth, hidden_size)), None)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """DiT's fixed position embedding (`get_2d_sincos_pos_embed`, from MAE), float64 [grid², dim].

    Token n = row·G + column. Channels [0, dim/2) embed the column, [dim/2, dim) the row, each as
    [sin(pos·ω_k), cos(pos·ω_k)] with ω_k = 10000^(-k / (dim/4)), k = 0..dim/4-1. dim must be a multiple of 4.
    """
    if dim % 4:
        raise ConfigError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 10000.0 ** (-np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    pos = np.arange(grid_size, dtype=np.float64)
    axis = np.outer(pos, omega)
    axis = np.concatenate([np.sin(axis), np.cos(axis)], axis=1)  # [G, dim/2]
    column = np.tile(axis, (grid_size, 1))  # token n has column n % G
    row = np.repeat(axis, grid_size, axis=0)  # and row n // G
    return np.concatenate([column, row], axis=1)


def timestep_frequencies(t: Array, freq_shift: int) -> Array:
    """The timestep's sinusoid [B, 256] float32: [cos(t·f_k), sin(t·f_k)], k < 128,
    f_k = exp(-ln(10000)·k / (128 - freq_shift)).

    freq_shift 0 is DiT's (`TimestepEmbedder.timestep_embedding`), 1 is diffusers' `CombinedTimestepLabelEmbeddings`.
    """
    return timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE, flip_sin_to_cos=True, freq_shift=freq_shift)


def layer_norm(x: Array, eps: float) -> Array:
    """LayerNorm over the last axis without scale or bias, in float32 (biased variance, as torch)."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """x [B,N,D] · (1 + scale[:, None]) + shift[:, None]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _dense(features: int, dtype: Any, name: str, kernel_init=nn.initializers.xavier_uniform()) -> nn.Dense:
    """Dense with float32 parameters, zero bias; DiT initialises every Linear xavier-uniform unless stated."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init, name=name)


class TimestepEmbedder(nn.Module):
    """t [B] -> [B, hidden]: mlp_2(silu(mlp_0(timestep_frequencies(t))))."""

    hidden_size: int
    freq_shift: int
    dtype: Any

    @nn.compact
    def __call__(self, t: Array) -> Array:
        init = nn.initializers.normal(LABEL_INIT_STD)
        h = _dense(self.hidden_size, self.dtype, "mlp_0", init)(timestep_frequencies(t, self.freq_shift))
        return _dense(self.hidden_size, self.dtype, "mlp_2", init)(nn.silu(h))


class LabelEmbedder(nn.Module):
    """y [B] int -> embedding_table[y] [B, hidden] float32 (DiT's `LabelEmbedder`; `DiT` drops the labels)."""

    num_rows: int
    hidden_size: int

    @nn.compact
    def __call__(self, y: Array) -> Array:
        init = nn.initializers.normal(LABEL_INIT_STD)
        return nn.Embed(self.num_rows, self.hidden_size, embedding_init=init, name="embedding_table")(y)


def conditioning(t: Array, y: Array | None, *, hidden_size: int, freq_shift: int, num_classes: int, null_row: bool,
                 dtype: Any) -> Array:  # fmt: skip
    """c [B, hidden] float32 = t_embedder(t) + y_embedder(y) (no label term when y is None: unconditional).

    Call inside a compact method: `t_embedder` and `y_embedder` become submodules of the caller."""
    c = TimestepEmbedder(hidden_size, freq_shift, dtype, name="t_embedder")(t).astype(jnp.float32)
    if y is None:
        return c
    return c + LabelEmbedder(num_classes + int(null_row), hidden_size, name="y_embedder")(y).astype(jnp.float32)


class Attention(nn.Module):
    """Multi-head self-attention x [B,N,D] -> [B,N,D]: fused `qkv` (q, k, v each D channels, head-major), softmax
    attention with scale head_dim^-½ through `jaxdiff.models.layers.multi_head_attention`, then `proj`."""

    num_heads: int
    dtype: Any
    implementation: str

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, n, d = x.shape
        qkv = _dense(3 * d, self.dtype, "qkv")(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        impl = None if self.implementation == "auto" else self.implementation
        out = multi_head_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=impl)
        return _dense(d, self.dtype, "proj")(out.reshape(b, n, d))


class Mlp(nn.Module):
    """x [B,N,D] -> fc2(gelu_tanh(fc1(x))) [B,N,D], fc1 of `hidden_features` channels."""

    hidden_features: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.gelu(_dense(self.hidden_features, self.dtype, "fc1")(x), approximate=True)
        return _dense(x.shape[-1], self.dtype, "fc2")(h)


class DiTBlock(nn.Module):
    """adaLN-Zero block: (x [B,N,D] float32, c [B,D] or None, t [B], y [B] or None) -> (x, the c it used).

    With `own_embedders` (diffusers' layout) the block computes its c from t and y with its own embedders
    and ignores the c it is given; otherwise it uses that c and ignores t and y."""

    num_heads: int
    mlp_hidden: int
    mlp_norm_eps: float
    dtype: Any
    attention: str
    own_embedders: bool = False
    freq_shift: int = 0
    num_classes: int = 0
    null_row: bool = True

    @nn.compact
    def __call__(self, x: Array, c: Array | None, t: Array, y: Array | None) -> tuple[Array, Array]:
        d = x.shape[-1]
        if self.own_embedders:
            c = conditioning(t, y, hidden_size=d, freq_shift=self.freq_shift, num_classes=self.num_classes,
                             null_row=self.null_row, dtype=self.dtype)  # fmt: skip
        zeros = nn.initializers.zeros
        mod = _dense(6 * d, self.dtype, "adaLN_modulation_1", zeros)(nn.silu(c)).astype(jnp.float32)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = modulate(layer_norm(x, LAYER_NORM_EPS), shift_msa, scale_msa)
        attn = Attention(self.num_heads, self.dtype, self.attention, name="attn")(h)
        x = x + gate_msa[:, None] * attn.astype(jnp.float32)
        h = modulate(layer_norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * Mlp(self.mlp_hidden, self.dtype, name="mlp")(h).astype(jnp.float32)
        return x, c


class FinalLayer(nn.Module):
    """(x [B,N,D], c [B,D]) -> linear(modulate(LN(x), shift, scale)) [B,N,features] float32, (shift, scale)
    = adaLN_modulation_1(silu(c)); both layers start at zero."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        zeros = nn.initializers.zeros
        mod = _dense(2 * x.shape[-1], self.dtype, "adaLN_modulation_1", zeros)(nn.silu(c)).astype(jnp.float32)
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(layer_norm(x, LAYER_NORM_EPS), shift, scale)
        return _dense(self.features, self.dtype, "linear", zeros)(x).astype(jnp.float32)


class PatchEmbed(nn.Module):
    """x [B,S,S,C] -> tokens [B, (S/p)², hidden] float32 (row-major patches): the p×p stride-p conv `proj`,
    initialised as DiT does (xavier-uniform over the flattened p·p·C inputs)."""

    hidden_size: int
    patch_size: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.patch_size
        init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
        h = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=jnp.float32, kernel_init=init, name="proj")(x)  # fmt: skip
        return h.reshape(h.shape[0], -1, self.hidden_size).astype(jnp.float32)


class DiT(nn.Module):
    """DiT / SiT. Fields are the keys of `default_config()`; they are checked on construction.

    `null_label` (a null class row exists: class_dropout_prob > 0) and `num_classes` are read by the denoisers."""

    input_size: int
    patch_size: int
    in_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float
    num_classes: int
    class_dropout_prob: float
    learn_sigma: bool
    output_sigma: bool
    per_block_embedders: bool
    freq_shift: int
    mlp_norm_eps: float
    dtype: str
    remat: bool
    attention: str

    def __post_init__(self):
        self._check_fields()
        super().__post_init__()

    def _check_fields(self) -> None:
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads"):
            require_int(name, getattr(self, name), 1)
        require_int("num_classes", self.num_classes, 0)
        require_int("freq_shift", self.freq_shift, 0)
        for name in ("learn_sigma", "output_sigma", "per_block_embedders", "remat"):
            require_bool(name, getattr(self, name))
        require_choice("dtype", self.dtype, COMPUTE_DTYPES)
        require_choice("attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        if self.input_size % self.patch_size:
            raise ConfigError(f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} does not split into num_heads={self.num_heads} heads")
        if self.hidden_size % 4:
            raise ConfigError(f"hidden_size={self.hidden_size} must be divisible by 4 (2-D sin-cos position embedding)")
        if not is_real(self.mlp_ratio, finite=True, numpy=False) or int(self.hidden_size * self.mlp_ratio) < 1:
            raise ConfigError(f"mlp_ratio={self.mlp_ratio!r} must be a number giving at least one MLP channel")
        if not is_real(self.class_dropout_prob, numpy=False) or not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"class_dropout_prob={self.class_dropout_prob!r} must be a number in [0, 1)")
        if not is_real(self.mlp_norm_eps, finite=True, numpy=False) or not self.mlp_norm_eps > 0:
            raise ConfigError(f"mlp_norm_eps={self.mlp_norm_eps!r} must be a number > 0")
        if self.freq_shift >= FREQUENCY_EMBEDDING_SIZE // 2:
            raise ConfigError(f"freq_shift={self.freq_shift} must be below {FREQUENCY_EMBEDDING_SIZE // 2}")
        if not self.output_sigma and not self.learn_sigma:
            raise ConfigError("output_sigma=False (drop the σ channels, SiT's forward) needs learn_sigma=True")
        if self.attention == "cudnn" and self.dtype != "bfloat16":
            raise ConfigError(f"attention='cudnn' needs dtype='bfloat16' (cuDNN flash attention), got {self.dtype!r}")

    @property
    def null_label(self) -> bool:
        """Whether the label table has the null class row (index num_classes), as DiT whenever it drops labels."""
        return self.class_dropout_prob > 0

    @property
    def out_channels(self) -> int:
        """Channels of the output: 2·in_channels with learn_sigma and output_sigma, else in_channels."""
        return self.in_channels * (2 if self.learn_sigma and self.output_sigma else 1)

    def _labels(self, class_labels, batch: int, train: bool) -> Array | None:
        """Class labels int [B] (None -> the null class), dropped to the null class at class_dropout_prob when
        training (rngs={"dropout": key}); None for an unconditional network."""
        if self.num_classes == 0:
            if class_labels is not None:
                raise UsageError("class_labels were given but the DiT is unconditional (num_classes=0)")
            return None
        if class_labels is None:
            if not self.null_label:
                raise UsageError("class_labels are required: this DiT has no null class (class_dropout_prob=0)")
            return jnp.full((batch,), self.num_classes, jnp.int32)
        y = jnp.asarray(class_labels)
        if y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer):
            raise UsageError(f"class_labels must be an int array of shape [{batch}], got shape {y.shape} "
                             f"dtype {y.dtype}")  # fmt: skip
        if train and self.class_dropout_prob > 0:
            drop = jax.random.bernoulli(self.make_rng("dropout"), self.class_dropout_prob, (batch,))
            y = jnp.where(drop, self.num_classes, y)
        return y

    @nn.compact
    def __call__(self, x: Array, labels: Array, class_labels: Array | None = None, train: bool = False) -> Array:
        """x [B,S,S,in_channels] float; labels [B] the timestep (a real number); class_labels int [B] or None;
        train=True drops class labels at class_dropout_prob (rngs={"dropout": key}). Returns float32
        [B,S,S,out_channels]."""
        x, labels = jnp.asarray(x), jnp.asarray(labels)
        expected = (self.input_size, self.input_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected or not jnp.issubdtype(x.dtype, jnp.floating):
            raise UsageError(f"x must be a float array of shape [B, {', '.join(map(str, expected))}] (NHWC), "
                             f"got shape {x.shape} dtype {x.dtype}")  # fmt: skip
        batch = x.shape[0]
        if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.number):
            raise UsageError(f"labels (timesteps) must be numbers of shape [{batch}], got shape {labels.shape}")
        if self.attention == "cudnn" and jax.default_backend() != "gpu":
            raise ConfigError(f"attention='cudnn' needs a GPU; this process runs on {jax.default_backend()!r}")
        y = self._labels(class_labels, batch, train)
        dtype, d, p, grid = jnp.dtype(self.dtype), self.hidden_size, self.patch_size, self.input_size // self.patch_size
        embed = dict(hidden_size=d, freq_shift=self.freq_shift, num_classes=self.num_classes, null_row=self.null_label,
                     dtype=dtype)  # fmt: skip

        h = PatchEmbed(d, p, dtype, name="x_embedder")(x) + jnp.asarray(sincos_pos_embed_2d(d, grid), jnp.float32)
        c = None if self.per_block_embedders else conditioning(labels, y, **embed)
        block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
        final_c = c
        for i in range(self.depth):
            block = block_cls(self.num_heads, int(d * self.mlp_ratio), self.mlp_norm_eps, dtype, self.attention,
                              own_embedders=self.per_block_embedders, freq_shift=self.freq_shift,
                              num_classes=self.num_classes, null_row=self.null_label, name=f"blocks_{i}")  # fmt: skip
            h, block_c = block(h, c, labels, y)
            if i == 0 and self.per_block_embedders:  # diffusers conditions its final layer by block 0's embedders
                final_c = block_c
        channels = self.in_channels * (2 if self.learn_sigma else 1)
        h = FinalLayer(p * p * channels, dtype, name="final_layer")(h, final_c)
        out = h.reshape(batch, grid, grid, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
        out = out.reshape(batch, self.input_size, self.input_size, channels)
        return out[..., : self.out_channels]


def create_dit(config: ml_collections.ConfigDict) -> DiT:
    """The network of a `config.model.dit` section (the keys of `default_config()`); unknown or missing keys and
    invalid values raise ConfigError."""
    return DiT(**module_fields(config, default_config(), (), "DiT"))

