"""LoRA adapters on a Stable Diffusion pipeline: kohya files and the older diffusers key formats checked against
W + (alpha / r)·up @ down computed here in float64 NumPy; load / scale / fuse / unfuse semantics (unfuse gives the
original arrays back bitwise); every refusal in one line, the pipeline unchanged after it; `sample --lora`; and
against diffusers' `load_lora_weights` (peft adapters saved by `save_lora_weights`) at scales 1 and 0.5 and with
two adapters at once (skipped without torch)."""

import json
import types

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxdiff import cli
from jaxdiff.diffusion.scheduler_config import scheduler_settings
from jaxdiff.errors import MissingWeightsError, UsageError, WeightsError
from jaxdiff.latent.bundle import LatentModels
from jaxdiff.latent.pipeline import LatentPipeline
from jaxdiff.latent.pipeline_base import PipelineBase
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.models.clip_text import clip_text_config, create_clip_text
from jaxdiff.models.unet_condition import create_unet_condition
from jaxdiff.models.unet_condition_config import config_from_diffusers

UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[8, 16], norm_num_groups=4,
    layers_per_block=1, cross_attention_dim=32, attention_head_dim=2,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
    norm_num_groups=4, sample_size=16, down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
)  # fmt: skip
CLIP = dict(vocab_size=526, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=524, eos_token_id=525, pad_token_id=525)  # fmt: skip
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)  # fmt: skip
PROMPTS = ["hello the cat", "the cat of hello!!"]
ATTENTION = "down_blocks.0.attentions.0.transformer_blocks.0"
# (kohya module name, our parameter path, rank, alpha or None): a dense layer, a LoCon 3×3 conv with a 1×1 up,
# a 1×1 conv without alpha, two text-encoder layers.
KOHYA_MODULES = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     ("unet", "down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel"), 4, 3.0),
    ("lora_unet_down_blocks_0_resnets_0_conv1", ("unet", "down_blocks_0", "resnets_0", "conv1", "kernel"), 2, 1.0),
    ("lora_unet_up_blocks_1_attentions_0_proj_in",
     ("unet", "up_blocks_1", "attentions_0", "proj_in", "kernel"), 3, None),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
     ("text", "encoder", "layers_0", "self_attn", "q_proj", "kernel"), 2, 8.0),
    ("lora_te_text_model_encoder_layers_1_mlp_fc1", ("text", "encoder", "layers_1", "mlp", "fc1", "kernel"), 5, 2.5),
]  # fmt: skip


def _tokenizer(prompts):
    """Token ids from the prompts' characters (the text encoder sees different ids per prompt)."""
    ids = np.full((len(prompts), 77), 525, np.int32)
    for row, prompt in enumerate(prompts):
        codes = [524] + [ord(c) % 500 for c in prompt][:75] + [525]
        ids[row, : len(codes)] = codes
    return types.SimpleNamespace(input_ids=ids)


