"""The CPU convolutions of `jaxdiff.models.cpu_conv` (small ones as one im2col GEMM, and the optional shifted-GEMM
weight gradient) against a float64 NumPy convolution and against XLA's own convolution and VJP, at the strides and
paddings the U-Nets use."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxdiff.models import cpu_conv
from jaxdiff.models.layers import Downsample, ResBlock
from jaxdiff.models.summary import matmul_flops

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def forms_at_every_size(monkeypatch):
    """The CPU forms at shapes small enough to run here: below CPU_FORM_MIN_MACS they would keep XLA's kernel
    (`test_small_convolutions_keep_xla_below_the_floor` tests the floor itself)."""
    monkeypatch.setattr(cpu_conv, "CPU_FORM_MIN_MACS", 0)


def numpy_conv_and_grads(x, kernel, g, strides, pads):
    """float64 (y, ∂L/∂x, ∂L/∂kernel) of y = conv(x, kernel) and L = Σ y·g, by explicit window sums."""
    x, kernel, g = (np.asarray(a, np.float64) for a in (x, kernel, g))
    (sh, sw), ((top, bottom), (left, right)) = strides, pads
    x_pad = np.pad(x, ((0, 0), (max(top, 0), max(bottom, 0)), (max(left, 0), max(right, 0)), (0, 0)))
    x_pad = x_pad[:, max(-top, 0) : x_pad.shape[1] - max(-bottom, 0), max(-left, 0) : x_pad.shape[2] - max(-right, 0)]
    kh, kw = kernel.shape[:2]
    ho, wo = (x_pad.shape[1] - kh) // sh + 1, (x_pad.shape[2] - kw) // sw + 1
    y = np.zeros((x.shape[0], ho, wo, kernel.shape[3]))
    dx_pad, dk = np.zeros_like(x_pad), np.zeros_like(kernel)
    for i in range(kh):
        for j in range(kw):
            rows, cols = slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw)
            y += np.einsum("bpqc,co->bpqo", x_pad[:, rows, cols], kernel[i, j])
            dk[i, j] = np.einsum("bpqc,bpqo->co", x_pad[:, rows, cols], g)
            dx_pad[:, rows, cols] += np.einsum("bpqo,co->bpqc", g, kernel[i, j])
    full = np.zeros((x.shape[0], x.shape[1] + top + bottom, x.shape[2] + left + right, x.shape[3]))
    full[:, : dx_pad.shape[1], : dx_pad.shape[2]] = dx_pad  # crop margins are zero-gradient rows
    dx = full[:, top : top + x.shape[1], left : left + x.shape[2]] if min(top, left) >= 0 else None
    return y, dx, dk


CASES = [
    # (x shape, kernel shape, strides, padding as nn.Conv passes it); all but the 20×20 one are GEMMs on CPU
    ((2, 8, 8, 3), (3, 3, 3, 5), (1, 1), "SAME"),
    ((2, 20, 20, 3), (3, 3, 3, 4), (1, 1), "SAME"),  # 800 output rows: XLA's convolution
    ((2, 9, 7, 6), (1, 1, 6, 5), (1, 1), "VALID"),  # 1×1: a matmul over channels
    ((2, 8, 8, 4), (3, 3, 4, 4), (2, 2), "SAME"),  # TF SAME: pad 0 before, 1 after
    ((2, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),  # PyTorch padding 1
    ((3, 7, 5, 2), (3, 3, 2, 3), (2, 2), "SAME"),  # odd sizes
    ((1, 6, 6, 2), (3, 3, 2, 2), (1, 1), "VALID"),
]


@pytest.mark.parametrize("shifted_weight_gradient", ["0", "1"])
@pytest.mark.parametrize("x_shape, kernel_shape, strides, padding", CASES)
def test_values_and_gradients_match_float64_and_xla(x_shape, kernel_shape, strides, padding, shifted_weight_gradient,
                                                    monkeypatch):  # fmt: skip
    monkeypatch.setenv(cpu_conv.ENV_VAR, shifted_weight_gradient)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    kernel = rng.standard_normal(kernel_shape).astype(np.float32)
    y_native = lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)
    g = rng.standard_normal(y_native.shape).astype(np.float32)
    pads = lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], strides, padding) if isinstance(padding, str) else padding
    y_ref, dx_ref, dk_ref = numpy_conv_and_grads(x, kernel, g, strides, pads)

    def grads(conv):
        y, vjp = jax.vjp(lambda x_, k_: conv(x_, k_, strides, padding, dimension_numbers=NHWC), x, kernel)
        return (y, *vjp(g))

    y, dx, dk = jax.jit(lambda: grads(cpu_conv.conv_general_dilated))()
    _, dx_native, dk_native = jax.jit(lambda: grads(lax.conv_general_dilated))()
    scale = np.abs(dk_ref).max()
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * np.abs(y_ref).max())
    np.testing.assert_allclose(dk, dk_ref, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(dk, dk_native, rtol=0, atol=2e-5 * scale)
    np.testing.assert_allclose(dx, dx_native, rtol=0, atol=1e-6 * np.abs(dx_native).max())
    if dx_ref is not None:
        np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-5 * np.abs(dx_ref).max())


def _convolutions(fn, *args) -> int:
    return jax.jit(fn).lower(*args).as_text().count("stablehlo.convolution")


@pytest.mark.parametrize(
    "x_shape, kernel_shape, strides, gemm",
    [
        ((2, 16, 16, 4), (3, 3, 4, 4), (1, 1), True),  # 512 output rows
        ((3, 16, 16, 4), (3, 3, 4, 4), (1, 1), False),  # 768
        ((2, 32, 32, 4), (3, 3, 4, 4), (2, 2), True),  # stride 2: 2 · 16 · 16 = 512 output rows
        ((8, 32, 32, 4), (1, 1, 4, 4), (1, 1), True),  # 1×1 at any size
        ((8, 32, 32, 4), (1, 1, 4, 4), (2, 2), False),  # 1×1 with a stride: 2,048 rows
    ],
)
def test_the_cpu_backend_takes_the_gemm_for_small_outputs_and_1x1(x_shape, kernel_shape, strides, gemm):
    x, kernel = jnp.ones(x_shape), jnp.ones(kernel_shape)

    def conv(x, k):
        return cpu_conv.conv_general_dilated(x, k, strides, "SAME", dimension_numbers=NHWC)

    assert _convolutions(conv, x, kernel) == (0 if gemm else 1)
    with cpu_conv.xla_convolutions():
        assert _convolutions(lambda x, k: conv(x, k), x, kernel) == 1  # a fresh function: traced anew
    assert cpu_conv.CPU_FORMS is True
    with pytest.raises(RuntimeError), cpu_conv.xla_convolutions():
        raise RuntimeError
    assert cpu_conv.CPU_FORMS is True
    flops = matmul_flops(jax.make_jaxpr(conv)(x, kernel))  # the CPU's GEMM or the accelerators' convolution: one
    out = conv(x, kernel)
    assert flops == 2 * out.size * math.prod(kernel_shape[:3])


@pytest.mark.parametrize("x_shape, band_rows", [((2, 8, 6, 3), 8), ((2, 24, 10, 4), 8), ((1, 12, 4, 5), 4)])
def test_winograd_matches_float64_and_xla_with_gradients(x_shape, band_rows):
    """F(2×2, 3×3) in one band and in several (the band loop), values against float64 and gradients against XLA's VJP."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(x_shape).astype(np.float32)
    kernel = rng.standard_normal((3, 3, x_shape[3], 5)).astype(np.float32)
    g = rng.standard_normal((*x_shape[:3], 5)).astype(np.float32)
    y_ref, dx_ref, dk_ref = numpy_conv_and_grads(x, kernel, g, (1, 1), ((1, 1), (1, 1)))
    y, vjp = jax.vjp(lambda x_, k_: cpu_conv.winograd_conv(x_, k_, band_rows), x, kernel)
    dx, dk = vjp(g)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=2e-6 * np.abs(y_ref).max())
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=2e-6 * np.abs(dx_ref).max())
    np.testing.assert_allclose(dk, dk_ref, rtol=0, atol=2e-6 * np.abs(dk_ref).max())
    with pytest.raises(ValueError, match="winograd_conv needs a 3x3 kernel"):
        cpu_conv.winograd_conv(x, kernel, band_rows=5)


