"""The CLIP text transformer against transformers' CLIPTextModel(WithProjection) with the same random weights
(float32), and the tokenizer against transformers' CLIPTokenizer on a tiny byte-level vocabulary."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # parity with the PyTorch originals; skipped where torch is absent
import safetensors.numpy
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers import CLIPTokenizer as TorchCLIPTokenizer

from jaxdiff.latent.component_weights import clip_names, param_shapes, read_clip_text, torch_shape
from jaxdiff.models.clip_text import clip_text_config, create_clip_text
from jaxdiff.latent.clip_tokenizer import CLIPTokenizer

TINY = dict(
    vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=16, projection_dim=12, bos_token_id=98, eos_token_id=99, pad_token_id=1,
)  # fmt: skip
BOS, EOS = 98, 99

TOLERANCE = 5e-6  # relative; measured float32 errors are below 1e-6


def relative_error(ours, reference) -> float:
    reference = np.asarray(reference, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - reference)) / np.max(np.abs(reference)))


def save_torch_clip(folder, *, projection=False, **overrides):
    """A tiny transformers CLIP text model, every parameter (norms included) randomised, saved to `folder`."""
    torch.manual_seed(0)
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = model_class(CLIPTextConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def token_ids(pad: int) -> np.ndarray:
    """Two prompts of 16 ids: BOS, tokens, EOS, then `pad`."""
    rng = np.random.default_rng(0)
    ids = np.full((2, 16), pad, np.int64)
    for row, n in enumerate((5, 11)):
        ids[row, : n + 2] = [BOS, *rng.integers(3, 90, n), EOS]
    return ids


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("projection", [False, True], ids=["CLIPTextModel", "WithProjection"])
def test_outputs_match_transformers(tmp_path, hidden_act, projection):
    model = save_torch_clip(tmp_path, projection=projection, hidden_act=hidden_act)
    config, params = read_clip_text(tmp_path)
    assert config.with_projection == projection and config.hidden_act == hidden_act
    ids = token_ids(pad=0)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
        text_model = model.text_model if projection else model
        skipped = text_model.final_layer_norm(ref.hidden_states[-2])  # diffusers' encode_prompt(clip_skip=1)
        pooled = ref.text_embeds if projection else ref.pooler_output
    ours = create_clip_text(config).apply({"params": params}, ids, clip_skip=1)
    assert len(ours.hidden_states) == len(ref.hidden_states) == 4
    assert relative_error(ours.last_hidden_state, ref.last_hidden_state) < TOLERANCE
    assert relative_error(ours.hidden_states[-2], ref.hidden_states[-2]) < TOLERANCE
    assert relative_error(ours.prompt_embeds, skipped) < TOLERANCE
    assert relative_error(ours.text_embeds if projection else ours.pooled_output, pooled) < TOLERANCE
    assert (ours.text_embeds is None) != projection


@pytest.mark.parametrize(
    "model_class, settings",
    [
        (CLIPTextModel, dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12)),  # SD 1.x
        (CLIPTextModel, dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                             num_hidden_layers=23, hidden_act="gelu", projection_dim=512)),  # SD 2.x
        (CLIPTextModelWithProjection, dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                           num_hidden_layers=32, hidden_act="gelu", projection_dim=1280)),  # SDXL
    ],
    ids=["sd1", "sd2", "sdxl-2"],
)  # fmt: skip
def test_stable_diffusion_size_names_and_shapes_match_transformers(model_class, settings):
    """Every tensor name and PyTorch shape of the full-size text encoders, built on the meta device."""
    with torch.device("meta"):
        model = model_class(CLIPTextConfig(**settings))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    config = clip_text_config({**settings, "architectures": [model_class.__name__]})
    shapes = param_shapes(create_clip_text(config), jax.ShapeDtypeStruct((1, 77), jnp.int32))
    pick = -1 if model_class is CLIPTextModelWithProjection else 0  # the `text_model.`-prefixed candidate, or not
    assert {clip_names(path)[pick]: torch_shape(path, shape) for path, shape in shapes.items()} == expected


def test_pooling_at_first_eos_with_eos_padding_and_attention_mask(tmp_path):
    model = save_torch_clip(tmp_path)
    config, params = read_clip_text(tmp_path)
    ids = token_ids(pad=EOS)
    mask = (np.arange(16)[None] < np.array([[7], [13]])).astype(np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    ours = create_clip_text(config).apply({"params": params}, ids, mask)
    np.testing.assert_array_equal(np.argmax(ids == EOS, axis=1), [6, 12])
    assert relative_error(ours.last_hidden_state, ref.last_hidden_state) < TOLERANCE
    assert relative_error(ours.pooled_output, ref.pooler_output) < TOLERANCE


def test_legacy_eos_id_pools_at_the_largest_id_and_position_ids_buffer_is_ignored(tmp_path):
    model = save_torch_clip(tmp_path, eos_token_id=2)
    file = tmp_path / "model.safetensors"
    tensors = safetensors.numpy.load_file(file)
    tensors["text_model.embeddings.position_ids"] = np.arange(16)[None]
    safetensors.numpy.save_file(tensors, file)
    config, params = read_clip_text(tmp_path)
    ids = token_ids(pad=0)
    ids[0, 3] = 97  # the largest id, before EOS: pooled there
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).pooler_output
    ours = create_clip_text(config).apply({"params": params}, ids).pooled_output
    assert relative_error(ours, ref) < TOLERANCE
    assert relative_error(ours[0], ref[1]) > 0.1


def test_bfloat16_compute_keeps_float32_params_and_remat_changes_nothing(tmp_path):
    save_torch_clip(tmp_path)
    config, params = read_clip_text(tmp_path)
    ids = token_ids(pad=0)
    reference = create_clip_text(config).apply({"params": params}, ids).last_hidden_state
    config.remat = True
    assert np.array_equal(create_clip_text(config).apply({"params": params}, ids).last_hidden_state, reference)
    config.dtype = "bfloat16"
    model = create_clip_text(config)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = model.apply({"params": params}, ids).last_hidden_state
    assert out.dtype == jnp.float32
    assert 1e-4 < relative_error(out, reference) < 5e-2


def test_converter_lists_missing_unexpected_and_misshaped_tensors(tmp_path):
    save_torch_clip(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = safetensors.numpy.load_file(file)
    del tensors["encoder.layers.1.mlp.fc2.bias"]
    tensors["encoder.layers.9.mlp.fc2.bias"] = np.zeros(32, np.float32)
    tensors["final_layer_norm.weight"] = np.zeros(31, np.float32)
    safetensors.numpy.save_file(tensors, file)
    with pytest.raises(ValueError) as err:
        read_clip_text(tmp_path)
    message = str(err.value)
    assert "1 missing" in message and "encoder.layers.1.mlp.fc2.bias" in message
    assert "1 unexpected" in message and "encoder.layers.9.mlp.fc2.bias" in message
    assert "final_layer_norm.weight: shape (31,), expected (32,)" in message


@pytest.mark.parametrize(
    "key, value",
    [
        ("hidden_act", "gelu_new"),
        ("num_attention_heads", 5),
        ("eos_token_id", 100),
        ("architectures", ["CLIPModel"]),
        ("model_type", "clip"),
        ("layer_norm_eps", 0),
    ],
)
def test_unsupported_config_values_are_named(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"unsupported {key}="):
        clip_text_config({**TINY, key: value})
    (tmp_path / "config.json").write_text(json.dumps({**TINY, key: value}))
    with pytest.raises(ValueError, match=f"config.json: CLIP text config: unsupported {key}="):
        read_clip_text(tmp_path)  # rejected before any weights are looked for


def test_clip_skip_out_of_range_is_refused(tmp_path):
    save_torch_clip(tmp_path)
    config, params = read_clip_text(tmp_path)
    with pytest.raises(ValueError, match="clip_skip=4 must be an int in 0..3"):
        create_clip_text(config).apply({"params": params}, token_ids(pad=0), clip_skip=4)


# --------------------------------------------------------------------------- tokenizer


def byte_symbols() -> list[str]:
    """CLIP's byte-level alphabet in vocabulary order: printable bytes as themselves, the rest as chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(len(others))]


