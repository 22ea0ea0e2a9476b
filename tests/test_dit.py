"""DiT / SiT network (`jaxdiff.models.dit`): the position and timestep embeddings against float64 NumPy formulas,
parameter counts and forward FLOPs of every preset against closed forms and the paper, forward parity with diffusers'
DiTTransformer2DModel on the same random weights (its per-block embedders, and the shared layout when they are
equal), label dropout, bfloat16 compute, remat, and the one-line refusals of bad configs and inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.errors import ConfigError, UsageError
from jaxdiff.models import dit, layers
from jaxdiff.models.networks import create_model
from jaxdiff.models.summary import count_parameters, matmul_flops, model_summary, parameter_shapes
from jaxdiff.readers.dit_checkpoint import dit_model_config, read_diffusers_dit

# The paper (Peebles & Xie 2023): parameters in millions (one per size) and forward Gflops at 256² (latent 32×32×4).
PAPER_TABLE = {
    "S/8": (33, 0.36), "S/4": (33, 1.41), "S/2": (33, 6.06), "B/8": (130, 1.42), "B/4": (130, 5.56),
    "B/2": (130, 23.01), "L/8": (458, 5.01), "L/4": (458, 19.70), "L/2": (458, 80.71), "XL/8": (675, 7.39),
    "XL/4": (675, 29.05), "XL/2": (675, 118.64),
}  # fmt: skip
DIFFUSERS_XL2_PARAMETERS = 749_826_464  # REFERENCE_NEXT.md: diffusers 0.42.1, built on the meta device
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2, num_classes=5)


def relative_error(got, expected) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - expected) / np.linalg.norm(expected))


def numpy_pos_embed(dim: int, grid: int) -> np.ndarray:
    """Float64, one token at a time: token (row r, column c) = [sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)],
    ω_k = 1 / 10000^(k / (dim/4))."""
    quarter = dim // 4
    omega = np.array([1.0 / 10000 ** (k / quarter) for k in range(quarter)])
    out = np.zeros((grid * grid, dim))
    for r in range(grid):
        for c in range(grid):
            out[r * grid + c] = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega),
                                                np.cos(r * omega)])  # fmt: skip
    return out


def closed_form_counts(depth: int, d: int, heads: int, patch: int, *, c=4, size=32, classes=1000, per_block=False):
    """(parameters, forward multiply-adds) of DiT at batch 1: learned σ, the null class row, MLP 4·d."""
    n, m, out = (size // patch) ** 2, 4 * d, 2 * c * patch * patch
    embedders = (256 * d + d + d * d + d) + (classes + 1) * d
    block = (6 * d * d + 6 * d) + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    params = (c * patch * patch * d + d) + embedders * (depth if per_block else 1) + depth * block
    params += (2 * d * d + 2 * d) + (d * out + out)
    macs_block = 6 * d * d + n * (3 * d * d + d * d + 2 * d * m) + 2 * n * n * d  # adaLN, linears, q·kᵀ and a·v
    macs = n * c * patch * patch * d + (256 * d + d * d) * (depth if per_block else 1) + depth * macs_block
    macs += 2 * d * d + n * d * out
    return params, macs


def test_position_embedding_matches_numpy_and_dit_layout():
    for dim, grid in ((16, 4), (64, 3), (1152, 16)):
        np.testing.assert_allclose(dit.sincos_pos_embed_2d(dim, grid), numpy_pos_embed(dim, grid), rtol=0, atol=1e-12)
    # The first half embeds the column: tokens in one column share it, tokens in one row share the second half.
    emb = dit.sincos_pos_embed_2d(16, 4).reshape(4, 4, 16)
    assert np.array_equal(emb[0, :, :8], emb[3, :, :8]) and np.array_equal(emb[:, 1, 8:], emb[:, 2, 8:])
    assert not np.allclose(emb[0, 0, :8], emb[0, 1, :8])
    with pytest.raises(ConfigError, match="divisible by 4"):
        dit.sincos_pos_embed_2d(18, 4)


@pytest.mark.parametrize("freq_shift", [0, 1])
def test_timestep_frequencies_match_numpy(freq_shift):
    t = np.array([0.0, 0.37, 1.0, 17.5, 500.0, 999.0])
    k = np.arange(128, dtype=np.float64)
    args = t[:, None] * np.exp(-np.log(10000.0) * k / (128 - freq_shift))[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    got = np.asarray(dit.timestep_frequencies(jnp.asarray(t, jnp.float32), freq_shift), np.float64)
    # float32 phases: |t·f| <= 999 is rounded to ~6e-5
    np.testing.assert_allclose(got, expected, rtol=0, atol=1.5e-4)
    np.testing.assert_allclose(got[:4], expected[:4], rtol=0, atol=2e-6)


@pytest.mark.parametrize("preset", dit.PRESETS)
def test_parameter_counts_of_every_preset(preset):
    config = dit.preset_config(preset)
    params = count_parameters(parameter_shapes(dit_model_config(config)))
    expected, _ = closed_form_counts(config.depth, config.hidden_size, config.num_heads, config.patch_size)
    assert params == expected
    # The paper gives one count per size; larger patches add up to 0.9 M (patch embedding and output layer).
    assert params / 1e6 == pytest.approx(PAPER_TABLE[preset][0], rel=0.01)


def test_xl2_parameters_and_gflops():
    """DiT-XL/2 at 256²: 674,834,720 parameters (DiT's own count, 675,129,632, adds the 294,912 of its fixed
    pos_embed); the paper's 118.6 "Gflops" are multiply-adds: `gflops` (multiply-add = 2) is twice that."""
    summary = model_summary(dit_model_config(dit.preset_config("XL/2")))
    params, macs = closed_form_counts(28, 1152, 16, 2)
    assert summary["parameters"] == params == 674_834_720
    assert params + 256 * 1152 == 675_129_632
    assert summary["gflops"] * 1e9 == pytest.approx(2 * macs, rel=1e-12)
    assert round(summary["gflops"] / 2, 1) == 118.6
    assert summary["xla_gflops"] == pytest.approx(summary["gflops"], rel=0.01)  # plus elementwise ops