def _random_params(model, rng, *inputs):
    """Random float32 parameters of `model` (shapes traced, never initialised: norm scales about 1, the rest
    about N(0, 0.1²))."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]
    flat = flax.traverse_util.flatten_dict(shapes)
    values = {path: (path[-1] == "scale") + 0.1 * rng.standard_normal(leaf.shape) for path, leaf in flat.items()}
    return flax.traverse_util.unflatten_dict({path: value.astype(np.float32) for path, value in values.items()})


@pytest.fixture(scope="module")
def models():
    """A tiny random SD 1.x bundle built in JAX (no torch): U-Net, autoencoder and CLIP text encoder."""
    rng = np.random.default_rng(0)
    unet_config, vae_config, text_config = config_from_diffusers(UNET), autoencoder_config(VAE), clip_text_config(CLIP)
    unet = _random_params(create_unet_condition(unet_config), rng, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                          jnp.zeros((1, 1, 32)))  # fmt: skip
    vae = _random_params(create_autoencoder(vae_config), rng, jnp.zeros((1, 16, 16, 3)))
    text = _random_params(create_clip_text(text_config), rng, jnp.zeros((1, 1), jnp.int32))
    return LatentModels(
        unet_config=unet_config, unet_params=unet, vae_config=vae_config, vae_params=vae, text_config=text_config,
        text_params=text, tokenizer=_tokenizer, scheduler=scheduler_settings(SCHEDULER, "test"),
    )  # fmt: skip


@pytest.fixture()
def pipe(models):
    return LatentPipeline(models)


def _leaf(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def _factors(rng, rank, weight_shape):
    """Random (down, up) in PyTorch layout for a weight of our shape: dense [in, out] or conv HWIO."""
    if len(weight_shape) == 2:
        fan_in, fan_out = weight_shape
        return rng.standard_normal((rank, fan_in)), rng.standard_normal((fan_out, rank))
    kh, kw, fan_in, fan_out = weight_shape
    return rng.standard_normal((rank, fan_in, kh, kw)), rng.standard_normal((fan_out, rank, 1, 1))


def _expected(weight, down, up, scale):
    """float64 W + scale·ΔW in our layout, ΔW = up @ down over the rank in PyTorch layout, written out."""
    weight = np.asarray(weight, np.float64)
    if down.ndim == 2:
        return weight + scale * (up @ down).T  # [out, in] -> [in, out]
    delta = np.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
    return weight + scale * delta.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def write_kohya(path, models, seed=0, factor=0.05):
    """A kohya file over KOHYA_MODULES; returns {our path: (down, up, alpha / rank)} (float64)."""
    rng = np.random.default_rng(seed)
    params = {"unet": models.unet_params, "text": models.text_params}
    tensors, expected = {}, {}
    for name, param_path, rank, alpha in KOHYA_MODULES:
        down, up = _factors(rng, rank, _leaf(params, param_path).shape)
        down, up = (factor * a.astype(np.float32) for a in (down, up))
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)
        expected[param_path] = (down.astype(np.float64), up.astype(np.float64), 1.0 if alpha is None else alpha / rank)
    safetensors.numpy.save_file(tensors, str(path))
    return expected


def _snapshot(pipe):
    return jax.tree_util.tree_leaves(pipe.params), dict(pipe.lora_scales)


def _assert_unchanged(pipe, snapshot):
    leaves, scales = snapshot
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(pipe.params), leaves, strict=True))
    assert pipe.lora_scales == scales


def _images(pipe, steps=2):
    noise = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    return pipe.text_to_image(PROMPTS, steps=steps, guidance=3.0, latents=noise, output_type="float")


# --------------------------------------------------------------------------- kohya against float64 NumPy


def test_kohya_fused_weights_match_numpy(tmp_path, pipe, models):
    expected = write_kohya(tmp_path / "k.safetensors", models)
    originals = jax.tree_util.tree_leaves(pipe.params)
    assert pipe.load_lora(tmp_path / "k.safetensors", scale=0.7) == "default_0"
    pipe.fuse_lora()
    adapted = 0
    for path, (down, up, file_scale) in expected.items():
        weight = _leaf({"unet": models.unet_params, "text": models.text_params}, path)
        want = _expected(weight, down, up, 0.7 * file_scale)
        got = np.asarray(_leaf(pipe.params, path))
        assert got.dtype == np.float32
        assert np.abs(want - np.asarray(weight, np.float64)).max() > 1e-3  # the adapter changes the weight
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        adapted += 1
    assert adapted == len(KOHYA_MODULES)
    # Every other weight is the original array itself.
    flat = flax.traverse_util.flatten_dict(pipe.params)
    unchanged = [p for p in flat if p not in expected]
    assert all(flat[p] is flax.traverse_util.flatten_dict(pipe._lora_originals)[p] for p in unchanged)
    pipe.unfuse_lora()
    leaves = jax.tree_util.tree_leaves(pipe.params)
    assert all(a is b for a, b in zip(leaves, originals, strict=True))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves, originals, strict=True))


def test_bfloat16_weights_stay_bfloat16_rounded_once(tmp_path, models):
    """A pipeline read in bfloat16 (`from_pretrained(dtype="bfloat16")`): each adapted kernel is W + s·ΔW computed
    in float64 from the bfloat16 W and rounded once to bfloat16, the dtype the pipeline holds its weights in."""
    import dataclasses

    import ml_dtypes

    rounded = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), (models.unet_params, models.text_params))
    half = dataclasses.replace(models, unet_params=rounded[0], text_params=rounded[1])
    pipe = LatentPipeline(half)
    expected = write_kohya(tmp_path / "k.safetensors", models)
    pipe.load_lora(tmp_path / "k.safetensors", scale=0.7)
    pipe.fuse_lora()
    for path, (down, up, file_scale) in expected.items():
        weight = _leaf({"unet": half.unet_params, "text": half.text_params}, path)
        want = _expected(weight, down, up, 0.7 * file_scale).astype(ml_dtypes.bfloat16)
        got = np.asarray(_leaf(pipe.params, path))
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_unfused_runs_with_the_adapted_weights(tmp_path, pipe, models):
    """Unfused, the pipeline's own params stay the originals and it runs with W + s·c·ΔW: its images equal those of
    a pipeline built on the NumPy-merged weights; at scale 0 they are bitwise the base images."""
    expected = write_kohya(tmp_path / "k.safetensors", models)
    base = _images(pipe)
    pipe.load_lora(tmp_path / "k.safetensors", scale=0.5)
    merged = {"unet": models.unet_params, "text": models.text_params}
    flat = {key: flax.traverse_util.flatten_dict(tree) for key, tree in merged.items()}
    for path, (down, up, file_scale) in expected.items():
        flat[path[0]][path[1:]] = _expected(flat[path[0]][path[1:]], down, up, 0.5 * file_scale).astype(np.float32)
    reference = LatentPipeline(LatentModels(**{
        **{f.name: getattr(models, f.name) for f in models.__dataclass_fields__.values()},
        "unet_params": flax.traverse_util.unflatten_dict(flat["unet"]),
        "text_params": flax.traverse_util.unflatten_dict(flat["text"]),
    }))  # fmt: skip
    adapted = _images(pipe)
    assert np.abs(adapted - base).max() > 1e-3
    np.testing.assert_allclose(adapted, _images(reference), rtol=0, atol=1e-5)
    pipe.fuse_lora()
    np.testing.assert_allclose(_images(pipe), adapted, rtol=0, atol=1e-6)
    pipe.unfuse_lora()
    pipe.set_lora_scale(0.0)
    np.testing.assert_array_equal(_images(pipe), base)


def test_two_adapters_add(tmp_path, pipe, models):
    first = write_kohya(tmp_path / "a.safetensors", models, seed=1)
    second = write_kohya(tmp_path / "b.safetensors", models, seed=2)
    pipe.load_lora(tmp_path / "a.safetensors", scale=1.0, name="a")
    pipe.load_lora(tmp_path / "b.safetensors", scale=0.25, name="b")
    pipe.set_lora_scale(0.5, name="a")
    assert pipe.lora_scales == {"a": 0.5, "b": 0.25}
    pipe.fuse_lora()
    params = {"unet": models.unet_params, "text": models.text_params}
    for path in first:
        (down_a, up_a, c_a), (down_b, up_b, c_b) = first[path], second[path]
        weight = _leaf(params, path)
        want = _expected(weight, down_a, up_a, 0.5 * c_a) + _expected(weight, down_b, up_b, 0.25 * c_b) - weight
        np.testing.assert_allclose(np.asarray(_leaf(pipe.params, path)), want, rtol=1e-6, atol=1e-7)
    pipe.unfuse_lora()
    pipe.set_lora_scale(2.0)
    assert pipe.lora_scales == {"a": 2.0, "b": 2.0}


# --------------------------------------------------------------------------- diffusers key formats


def _peft_and_old_names(models, seed=3):
    """The same factors under peft names and under the older diffusers names diffusers still converts."""
    rng = np.random.default_rng(seed)
    params = {"unet": models.unet_params, "text": models.text_params}
    modules = [
        ("unet", f"{ATTENTION}.attn1", "to_q", ("unet", "down_blocks_0", "attentions_0", "transformer_blocks_0",
                                                "attn1", "to_q", "kernel")),
        ("unet", f"{ATTENTION}.attn2", "to_out", ("unet", "down_blocks_0", "attentions_0", "transformer_blocks_0",
                                                  "attn2", "to_out_0", "kernel")),
        ("unet", "up_blocks.1.resnets.0", "conv2", ("unet", "up_blocks_1", "resnets_0", "conv2", "kernel")),
        ("text_encoder", "text_model.encoder.layers.1.self_attn", "to_out",
         ("text", "encoder", "layers_1", "self_attn", "out_proj", "kernel")),
        ("text_encoder", "encoder.layers.0.mlp", "fc2", ("text", "encoder", "layers_0", "mlp", "fc2", "kernel")),
    ]  # fmt: skip
    peft, old = {}, {}
    for component, parent, leaf, path in modules:
        down, up = (0.05 * a.astype(np.float32) for a in _factors(rng, 3, _leaf(params, path).shape))
        peft_leaf = {"to_out": "to_out.0" if component == "unet" else "out_proj"}.get(leaf, leaf)
        peft[f"{component}.{parent}.{peft_leaf}.lora_A.weight"] = down
        peft[f"{component}.{parent}.{peft_leaf}.lora_B.weight"] = up
        if leaf == "to_out" and component == "unet":  # attention processors
            old[f"{component}.{parent}.processor.to_out_lora.down.weight"] = down
            old[f"{component}.{parent}.processor.to_out_lora.up.weight"] = up
        elif leaf.startswith("to_"):
            old[f"{component}.{parent}.processor.{leaf}_lora.down.weight"] = down
            old[f"{component}.{parent}.processor.{leaf}_lora.up.weight"] = up
        elif component == "unet":
            old[f"{component}.{parent}.{leaf}.lora.down.weight"] = down
            old[f"{component}.{parent}.{leaf}.lora.up.weight"] = up
        else:
            old[f"{component}.{parent}.{leaf}.lora_linear_layer.down.weight"] = down
            old[f"{component}.{parent}.{leaf}.lora_linear_layer.up.weight"] = up
    return peft, old, [m[3] for m in modules]


def test_older_diffusers_names_read_as_peft(tmp_path, models):
    peft, old, paths = _peft_and_old_names(models)
    fused = []
    for name, tensors in (("peft", peft), ("old", old)):
        safetensors.numpy.save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        pipe = LatentPipeline(models)
        pipe.load_lora(tmp_path / f"{name}.safetensors")
        pipe.fuse_lora()
        fused.append([np.asarray(_leaf(pipe.params, p)) for p in paths])
    params = {"unet": models.unet_params, "text": models.text_params}
    for path, a, b in zip(paths, *fused, strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.abs(a - np.asarray(_leaf(params, path))).max() > 1e-4


def test_peft_metadata_sets_the_scale(tmp_path, models):
    """lora_alpha / r from the header's LoraConfig, with alpha_pattern and use_rslora, as peft computes it."""
    peft, _, paths = _peft_and_old_names(models)
    settings = {"unet.r": 3, "unet.lora_alpha": 6, "unet.alpha_pattern": {"to_q": 1.5}, "unet.target_modules": ["to_q"],
                "text_encoder.r": 3, "text_encoder.lora_alpha": 3, "text_encoder.use_rslora": True}  # fmt: skip
    safetensors.numpy.save_file(peft, str(tmp_path / "plain.safetensors"))
    safetensors.numpy.save_file(peft, str(tmp_path / "meta.safetensors"),
                                metadata={"lora_adapter_metadata": json.dumps(settings)})  # fmt: skip
    params = {"unet": models.unet_params, "text": models.text_params}
    changes = []
    for name in ("plain", "meta"):
        pipe = LatentPipeline(models)
        pipe.load_lora(tmp_path / f"{name}.safetensors")
        pipe.fuse_lora()
        changes.append([np.asarray(_leaf(pipe.params, p), np.float64) - np.asarray(_leaf(params, p)) for p in paths])
    for path, plain, meta in zip(paths, *changes, strict=True):
        want = {"to_q": 0.5, "to_out_0": 2.0, "conv2": 2.0}.get(path[-2], 3 / np.sqrt(3))
        np.testing.assert_allclose(meta, want * plain, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- refusals


def _kohya_variant(tmp_path, models, name, change):
    write_kohya(tmp_path / "k.safetensors", models)
    tensors = safetensors.numpy.load_file(str(tmp_path / "k.safetensors"))
    change(tensors)
    safetensors.numpy.save_file(tensors, str(tmp_path / name))
    return tmp_path / name


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
ELSEWHERE = "lora_unet_down_blocks_7_attn_to_q"  # no such module in the tiny U-Net
BAD_FILES = {
    "unknown key": (lambda t: t.update({"lora_unet_x.dora_scale": np.ones(3, np.float32)}),
                    r"1 of its 15 keys are not LoRA factors .* lora_unet_x.dora_scale"),
    "other model": (lambda t: t.update({f"{ELSEWHERE}.lora_down.weight": np.ones((2, 3), np.float32),
                                        f"{ELSEWHERE}.lora_up.weight": np.ones((3, 2), np.float32)}),
                    rf"2 keys adapt no module .*: {ELSEWHERE}.lora_down.weight, {ELSEWHERE}.lora_up.weight$"),
    "second text encoder": (lambda t: t.update({"lora_te2_text_model_x.lora_down.weight": np.ones((2, 3), np.float32),
                                                "lora_te2_text_model_x.lora_up.weight": np.ones((3, 2), np.float32)}),
                            r"2 keys adapt no module"),
    "shape": (lambda t: t.update({f"{Q}.lora_down.weight": np.ones((4, 7), np.float32)}),
              r"1 adapters do not fit .*attn1_to_q: ΔW \[8, 7\], weight \[8, 8\]"),
    "rank": (lambda t: t.update({f"{Q}.lora_up.weight": np.ones((8, 3), np.float32)}),
             r"attn1_to_q: rank 4 in down, 3 in up"),
    "incomplete": (lambda t: t.pop(f"{Q}.lora_up.weight"), r"2 keys lack their down or up factor: " + Q),
    "alpha": (lambda t: t.update({f"{Q}.alpha": np.asarray(np.nan, np.float32)}), r"alpha \[nan\] must be one finite"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_refused_in_one_line_pipeline_unchanged(tmp_path, models, case):
    change, message = BAD_FILES[case]
    pipe = LatentPipeline(models)
    write_kohya(tmp_path / "good.safetensors", models, seed=5)
    pipe.load_lora(tmp_path / "good.safetensors", name="good")
    snapshot, run_params = _snapshot(pipe), pipe._run_params
    with pytest.raises(WeightsError, match=message) as raised:
        pipe.load_lora(_kohya_variant(tmp_path, models, "bad.safetensors", change))
    assert "\n" not in str(raised.value)
    _assert_unchanged(pipe, snapshot)
    assert pipe._run_params is run_params


def test_refused_metadata_files_and_calls(tmp_path, pipe, models):
    peft, _, _ = _peft_and_old_names(models)
    safetensors.numpy.save_file(peft, str(tmp_path / "dora.safetensors"),
                                metadata={"lora_adapter_metadata": json.dumps({"unet.use_dora": True})})  # fmt: skip
    safetensors.numpy.save_file(peft, str(tmp_path / "rank.safetensors"),
                                metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4})})  # fmt: skip
    (tmp_path / "lora.bin").write_bytes(b"not read")
    (tmp_path / "folder").mkdir()
    snapshot = _snapshot(pipe)
    for path, error, message in [
        (tmp_path / "dora.safetensors", WeightsError, r"unet.use_dora=True: only plain LoRA"),
        (tmp_path / "rank.safetensors", WeightsError, r"r=4 in the metadata, rank 3 in the tensors"),
        (tmp_path / "lora.bin", WeightsError, r"\.safetensors only \(never pickles\)"),
        (tmp_path / "missing.safetensors", MissingWeightsError, r"does not exist"),
        (tmp_path / "folder", MissingWeightsError, r"folder/pytorch_lora_weights.safetensors does not exist"),
    ]:
        with pytest.raises(error, match=message):
            pipe.load_lora(path)
        _assert_unchanged(pipe, snapshot)
    write_kohya(tmp_path / "k.safetensors", models)
    for scale in (-0.5, float("nan"), float("inf"), "1", True):
        with pytest.raises(UsageError, match="must be a finite number >= 0"):
            pipe.load_lora(tmp_path / "k.safetensors", scale=scale)
    _assert_unchanged(pipe, snapshot)
    with pytest.raises(UsageError, match="no LoRA is loaded"):
        pipe.set_lora_scale(1.0)
    with pytest.raises(UsageError, match="no LoRA is loaded"):
        pipe.fuse_lora()
    with pytest.raises(UsageError, match="not fused"):
        pipe.unfuse_lora()
    pipe.load_lora(tmp_path / "k.safetensors", name="k")
    with pytest.raises(UsageError, match="already loaded"):
        pipe.load_lora(tmp_path / "k.safetensors", name="k")
    with pytest.raises(UsageError, match=r"no LoRA named 'x' is loaded; loaded: \['k'\]"):
        pipe.set_lora_scale(0.5, name="x")
    with pytest.raises(UsageError, match="must be a finite number >= 0"):
        pipe.set_lora_scale(float("nan"))
    pipe.fuse_lora()
    for call in (lambda: pipe.set_lora_scale(0.5), lambda: pipe.load_lora(tmp_path / "k.safetensors"), pipe.fuse_lora):
        with pytest.raises(UsageError, match="fused; call unfuse_lora"):
            call()
    assert pipe.lora_scales == {"k": 1.0}