@pytest.mark.parametrize(
    "x_shape, kernel_shape, strides, padding, form",
    [
        ((1, 64, 64, 256), (3, 3, 256, 8), (1, 1), "SAME", "winograd"),  # 4,096 pixels, 2^20 input values
        ((2, 96, 96, 128), (3, 3, 128, 8), (1, 1), ((1, 1), (1, 1)), "winograd"),
        ((4, 64, 64, 128), (3, 3, 128, 8), (1, 1), "SAME", "xla"),  # too few values per image
        ((64, 32, 32, 1024), (3, 3, 1024, 8), (1, 1), "SAME", "xla"),  # too few pixels per image
        ((1, 136, 136, 256), (3, 3, 256, 8), (1, 1), "SAME", "xla"),  # rows not a multiple of the band
        ((1, 256, 256, 256), (3, 3, 256, 8), (2, 2), "SAME", "xla"),  # stride 2
        ((1, 16, 16, 256), (3, 3, 256, 8), (1, 1), "SAME", "gemm"),
    ],
)
def test_the_cpu_form_of_each_convolution(x_shape, kernel_shape, strides, padding, form):
    """`cpu_form`'s choice, and the lowered CPU program holds a convolution only where it is XLA's (shapes only)."""
    pads = lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], strides, padding) if isinstance(padding, str) else padding
    assert cpu_conv.cpu_form(x_shape, kernel_shape, strides, pads) == form
    with cpu_conv.xla_convolutions():
        assert cpu_conv.cpu_form(x_shape, kernel_shape, strides, pads) == "xla"
    shapes = (jax.ShapeDtypeStruct(x_shape, jnp.float32), jax.ShapeDtypeStruct(kernel_shape, jnp.float32))
    conv = lambda x, k: cpu_conv.conv_general_dilated(x, k, strides, padding, dimension_numbers=NHWC)  # noqa: E731
    assert _convolutions(conv, *shapes) == (1 if form == "xla" else 0)