@pytest.mark.parametrize("preset", ["S/8", "B/4", "L/2", "XL/4"])
def test_forward_macs_match_the_paper(preset):
    config = dit.preset_config(preset)
    model, x = dit.create_dit(config), jnp.zeros((1, 32, 32, 4))
    t, y = jnp.ones((1,)), jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
    flops = matmul_flops(jax.make_jaxpr(lambda p: model.apply(p, x, t, y))(shapes))
    _, macs = closed_form_counts(config.depth, config.hidden_size, config.num_heads, config.patch_size)
    assert flops == 2 * macs
    assert macs / 1e9 == pytest.approx(PAPER_TABLE[preset][1], abs=0.015)  # the table's rounding and ~0.01% more


def test_matmul_flops_count_a_loop_of_heads_as_the_whole_attention():
    """Attention of 1,024 tokens runs a head at a time on CPU (`lax.map`): its scan bodies count once per
    iteration, so the count equals the whole attention's, 2 products × 2·N·M·D per head."""
    q = jnp.ones((2, 1024, 3, 8))
    looped = jax.make_jaxpr(lambda q: layers.multi_head_attention(q, q, q))(q)
    with layers.whole_attention():  # a function of its own: JAX reuses the jaxpr of one it has traced
        whole = jax.make_jaxpr(lambda q: layers.multi_head_attention(q, q, q))(q)
    assert "scan" in str(looped) and "scan" not in str(whole)
    assert matmul_flops(looped) == matmul_flops(whole) == 2 * 3 * 2 * (2 * 1024 * 1024 * 8)


def test_diffusers_layout_parameter_count():
    config = dit.preset_config("XL/2", per_block_embedders=True, freq_shift=1, mlp_norm_eps=1e-5)
    params = count_parameters(parameter_shapes(dit_model_config(config)))
    assert params == closed_form_counts(28, 1152, 16, 2, per_block=True)[0] == DIFFUSERS_XL2_PARAMETERS


# --------------------------------------------------------------------------- parity with diffusers


def diffusers_dit(torch, diffusers, *, shared_embedders=False, seed=0, **config):
    """A tiny DiTTransformer2DModel with random weights (std 0.3, so the zero-initialised layers count)."""
    torch.manual_seed(seed)
    settings = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
                    sample_size=8, patch_size=2, num_embeds_ada_norm=5)  # fmt: skip
    model = diffusers.DiTTransformer2DModel(**{**settings, **config})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        if shared_embedders:
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model.double().eval()