class _PixelPipeline(PipelineBase):
    loaded = "an unconditional pixel-space model"


def test_pixel_pipeline_has_no_lora():
    pipe = _PixelPipeline()
    for method in ("load_lora", "set_lora_scale", "fuse_lora", "unfuse_lora"):
        with pytest.raises(UsageError, match=f"{method}\\(\\) needs a text-to-image model"):
            getattr(pipe, method)()


# --------------------------------------------------------------------------- command line


def test_cli_lora_flag_refusals(tmp_path, capsys):
    assert cli.main(["sample", "--workdir", str(tmp_path), "--out", str(tmp_path / "a.png"), "--lora", "x"]) == 2
    assert "--lora: options of text-to-image, which needs --prompt" in capsys.readouterr().err
    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "l.safetensors").write_bytes(b"")
    argv = ["sample", "--pretrained", str(folder), "--prompt", "a", "--out", str(tmp_path / "a.png"), "--lora"]
    for value, message in [
        (str(tmp_path / "none.safetensors"), "--lora '" + str(tmp_path / "none.safetensors") + "' does not exist"),
        (f"{tmp_path / 'l.safetensors'}:abc", "SCALE (after the last ':') must be a number"),
        (f"{tmp_path / 'l.safetensors'}:-1", "LoRA scale=-1.0 must be a finite number >= 0"),
        (f"{tmp_path / 'l.safetensors'}:nan", "LoRA scale=nan must be a finite number >= 0"),
    ]:
        assert cli.main([*argv, value]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


# --------------------------------------------------------------------------- against diffusers


@pytest.fixture(scope="module")
def diffusers_lora(tmp_path_factory, torch):
    """A tiny SD pipeline saved by diffusers, and two LoRA files saved by its `save_lora_weights`: "a" with peft
    adapters on the U-Net (dense, 1×1 and 3×3 convs; lora_alpha 8 over r 4, in the metadata) and text encoder,
    "b" on the U-Net's attention only, without metadata."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    from tests.test_stable_diffusion import components, diffusers, save

    folder = tmp_path_factory.mktemp("lora")
    pipe = save(diffusers.StableDiffusionPipeline, components(folder=folder), folder / "pipe")
    configs = {
        "a": (peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
            "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "ff.net.2", "time_emb_proj"]),
              peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                              target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])),
        "b": (peft.LoraConfig(r=3, lora_alpha=3, init_lora_weights=False, target_modules=["to_q", "to_v"]), None),
    }  # fmt: skip
    for name, (unet_config, text_config) in configs.items():
        torch.manual_seed(len(name) + ord(name))
        unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "pipe" / "unet")
        unet.add_adapter(unet_config)
        layers = {"unet_lora_layers": get_peft_model_state_dict(unet)}
        if text_config is not None:
            text = type(pipe.text_encoder).from_pretrained(folder / "pipe" / "text_encoder")
            peft.inject_adapter_in_model(text_config, text)  # transformers' add_adapter wants a newer peft
            layers["text_encoder_lora_layers"] = get_peft_model_state_dict(text)
            metadata = dict(unet_lora_adapter_metadata=unet_config.to_dict(),
                            text_encoder_lora_adapter_metadata=text_config.to_dict())  # fmt: skip
        else:
            metadata = {}
        for tensors in layers.values():
            for key in tensors:
                if "lora_B" in key:
                    tensors[key] = 0.3 * tensors[key]  # a visible but moderate change
        diffusers.StableDiffusionPipeline.save_lora_weights(folder / name, **layers, **metadata)
    return folder, torch, diffusers


def _diffusers_images(reference, torch, noise, steps=3):
    latents = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))
    return reference(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=7.5, latents=latents, height=16,
                     width=16, output_type="np").images  # fmt: skip


@pytest.mark.slow  # about 35 s on a busy 2-core CPU, most of it compiling the pipeline
def test_matches_diffusers_load_lora_weights(diffusers_lora):
    folder, torch, diffusers = diffusers_lora
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder / "pipe")
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(folder / "a", adapter_name="a")
    ours = LatentPipeline.from_pretrained(folder / "pipe")

    def run():
        return ours.text_to_image(PROMPTS, steps=3, guidance=7.5, latents=noise, output_type="float")

    base = run()
    ours.load_lora(folder / "a", name="a")
    # diffusers' adapter weights scale the U-Net's and the text encoder's adapters alike.
    for weights in ([1.0], [0.5]):
        reference.set_adapters(["a"], adapter_weights=weights)
        ours.set_lora_scale(weights[0])
        theirs = _diffusers_images(reference, torch, noise)
        assert np.abs(theirs - base).max() > 0.05 and np.std(theirs) > 0.01
        np.testing.assert_allclose(run(), theirs, rtol=0, atol=1e-4)
    reference.load_lora_weights(folder / "b" / "pytorch_lora_weights.safetensors", adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[0.5, 2.0])
    ours.load_lora(folder / "b" / "pytorch_lora_weights.safetensors", scale=2.0, name="b")
    assert ours.lora_scales == {"a": 0.5, "b": 2.0}
    theirs = _diffusers_images(reference, torch, noise)
    np.testing.assert_allclose(run(), theirs, rtol=0, atol=1e-4)
    ours.fuse_lora()
    np.testing.assert_allclose(run(), theirs, rtol=0, atol=1e-4)


def test_cli_sample_with_lora(diffusers_lora, tmp_path):
    folder, _, _ = diffusers_lora
    out = tmp_path / "grid.png"
    argv = ["sample", "--pretrained", str(folder / "pipe"), "--prompt", PROMPTS[0], "--num", "1", "--steps", "2",
            "--out", str(out), "--lora", f"{folder / 'a'}:0.5", "--lora", str(folder / "b")]  # fmt: skip
    assert cli.main(argv) == 0
    from PIL import Image

    from jaxdiff import images

    pipe = LatentPipeline.from_pretrained(folder / "pipe")
    pipe.load_lora(folder / "a", scale=0.5)
    pipe.load_lora(folder / "b")
    expected = pipe.text_to_image(PROMPTS[:1], steps=2, sampler="ddim", seed=0)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), images.make_grid(expected))