# SD 1.5's U-Net at 512² (batch 2, the guided step): its least costly convolutions, the 1×1 ones at 8×8, and the
# 3×3 ones there; the VAE decoder's 3×3 at 64² (batch 1). (size, channels in, channels out, kernel, batch)
SD15_SMALLEST = [(8, 1280, 1280, 1, 2), (8, 1280, 1280, 3, 2), (8, 2560, 1280, 1, 2), (64, 512, 512, 3, 1)]


def test_small_convolutions_keep_xla_below_the_floor(monkeypatch):
    """At the default floor a tiny model's convolutions are XLA's on CPU, and SD 1.5's least costly ones take the
    form they take without a floor (so the floor costs SD nothing)."""
    monkeypatch.undo()
    assert cpu_conv.CPU_FORM_MIN_MACS == 10**8
    tiny = [((2, 16, 16, 64), (3, 3, 64, 64)), ((2, 8, 8, 128), (1, 1, 128, 128)), ((8, 4, 4, 256), (3, 3, 256, 256))]
    for x_shape, kernel_shape in tiny:
        assert cpu_conv.cpu_form(x_shape, kernel_shape, (1, 1), ((1, 1),) * 2) == "xla"
        x, kernel = jnp.ones(x_shape), jnp.ones(kernel_shape)
        conv = lambda x, k: cpu_conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC)  # noqa: E731
        assert _convolutions(conv, x, kernel) == 1
    picked = {}
    for floor in (cpu_conv.CPU_FORM_MIN_MACS, 0):
        monkeypatch.setattr(cpu_conv, "CPU_FORM_MIN_MACS", floor)
        picked[floor] = [
            cpu_conv.cpu_form((batch, size, size, c_in), (k, k, c_in, c_out), (1, 1), ((k // 2, k // 2),) * 2)
            for size, c_in, c_out, k, batch in SD15_SMALLEST
        ]
    assert picked[10**8] == picked[0] == ["gemm", "gemm", "gemm", "winograd"]
    assert 2 * 8 * 8 * 1280 * 1280 >= 2 * cpu_conv.CPU_FORM_MIN_MACS  # the least costly: twice the floor


def test_winograd_forward_keeps_xla_convolutions_for_its_gradients():
    """A Winograd-sized convolution: the forward holds no convolution, its gradient program XLA's two (input and
    weight gradients), and the gradients equal XLA's own (shapes small enough to run: 2 × 64 × 64 × 256)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((1, 64, 64, 256)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 256, 4)) * 0.05, jnp.float32)
    assert cpu_conv.cpu_form(x.shape, kernel.shape, (1, 1), ((1, 1), (1, 1))) == "winograd"

    def loss(conv, x, k):
        return jnp.sum(jnp.sin(conv(x, k, (1, 1), "SAME", dimension_numbers=NHWC)))

    ours = jax.grad(lambda x, k: loss(cpu_conv.conv_general_dilated, x, k), argnums=(0, 1))
    theirs = jax.grad(lambda x, k: loss(lax.conv_general_dilated, x, k), argnums=(0, 1))
    assert _convolutions(ours, x, kernel) == 2 and _convolutions(theirs, x, kernel) == 3
    for a, b in zip(jax.jit(ours)(x, kernel), jax.jit(theirs)(x, kernel)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())


def test_the_cpu_weight_gradient_is_gemms_not_a_convolution(monkeypatch):
    """With the switch on, the gradient program holds one convolution (the input gradient) besides the forward,
    at outputs of 8×8 pixels whose 16 images are too many rows for the forward GEMM."""
    x, kernel = jnp.ones((16, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    monkeypatch.setenv(cpu_conv.ENV_VAR, "1")

    def loss(conv, k):
        return jnp.sum(conv(x, k, (1, 1), "SAME", dimension_numbers=NHWC) ** 2)

    def convolutions(conv):
        return _convolutions(jax.grad(lambda k: loss(conv, k)), kernel)

    assert convolutions(lax.conv_general_dilated) == 2  # forward + weight gradient
    assert convolutions(cpu_conv.conv_general_dilated) == 1  # forward; weight gradient by dot_general
    assert "dot_general" in jax.jit(jax.grad(lambda k: loss(cpu_conv.conv_general_dilated, k))).lower(kernel).as_text()


def test_large_maps_keep_xla_weight_gradient_and_forward_mode_works(monkeypatch):
    monkeypatch.setenv(cpu_conv.ENV_VAR, "1")
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 16, 16, 2)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 2, 3)), jnp.float32)
    conv = lambda k: cpu_conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC)  # noqa: E731
    native = lambda k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC)  # noqa: E731
    text = jax.jit(jax.grad(lambda k: jnp.sum(conv(k) ** 2))).lower(kernel).as_text()
    assert 16 * 16 > cpu_conv.GEMM_MAX_OUTPUT_PIXELS and text.count("stablehlo.convolution") == 2
    direction = jnp.ones_like(kernel)
    np.testing.assert_allclose(jax.jvp(conv, (kernel,), (direction,))[1], jax.jvp(native, (kernel,), (direction,))[1],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    small = lambda k: cpu_conv.conv_general_dilated(x[:, :8, :8], k, (1, 1), "SAME", dimension_numbers=NHWC)  # noqa: E731
    expected = lax.conv_general_dilated(x[:, :8, :8], direction, (1, 1), "SAME", dimension_numbers=NHWC)
    np.testing.assert_allclose(jax.jvp(small, (kernel,), (direction,))[1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shifted_weight_gradient", ["0", "1"])
def test_bfloat16_weight_gradient(shifted_weight_gradient, monkeypatch):
    monkeypatch.setenv(cpu_conv.ENV_VAR, shifted_weight_gradient)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 4, 4)).astype(np.float32)
    g = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    as_bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    conv = lambda x_, k_: cpu_conv.conv_general_dilated(x_, k_, (1, 1), "SAME", dimension_numbers=NHWC)  # noqa: E731
    dk = jax.vjp(conv, as_bf16(x), as_bf16(kernel))[1](as_bf16(g))[1]
    quantised = [np.asarray(as_bf16(a), np.float64) for a in (x, kernel, g)]
    _, _, dk_ref = numpy_conv_and_grads(*quantised, (1, 1), ((1, 1), (1, 1)))
    assert dk.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dk, np.float64), dk_ref, rtol=0, atol=1e-2 * np.abs(dk_ref).max())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rhs_dilation": (2, 2)}, "rhs_dilation=(2, 2)"),
        ({"lhs_dilation": (2, 1)}, "lhs_dilation=(2, 1)"),
        ({"feature_group_count": 2}, "feature_group_count=1 only, got 2"),
        ({"dimension_numbers": ("NCHW", "OIHW", "NCHW")}, "NHWC·HWIO"),
    ],
)
def test_unsupported_convolutions_are_refused(kwargs, message):
    kwargs = {"dimension_numbers": NHWC, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        cpu_conv.conv_general_dilated(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4)), (1, 1), "SAME", **kwargs)


def test_the_switch_reads_only_0_or_1_and_defaults_off(monkeypatch):
    monkeypatch.setenv(cpu_conv.ENV_VAR, "yes")
    with pytest.raises(ValueError, match="JAXDIFF_CPU_CONV_WGRAD='yes' must be 0 or 1"):
        cpu_conv.enabled()
    monkeypatch.setenv(cpu_conv.ENV_VAR, "1")
    assert cpu_conv.enabled()
    monkeypatch.delenv(cpu_conv.ENV_VAR)
    assert not cpu_conv.enabled()


class _Blocks(nn.Module):
    """A ResBlock (two 3×3 convolutions, a 1×1 shortcut) then a stride-2 convolutional Downsample."""

    @nn.compact
    def __call__(self, x, temb):
        return Downsample(with_conv=True)(ResBlock(out_ch=8, dropout=0.0, num_groups=4)(x, temb, train=False))


def test_the_switched_layers_have_the_same_parameters_and_gradients(monkeypatch):
    """16 images of 8×8: the ResBlock's convolutions are XLA's (1,024 rows), the 4×4 Downsample's a GEMM."""
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 8, 8, 4))
    temb = jax.random.normal(jax.random.PRNGKey(2), (16, 16))

    @jax.jit
    def params_and_grads():
        model = _Blocks()
        params = model.init(jax.random.PRNGKey(0), x, temb)["params"]
        grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, temb) ** 2))(params)
        return params, grads

    def convolutions():
        return params_and_grads.lower().as_text().count("stablehlo.convolution")

    monkeypatch.setenv(cpu_conv.ENV_VAR, "0")
    params, grads = params_and_grads()
    native_convolutions = convolutions()
    monkeypatch.setenv(cpu_conv.ENV_VAR, "1")
    params_and_grads.clear_cache()
    params_switched, grads_switched = params_and_grads()
    assert convolutions() == native_convolutions - 2  # the two weight gradients became GEMMs
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(params_switched)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_switched)
    for native, switched in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_switched)):
        np.testing.assert_allclose(switched, native, rtol=0, atol=1e-5 * np.abs(native).max())