def diffusers_forward(torch, model, x, t, y):
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)).double(), torch.from_numpy(t), torch.from_numpy(y))
    return out.sample.numpy().transpose(0, 2, 3, 1)


def our_forward(model_config, params, x, t, y):
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(create_model(model_config).apply)({"params": params}, x, t, y))


def inputs(size=8, channels=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, size, size, channels)).astype(np.float32)
    return x, np.array([0, 17, 500, 999]), np.array([0, 3, 4, 5])  # label 5: the null class


@pytest.mark.parametrize("shared", [False, True])
def test_matches_diffusers(torch, diffusers, tmp_path, shared):
    model = diffusers_dit(torch, diffusers, shared_embedders=shared)
    model.save_pretrained(tmp_path)
    config, params = read_diffusers_dit(tmp_path)
    assert config.dit.per_block_embedders is not shared
    assert ("t_embedder" in params) is shared and ("t_embedder" in params["blocks_1"]) is not shared
    x, t, y = inputs()
    expected = diffusers_forward(torch, model, x, t, y)
    assert relative_error(our_forward(config, params, x, t, y), expected) < 1e-4
    # The class labels matter (the comparison is not blind to them).
    assert relative_error(our_forward(config, params, x, t, np.array([1, 1, 1, 1])), expected) > 1e-2


def test_matches_diffusers_without_learned_sigma(torch, diffusers, tmp_path):
    model = diffusers_dit(torch, diffusers, out_channels=None, patch_size=4, sample_size=16, num_layers=1, norm_eps=0.5)
    model.save_pretrained(tmp_path, safe_serialization=False)  # diffusion_pytorch_model.bin
    config, params = read_diffusers_dit(tmp_path)
    assert (config.out_channels, config.dit.learn_sigma, config.dit.mlp_norm_eps) == (4, False, 0.5)
    x, t, y = inputs(size=16)
    assert relative_error(our_forward(config, params, x, t, y), diffusers_forward(torch, model, x, t, y)) < 1e-4


# --------------------------------------------------------------------------- options


