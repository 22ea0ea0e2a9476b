"""Speed features that must not change results: fused attention, ResBlock remat, bfloat16 training."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxdiff.config import default_config
from jaxdiff.models import create_model
from jaxdiff.models import layers
from jaxdiff.models.layers import multi_head_attention, single_head_attention, whole_attention
from jaxdiff.training.diffusion_step import make_train_step
from jaxdiff.training.step import init_train_state, make_optimizer

# One level keeps compile times short and still has every kind of ResBlock (down, mid, up with skip concat).
SMALL = dict(image_size=8, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,))
# XLA's backend optimisation level 0 compiles the train and grad steps severalfold faster; values are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def small_config(**overrides):
    config = default_config()
    for key, value in {**SMALL, **overrides}.items():
        config.model[key] = value
    return config


def np_attention(q, k, v):
    """float64 softmax(q·kᵀ/sqrt(C))·v for [B, N, 1, C] inputs."""
    q, k, v = (np.asarray(a, np.float64)[:, :, 0, :] for a in (q, k, v))
    logits = np.einsum("bic,bjc->bij", q, k) / math.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("bij,bjc->bic", weights, v)[:, :, None, :]


def einsum_attention(q, k, v):
    """The explicit float32 formulation the fused call replaced: einsum logits, softmax, einsum."""
    q, k, v = (a[:, :, 0, :] for a in (q, k, v))
    logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bij,bjc->bic", weights, v)[:, :, None, :]


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def qkv(batch=2, positions=64, channels=96, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(scale * rng.normal(size=(batch, positions, 1, channels)), jnp.float32) for _ in range(3))


# ---------------------------------------------------------------- attention


def test_attention_matches_einsum_formulation_and_float64():
    """scale 3 makes the logits O(10), so the softmax is far from uniform and the scale C^-1/2 matters."""
    q, k, v = qkv()
    with jax.default_matmul_precision("highest"):
        fused = jax.jit(single_head_attention)(q, k, v)
        explicit = jax.jit(einsum_attention)(q, k, v)
    expected = np_attention(q, k, v)
    assert fused.shape == (2, 64, 1, 96) and fused.dtype == jnp.float32
    assert relative_error(fused, explicit) <= 1e-5
    assert relative_error(fused, expected) <= 1e-5
    weights_peak = np.exp(np.einsum("bic,bjc->bij", *(np.asarray(a)[:, :, 0] for a in (q, k))) / math.sqrt(96))
    assert (weights_peak.max(-1) / weights_peak.sum(-1)).mean() > 0.5  # attention is sharp, not an average


def test_attention_gradient_matches_einsum_formulation():
    q, k, v = qkv(channels=32, positions=16, scale=1.0, seed=1)
    cotangent = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent), argnums=(0, 1, 2)))(q, k, v)

    with jax.default_matmul_precision("highest"):
        for fused, explicit in zip(grads(single_head_attention), grads(einsum_attention)):
            assert relative_error(fused, explicit) <= 1e-5


def test_attention_bfloat16_inputs_keep_float32_softmax():
    q, k, v = qkv(scale=1.0, seed=3)
    out = jax.jit(single_head_attention)(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    rel = relative_error(out, np_attention(q, k, v))
    assert 1e-4 < rel < 2e-2  # bf16 input rounding only


def test_chunked_attention_equals_whole_and_float64_with_its_gradient():
    """Queries taken 8 rows at a time (72 blocks of a 576-position sequence, 2 heads, cross-attention over 480 keys:
    score matrices above CPU_HEAD_LOOP_MIN_SCORES) give the whole computation's values and gradients, also for a
    length that is no multiple of the chunk."""
    rng = np.random.default_rng(4)
    q = jnp.asarray(2.0 * rng.normal(size=(2, 576, 2, 16)), jnp.float32)
    k, v = (jnp.asarray(2.0 * rng.normal(size=(2, 480, 2, 16)), jnp.float32) for _ in range(2))
    assert 574 * 480 >= layers.CPU_HEAD_LOOP_MIN_SCORES
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def grads(chunk):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(multi_head_attention(q, k, v, chunk) * cotangent),
                                argnums=(0, 1, 2)))(q, k, v)  # fmt: skip

    with jax.default_matmul_precision("highest"):
        chunked, whole = (jax.jit(multi_head_attention, static_argnums=3)(q, k, v, c) for c in (8, 10**6))
        odd = jax.jit(multi_head_attention, static_argnums=3)(q[:, :574], k, v, 8)  # the last block padded
        for a, b in zip(grads(8), grads(10**6)):
            assert relative_error(a, b) <= 1e-5
    per_head = [np_attention(*(np.asarray(a)[:, :, h : h + 1] for a in (q, k, v))) for h in range(2)]
    assert relative_error(chunked, np.concatenate(per_head, axis=2)) <= 1e-5
    assert relative_error(chunked, whole) <= 1e-6
    assert relative_error(odd, np.asarray(whole)[:, :574]) <= 1e-6


def test_cpu_attention_by_head_equals_the_accelerators_formulation_in_less_memory():
    """On CPU, attention runs one head at a time with queries in blocks; `whole_attention` gives XLA's whole
    computation (jax.nn.dot_product_attention, as on accelerators). Values and gradients agree; the blocked program's
    temporaries are a fraction of the whole [B, heads, N, M] scores (2·4·600·500 floats, 9.2 MiB), and the
    module's setting is restored after the context, also when it raises. Score matrices smaller than
    CPU_HEAD_LOOP_MIN_SCORES are computed whole."""
    rng = np.random.default_rng(7)
    q = jnp.asarray(2.0 * rng.normal(size=(2, 600, 4, 8)), jnp.float32)  # 600 queries: blocks of 64, the last padded
    k, v = (jnp.asarray(2.0 * rng.normal(size=(2, 500, 4, 8)), jnp.float32) for _ in range(2))
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def run(chunk):
        forward = jax.jit(lambda q, k, v: multi_head_attention(q, k, v, chunk))
        loss = lambda q, k, v: jnp.sum(multi_head_attention(q, k, v, chunk) * cotangent)  # noqa: E731
        temp = forward.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
        return forward(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v), temp

    with jax.default_matmul_precision("highest"):
        blocked, blocked_grads, blocked_temp = run(64)
        with whole_attention():
            whole, whole_grads, whole_temp = run(None)
    per_head = [np_attention(*(np.asarray(a)[:, :, h : h + 1] for a in (q, k, v))) for h in range(4)]
    assert relative_error(blocked, np.concatenate(per_head, axis=2)) <= 1e-6
    assert relative_error(blocked, whole) <= 1e-6
    for a, b in zip(blocked_grads, whole_grads):
        assert relative_error(a, b) <= 1e-5
    assert whole_temp >= 2 * 4 * 600 * 500 * 4 > 4 * blocked_temp
    short = jax.make_jaxpr(lambda q, k, v: multi_head_attention(q, k, v, 64))(q, k[:, :400], v[:, :400])
    assert "scan" not in str(short) and "scan" in str(jax.make_jaxpr(multi_head_attention)(q, k, v))
    assert layers.QUERY_CHUNK == 512
    with pytest.raises(RuntimeError), whole_attention():
        raise RuntimeError
    assert layers.QUERY_CHUNK == 512


# ---------------------------------------------------------------- remat


@pytest.fixture(scope="module")
def remat_pair():
    """(plain model, remat model, params, x, t) of the small U-Net with dropout on."""
    plain = create_model(small_config().model)
    remat = create_model(small_config(remat=True).model)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.uniform(-1, 1, size=(2, 8, 8, 3)), jnp.float32)
    t = jnp.asarray([3, 700], jnp.int32)
    init = jax.jit(plain.init).lower(jax.random.key(0), x, t).compile(FAST_COMPILE)
    params = jax.tree.map(lambda p: p + 0.05 * jnp.sign(p + 1e-3), init(jax.random.key(0), x, t)["params"])
    return plain, remat, params, x, t


def test_create_model_reads_remat():
    assert create_model(small_config(remat=True).model).remat is True
    assert create_model(small_config().model).remat is False


def test_remat_keeps_the_parameter_tree(remat_pair):
    plain, remat, _, x, t = remat_pair
    shapes = [jax.eval_shape(m.init, jax.random.key(0), x, t)["params"] for m in (plain, remat)]
    flat = [
        {jax.tree_util.keystr(path): (leaf.shape, leaf.dtype) for path, leaf in jax.tree_util.tree_leaves_with_path(s)}
        for s in shapes
    ]
    assert flat[0] == flat[1]
    assert "['mid']['block_1']['conv1']['kernel']" in flat[1] and "['up_0']['block_1']['nin_shortcut']['bias']" in flat[1]


def test_remat_gives_identical_outputs_and_gradients(remat_pair):
    plain, remat, params, x, t = remat_pair
    target = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)

    def loss_and_grad(model):
        def loss(p):
            out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(7)})
            return jnp.mean((out - target) ** 2), out

        return jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params).compile(FAST_COMPILE)(params)

    (loss_a, out_a), grads_a = loss_and_grad(plain)
    (loss_b, out_b), grads_b = loss_and_grad(remat)
    # Equal up to float32 rounding (the recomputed graph is fused differently): ~1e-6 relative.
    assert relative_error(out_b, out_a) <= 1e-5
    np.testing.assert_allclose(np.asarray(out_b), np.asarray(out_a), rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-5)
    norm = float(optax.tree_utils.tree_norm(grads_a))
    assert norm > 0
    difference = jax.tree.map(jnp.subtract, grads_b, grads_a)
    assert float(optax.tree_utils.tree_norm(difference)) <= 1e-5 * norm
    # Per leaf, relative to the whole gradient: biases feeding a GroupNorm have (near-)zero gradients.
    for path, leaf in jax.tree_util.tree_leaves_with_path(difference):
        assert float(jnp.abs(leaf).max()) <= 1e-5 * norm, jax.tree_util.keystr(path)


def test_remat_must_be_a_bool():
    model_config = ml_collections.ConfigDict({**small_config().model.to_dict(), "remat": 1})
    with pytest.raises(ValueError, match="remat=1"):
        create_model(model_config)


# ---------------------------------------------------------------- bfloat16 training


def loss_curve(dtype: str, steps: int = 30) -> np.ndarray:
    """Losses of `steps` train steps of the small model on one fixed batch, in compute dtype `dtype`."""
    config = small_config(dtype=dtype, dropout=0.0)
    config.training.batch_size = 8
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 2
    model = create_model(config.model)
    tx = make_optimizer(config.training)
    state = init_train_state(config, model, tx)
    rng = np.random.default_rng(6)
    images = np.repeat(np.repeat(rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8), 2, axis=1), 2, axis=2)
    batch = {"image": jnp.asarray(images), "label": jnp.zeros((8,), jnp.int32)}
    step = jax.jit(make_train_step(config, model, tx)).lower(state, batch).compile(FAST_COMPILE)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype(jnp.float32)}
    return np.asarray(losses)


def test_bfloat16_training_tracks_float32():
    """Same seed, so both runs see the same t and noise each step; bf16 computes, float32 keeps weights and loss."""
    f32, bf16 = loss_curve("float32"), loss_curve("bfloat16")
    assert np.all(np.isfinite(bf16))
    for losses in (f32, bf16):
        assert losses[-10:].mean() < 0.8 * losses[:5].mean()
    assert abs(bf16[-10:].mean() / f32[-10:].mean() - 1) < 0.10
    assert not np.array_equal(f32, bf16)  # bf16 really ran in lower precision