MERGES = [("h", "e"), ("l", "l"), ("ll", "o</w>"), ("he", "llo</w>"), ("c", "a"), ("ca", "t</w>"), ("!", "!</w>"),
          ("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("1", "9"), ("s", "t")]  # fmt: skip
PROMPTS = [
    "Hello, the CAT!!",
    "A Photo of 2 cats in 1990's style...  \n\t with   spaces",
    "héllo wörld ñ 日本",
    "<|endoftext|> hello!",
    "wow!!!! hello?! 3.14",
    " ".join(["the cat"] * 40),  # 80 words: truncated
]


def write_tokenizer_folder(folder, pad_token) -> None:
    """vocab.json (bytes, bytes + "</w>", merges, BOS, EOS: "!" is id 0 as in CLIP), merges.txt, special tokens."""
    folder.mkdir()
    symbols = byte_symbols()
    merged = ["".join(m) for m in MERGES]
    vocab = [*symbols, *(s + "</w>" for s in symbols), *merged, "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    special = {"bos_token": {"content": "<|startoftext|>"}, "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": pad_token}  # fmt: skip
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "do_lower_case": True}))


@pytest.mark.parametrize("pad_token, pad_id", [("<|endoftext|>", 525), ("!", 0)], ids=["sd1-eos-pad", "sd2-bang-pad"])
def test_tokenizer_matches_transformers(tmp_path, caplog, pad_token, pad_id):
    write_tokenizer_folder(tmp_path / "tokenizer", pad_token)
    reference = TorchCLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True)
    reference.save_pretrained(tmp_path / "saved")  # writes tokenizer.json
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    for folder in ("tokenizer", "saved"):
        tokenizer = CLIPTokenizer.from_folder(tmp_path / folder)
        assert tokenizer.pad_token_id == pad_id
        with caplog.at_level(logging.WARNING, logger="jaxdiff.latent.clip_tokenizer"):
            caplog.clear()
            ours = tokenizer(PROMPTS)
        assert ours.input_ids.shape == (len(PROMPTS), 77) and ours.input_ids.dtype == np.int32
        np.testing.assert_array_equal(ours.input_ids, expected["input_ids"])
        np.testing.assert_array_equal(ours.attention_mask, expected["attention_mask"])
        (record,) = caplog.records
        assert "truncated" in record.getMessage() and record.getMessage().endswith("'" + "cat the " * 2 + "cat'")
        assert ours.input_ids[0, 0] == 524 and ours.input_ids[0, 7] == 525


def test_tokenizer_folder_without_vocabulary_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither tokenizer.json nor vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