def tiny_network(**overrides):
    config = dit.preset_config("S/2", **{**TINY, **overrides})
    model = dit.create_dit(config)
    x, t, y = inputs()
    params = model.init(jax.random.key(1), x, t, y)["params"]
    # Random values everywhere (DiT zero-initialises the modulation and output layers).
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree_util.tree_unflatten(tree, [0.3 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
    return model, params, (x, t, y)


def test_label_dropout_at_train_time():
    model, params, (x, t, y) = tiny_network(class_dropout_prob=0.5)
    apply = jax.jit(model.apply, static_argnames="train")
    null = np.full_like(y, TINY["num_classes"])
    conditional, unconditional = (np.asarray(apply({"params": params}, x, t, labels)) for labels in (y, null))
    np.testing.assert_array_equal(np.asarray(apply({"params": params}, x, t, None)), unconditional)
    dropped = []
    for seed in range(4):
        out = np.asarray(apply({"params": params}, x, t, y, train=True, rngs={"dropout": jax.random.key(seed)}))
        for i in range(len(y)):
            is_null = np.allclose(out[i], unconditional[i], rtol=0, atol=1e-6)
            assert is_null or np.allclose(out[i], conditional[i], rtol=0, atol=1e-6)
            dropped.append(is_null)
    assert 0 < sum(dropped) < len(dropped)  # 16 draws at p = 0.5
    assert not np.allclose(conditional, unconditional)


def test_sit_output_drops_the_sigma_channels():
    model, params, (x, t, y) = tiny_network()
    sit = dit.create_dit(dit.preset_config("S/2", **TINY, output_sigma=False))
    full = np.asarray(model.apply({"params": params}, x, t, y))
    assert full.shape == (4, 8, 8, 8) and sit.out_channels == 4
    np.testing.assert_array_equal(np.asarray(sit.apply({"params": params}, x, t, y)), full[..., :4])


def test_bfloat16_compute_and_remat():
    model, params, (x, t, y) = tiny_network()
    reference = np.asarray(jax.jit(model.apply)({"params": params}, x, t, y))
    bf16 = dit.create_dit(dit.preset_config("S/2", **TINY, dtype="bfloat16"))
    out = jax.jit(bf16.apply)({"params": params}, x, t, y)
    assert out.dtype == jnp.float32 and 1e-4 < relative_error(out, reference) < 3e-2

    remat = dit.create_dit(dit.preset_config("S/2", **TINY, remat=True))

    def loss(net, p):
        return jnp.mean(net.apply({"params": p}, x, t, y) ** 2)

    assert jax.tree_util.tree_structure(remat.init(jax.random.key(1), x, t, y)) == jax.tree_util.tree_structure(
        {"params": params})  # fmt: skip
    got, want = (jax.jit(jax.grad(lambda p, net=net: loss(net, p)))(params) for net in (remat, model))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


def test_initialisation_is_dit_adaln_zero():
    """Zero modulation and output layers: a fresh DiT outputs zeros, whatever its input."""
    model = dit.create_dit(dit.preset_config("S/2", **TINY))
    x, t, y = inputs()
    params = model.init(jax.random.key(0), x, t, y)["params"]
    assert not np.any(np.asarray(model.apply({"params": params}, x, t, y)))
    assert np.asarray(params["blocks_0"]["attn"]["qkv"]["kernel"]).std() > 0.1
    assert np.asarray(params["y_embedder"]["embedding_table"]["embedding"]).std() == pytest.approx(0.02, rel=0.3)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(input_size=30, patch_size=4), "input_size=30 is not divisible by patch_size=4"),
        (dict(hidden_size=18, num_heads=3), "hidden_size=18 must be divisible by 4"),
        (dict(hidden_size=16, num_heads=3), "hidden_size=16 does not split into num_heads=3 heads"),
        (dict(learn_sigma=False, output_sigma=False), "output_sigma=False"),
        (dict(dtype="float16"), "dtype='float16' is not one of"),
        (dict(attention="cudnn"), "attention='cudnn' needs dtype='bfloat16'"),
        (dict(class_dropout_prob=1.0), "class_dropout_prob=1.0 must be a number in [0, 1)"),
        (dict(freq_shift=128), "freq_shift=128 must be below 128"),
    ],
)
def test_bad_config_is_one_line(overrides, message):
    model_config = dit_model_config(dit.preset_config("S/2", **TINY))
    model_config.dit.update(overrides)
    with pytest.raises(ConfigError) as err:
        create_model(model_config)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_preset_and_key_are_one_line():
    for call, message in [
        (lambda: dit.preset_config("XXL/2"), "unknown DiT preset 'XXL/2'; expected one of ('S/2',"),
        (lambda: dit.preset_config("DiT-B/3"), "unknown DiT preset 'DiT-B/3'"),
        (lambda: dit.preset_config("B/2", depht=3), "unknown DiT config keys ['depht']"),
    ]:
        with pytest.raises(ConfigError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value)
    assert dit.preset_config("SiT-B/4").to_dict() == dit.preset_config("DiT-B/4").to_dict()
    assert (dit.preset_config("B/4").depth, dit.preset_config("B/4").patch_size) == (12, 4)


def test_bad_inputs_are_one_line():
    model, params, (x, t, y) = tiny_network()
    for args, message in [
        ((x[:, :4], t, y), "x must be a float array of shape [B, 8, 8, 4]"),
        ((x, t[:2], y), "labels (timesteps) must be numbers of shape [4]"),
        ((x, t, y.astype(np.float32)), "class_labels must be an int array of shape [4]"),
    ]:
        with pytest.raises(UsageError) as err:
            model.apply({"params": params}, *args)
        assert message in str(err.value) and "\n" not in str(err.value)
    unconditional = dit.create_dit(dit.preset_config("S/2", **{**TINY, "num_classes": 0}))
    with pytest.raises(UsageError, match="num_classes=0"):
        unconditional.init(jax.random.key(0), x, t, y)
    no_null = dit.create_dit(dit.preset_config("S/2", **TINY, class_dropout_prob=0.0))
    with pytest.raises(UsageError, match="no null class"):
        no_null.init(jax.random.key(0), x, t, None)
