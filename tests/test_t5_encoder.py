"""The T5 encoder against transformers' T5EncoderModel with the same random weights (float32, gated-gelu and relu)
and against a float64 NumPy encoder written here (no torch needed), its relative position buckets against float64
and transformers, its weights reader (shards, half precision, the tied
embedding, refusals), T5-XXL's size, and the T5 tokenizer against transformers' T5TokenizerFast."""

import importlib.util
import json
import logging
import math
import re

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxdiff.errors import ConfigError, MissingWeightsError, UsageError, WeightsError
from jaxdiff.latent.component_weights import param_shapes, torch_shape
from jaxdiff.latent.t5_tokenizer import T5Tokenizer
from jaxdiff.latent.t5_weights import read_t5_encoder, t5_names
from jaxdiff.models.t5_encoder import create_t5_encoder, relative_position_bucket, t5_encoder_config
from jaxdiff.weights.torch_layout import to_torch

TINY = dict(
    vocab_size=50, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)  # fmt: skip
TOLERANCE = 1e-5  # relative to the largest output; measured float32 errors are about 1e-6
BFLOAT16_TOLERANCE = 0.1  # relative to float32 transformers; measured 0.042 (transformers' own bfloat16 model: 0.034)
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
)  # fmt: skip  google/t5-v1_1-xxl, the text encoder of SD3 and Flux
T5_XXL_ENCODER_PARAMETERS = 4_762_310_656


def relative_error(ours, reference) -> float:
    reference = np.asarray(reference, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - reference)) / np.max(np.abs(reference)))


def save_torch_t5(torch, folder, *, feed_forward_proj="gated-gelu", dtype=None, **save_options):
    """A tiny transformers T5EncoderModel, every parameter (norms included) randomised, saved to `folder`."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(**TINY, feed_forward_proj=feed_forward_proj)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **save_options)
    return model


def token_ids() -> tuple[np.ndarray, np.ndarray]:
    """Two prompts of 21 ids (longer than relative_attention_max_distance 16): 21 and 9 tokens, then padding."""
    ids = np.random.default_rng(0).integers(2, 50, (2, 21))
    mask = (np.arange(21)[None] < np.array([[21], [9]])).astype(np.int64)
    return np.where(mask, ids, 0), mask


def torch_outputs(torch, model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        mask = None if mask is None else torch.from_numpy(mask)
        return model(torch.from_numpy(ids), attention_mask=mask).last_hidden_state.float().numpy()


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_hidden_states_match_transformers(torch, tmp_path, feed_forward_proj):
    model = save_torch_t5(torch, tmp_path, feed_forward_proj=feed_forward_proj)
    config, params = read_t5_encoder(tmp_path)
    gated = feed_forward_proj == "gated-gelu"
    assert (config.gated, config.activation) == ((True, "gelu_new") if gated else (False, "relu"))
    ids, mask = token_ids()
    encoder = create_t5_encoder(config)
    masked = encoder.apply({"params": params}, ids, mask)
    unmasked = encoder.apply({"params": params}, ids)  # as SD3 and Flux call it
    assert masked.dtype == jnp.float32 and masked.shape == (2, 21, 32)
    assert relative_error(masked, torch_outputs(torch, model, ids, mask)) < TOLERANCE
    assert relative_error(unmasked, torch_outputs(torch, model, ids)) < TOLERANCE
    assert relative_error(masked[1], unmasked[1]) > 1e-2  # the mask matters
    np.testing.assert_array_equal(masked[0], unmasked[0])  # a row without padding


def reference_buckets(relative_position: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bidirectional buckets, element by element in float64."""
    half = num_buckets // 2
    exact = half // 2
    out = []
    for p in relative_position.ravel().tolist():
        n = abs(p)
        if n < exact:
            bucket = n
        else:
            logarithmic = math.log(n / exact) / math.log(max_distance / exact) * (half - exact)
            bucket = min(exact + math.floor(logarithmic), half - 1)
        out.append(bucket + (half if p > 0 else 0))
    return np.array(out).reshape(relative_position.shape)


@pytest.mark.parametrize("num_buckets, max_distance", [(8, 16), (32, 128), (6, 20)])
def test_relative_position_bucket_matches_float64_reference(num_buckets, max_distance):
    relative = np.arange(-700, 701).reshape(3, 467)
    ours = relative_position_bucket(jnp.asarray(relative), num_buckets=num_buckets, max_distance=max_distance)
    expected = reference_buckets(relative, num_buckets, max_distance)
    np.testing.assert_array_equal(ours, expected)
    assert ours.dtype == jnp.int32
    assert set(expected.ravel()) == set(range(num_buckets)) - {num_buckets // 2}  # no positive distance 0


def test_relative_position_bucket_matches_transformers(torch):
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = np.arange(-700, 701)[None]
    expected = T5Attention._relative_position_bucket(torch.from_numpy(relative), num_buckets=32, max_distance=128)
    ours = relative_position_bucket(jnp.asarray(relative), num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(ours, expected.numpy())


def test_bfloat16_within_tolerance_keeps_float32_params_and_remat_changes_nothing(torch, tmp_path):
    model = save_torch_t5(torch, tmp_path)
    config, params = read_t5_encoder(tmp_path)
    ids, mask = token_ids()
    reference = torch_outputs(torch, model, ids, mask)
    float32 = create_t5_encoder(config).apply({"params": params}, ids, mask)
    config.remat = True
    np.testing.assert_array_equal(create_t5_encoder(config).apply({"params": params}, ids, mask), float32)
    config.dtype = "bfloat16"
    encoder = create_t5_encoder(config)
    variables = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), ids)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = encoder.apply({"params": params}, ids, mask)
    assert out.dtype == jnp.float32
    assert 1e-4 < relative_error(out, reference) < BFLOAT16_TOLERANCE


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_sharded_half_precision_variant_folder(torch, tmp_path, dtype_name):
    """A pipeline folder whose text_encoder_2/ holds fp16 / bf16 shards named by model.safetensors.index.fp16.json."""
    model = save_torch_t5(torch, tmp_path / "text_encoder_2", dtype=getattr(torch, dtype_name), max_shard_size="4KB",
                          variant="fp16")  # fmt: skip
    assert (tmp_path / "text_encoder_2" / "model.safetensors.index.fp16.json").is_file()
    assert len(list((tmp_path / "text_encoder_2").glob("*.safetensors"))) > 5
    config, params = read_t5_encoder(tmp_path, subfolder="text_encoder_2", variant="fp16")
    tensors = model.state_dict()
    expected = {name: p.float().numpy() for name, p in tensors.items() if name != "encoder.embed_tokens.weight"}
    ours = {t5_names(path)[0]: to_torch(path, value) for path, value in flax.traverse_util.flatten_dict(params).items()}
    assert sorted(ours) == sorted(expected)
    for name, value in ours.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    ids, mask = token_ids()
    out = create_t5_encoder(config).apply({"params": params}, ids, mask)
    assert relative_error(out, torch_outputs(torch, model.float(), ids, mask)) < TOLERANCE


def write_numpy_t5(folder, *, feed_forward_proj="gated-gelu") -> dict[str, np.ndarray]:
    """A tiny T5EncoderModel folder written without torch: config.json and random float32 tensors under transformers'
    names, which are returned."""
    rng = np.random.default_rng(1)
    d, inner, heads = TINY["d_model"], TINY["num_heads"] * TINY["d_kv"], TINY["num_heads"]
    shapes = {"shared.weight": (TINY["vocab_size"], d), "encoder.final_layer_norm.weight": (d,),
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (8, heads)}  # fmt: skip
    wi = ("wi_0", "wi_1") if feed_forward_proj == "gated-gelu" else ("wi",)
    for i in range(TINY["num_layers"]):
        block = f"encoder.block.{i}.layer"
        shapes.update({f"{block}.0.SelfAttention.{n}.weight": (inner, d) for n in "qkv"})
        shapes.update({f"{block}.0.SelfAttention.o.weight": (d, inner), f"{block}.1.DenseReluDense.wo.weight": (d, 40)})
        shapes.update({f"{block}.1.DenseReluDense.{n}.weight": (40, d) for n in wi})
        shapes.update({f"{block}.{j}.layer_norm.weight": (d,) for j in (0, 1)})
    tensors = {}
    for name, shape in shapes.items():
        scale = 1.0 if "norm" in name else (0.5 if len(shape) == 1 or "shared" in name else shape[1] ** -0.5)
        tensors[name] = ((1.0 if "norm" in name else 0.0) + scale * rng.standard_normal(shape)).astype(np.float32)
    folder.mkdir(exist_ok=True)
    settings = {**TINY, "feed_forward_proj": feed_forward_proj, "architectures": ["T5EncoderModel"], "model_type": "t5"}
    (folder / "config.json").write_text(json.dumps(settings))
    safetensors.numpy.save_file(tensors, folder / "model.safetensors")
    return tensors


def numpy_t5(tensors: dict, ids: np.ndarray, mask: np.ndarray, *, gated: bool) -> np.ndarray:
    """The T5 encoder in float64 NumPy from transformers-named tensors: last hidden state [B, L, d_model]."""
    t = {name: value.astype(np.float64) for name, value in tensors.items()}
    heads, d_kv, eps = TINY["num_heads"], TINY["d_kv"], 1e-6

    def norm(x, name):
        return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * t[name]

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    b, length = ids.shape
    x = t["shared.weight"][ids]
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    buckets = reference_buckets(relative, TINY["relative_attention_num_buckets"], TINY["relative_attention_max_distance"])
    bias = t["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"][buckets].transpose(2, 0, 1)
    for i in range(TINY["num_layers"]):
        layer = f"encoder.block.{i}.layer"
        h = norm(x, f"{layer}.0.layer_norm.weight")
        q, k, v = (
            (h @ t[f"{layer}.0.SelfAttention.{n}.weight"].T).reshape(b, length, heads, d_kv) for n in "qkv"
        )
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) + bias
        logits = np.where(mask[:, None, None, :] > 0, logits, -np.inf)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, heads * d_kv)
        x = x + attended @ t[f"{layer}.0.SelfAttention.o.weight"].T
        h = norm(x, f"{layer}.1.layer_norm.weight")
        ff = f"{layer}.1.DenseReluDense"
        if gated:
            h = gelu_tanh(h @ t[f"{ff}.wi_0.weight"].T) * (h @ t[f"{ff}.wi_1.weight"].T)
        else:
            h = np.maximum(h @ t[f"{ff}.wi.weight"].T, 0)
        x = x + h @ t[f"{ff}.wo.weight"].T
    return norm(x, "encoder.final_layer_norm.weight")


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_hidden_states_match_float64_numpy_reference(tmp_path, feed_forward_proj):
    tensors = write_numpy_t5(tmp_path, feed_forward_proj=feed_forward_proj)
    config, params = read_t5_encoder(tmp_path)
    ids, mask = token_ids()
    ours = create_t5_encoder(config).apply({"params": params}, ids, mask)
    assert relative_error(ours, numpy_t5(tensors, ids, mask, gated=config.gated)) < TOLERANCE


def test_tied_embedding_copy_is_checked_and_may_stand_alone(tmp_path):
    tensors = write_numpy_t5(tmp_path)
    file = tmp_path / "model.safetensors"
    shared = tensors["shared.weight"]
    safetensors.numpy.save_file({**tensors, "encoder.embed_tokens.weight": shared.copy()}, file)
    np.testing.assert_array_equal(read_t5_encoder(tmp_path)[1]["shared"]["embedding"], shared)
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")  # only the encoder's name
    safetensors.numpy.save_file(tensors, file)
    np.testing.assert_array_equal(read_t5_encoder(tmp_path)[1]["shared"]["embedding"], shared)
    safetensors.numpy.save_file({**tensors, "shared.weight": shared + 1}, file)
    with pytest.raises(WeightsError, match="encoder.embed_tokens.weight differs from shared.weight"):
        read_t5_encoder(tmp_path)


def test_missing_surplus_and_misshaped_tensors_are_listed(tmp_path):
    tensors = write_numpy_t5(tmp_path)
    file = tmp_path / "model.safetensors"
    del tensors["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    tensors["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((32, 32), np.float32)
    tensors["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = np.zeros((8, 4), np.float32)
    tensors["encoder.final_layer_norm.weight"] = np.zeros(31, np.float32)
    safetensors.numpy.save_file(tensors, file)
    with pytest.raises(WeightsError) as err:
        read_t5_encoder(tmp_path)
    message = str(err.value)
    assert "1 missing" in message and "encoder.block.1.layer.1.DenseReluDense.wi_1.weight" in message
    assert "2 unexpected" in message and "decoder.block.0.layer.0.SelfAttention.q.weight" in message
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in message
    assert "encoder.final_layer_norm.weight: shape (31,), expected (32,)" in message


def test_shard_index_must_agree_with_its_shards(torch, tmp_path):
    save_torch_t5(torch, tmp_path, max_shard_size="4KB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = list(index["weight_map"].values())
    name, shard = next((n, f) for n, f in index["weight_map"].items() if shards.count(f) > 1)  # stays listed
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != shard)
    index_path.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], name: other}}))
    with pytest.raises(WeightsError, match=f"1 tensors not where the index says.*{name} in {shard}, index: {other}"):
        read_t5_encoder(tmp_path)
    index_path.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], name: "../model.safetensors"}}))
    with pytest.raises(WeightsError, match="must be file names"):
        read_t5_encoder(tmp_path)
    (tmp_path / shard).unlink()
    index_path.write_text(json.dumps(index))
    with pytest.raises(MissingWeightsError, match=f"names shards \\['{shard}'\\] that are not in"):
        read_t5_encoder(tmp_path)


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("feed_forward_proj", "gated-silu", "'gated-gelu' or 'relu'"),
        ("feed_forward_proj", "gelu", "'gated-gelu' or 'relu'"),
        ("dense_act_fn", "relu", "'gelu_new'"),
        ("is_gated_act", False, "True"),
        ("architectures", ["T5ForConditionalGeneration"], "['T5EncoderModel']"),
        ("model_type", "umt5", "'t5'"),
        ("is_decoder", True, "false"),
        ("relative_attention_num_buckets", 2, "an int >= 4"),
        ("relative_attention_max_distance", 2, "an int > num_buckets // 4 = 2"),
        ("layer_norm_epsilon", 0, "a positive number"),
        ("num_heads", 0, "a positive int"),
    ],
)
def test_unsupported_config_values_are_named(tmp_path, key, value, allowed):
    settings = {**TINY, "feed_forward_proj": "gated-gelu", key: value}
    with pytest.raises(ConfigError, match=re.escape(f"unsupported {key}={value!r}; allowed: {allowed}")):
        t5_encoder_config(settings)
    (tmp_path / "config.json").write_text(json.dumps(settings))
    with pytest.raises(WeightsError, match=f"config.json: T5 encoder config: unsupported {key}="):
        read_t5_encoder(tmp_path)  # refused before any weights are looked for


def test_unknown_config_keys_and_options_are_refused_and_no_ops_accepted():
    with pytest.raises(ConfigError, match=r"unknown keys \['rope_theta'\]"):
        t5_encoder_config({**TINY, "rope_theta": 10000})
    with pytest.raises(ConfigError, match=r"unknown options \['param_dtype'\]"):
        t5_encoder_config(TINY, param_dtype="bfloat16")
    no_ops = {"dropout_rate": 0.3, "dtype": "float16", "tie_word_embeddings": False, "num_decoder_layers": 9,
              "n_positions": 512, "eos_token_id": 1, "pad_token_id": 0, "use_cache": True}  # fmt: skip
    assert t5_encoder_config({**TINY, **no_ops}) == t5_encoder_config(TINY)
    assert t5_encoder_config(TINY).feed_forward_proj == "relu"  # transformers' default


def test_t5_xxl_size_names_and_shapes_match_transformers(torch):
    """google/t5-v1_1-xxl's encoder by jax.eval_shape against transformers' T5EncoderModel on the meta device."""
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**T5_XXL))
    assert model.num_parameters() == T5_XXL_ENCODER_PARAMETERS
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name != "encoder.embed_tokens.weight"}
    shapes = param_shapes(create_t5_encoder(t5_encoder_config(T5_XXL)), jax.ShapeDtypeStruct((1, 256), jnp.int32))
    assert {t5_names(path)[0]: torch_shape(path, shape) for path, shape in shapes.items()} == expected
    assert sum(math.prod(shape) for shape in shapes.values()) == T5_XXL_ENCODER_PARAMETERS


def test_t5_xxl_parameter_count_without_torch():
    shapes = param_shapes(create_t5_encoder(t5_encoder_config(T5_XXL)), jax.ShapeDtypeStruct((1, 512), jnp.int32))
    assert sum(math.prod(shape) for shape in shapes.values()) == T5_XXL_ENCODER_PARAMETERS


# --------------------------------------------------------------------------- tokenizer

PIECES = ["▁a", "▁photo", "▁of", "▁cat", "▁the", "▁dog", "▁in", "▁space", "▁", "s", "a", "t", "o", "p", "h",
          "c", "d", "g", "e", "i", "n", "r", "l", "x", "y", "!", ",", ".", "1", "2", "é"]  # fmt: skip
EXTRA_IDS = 3
PROMPTS = [
    "a photo of cats",
    "the dog in space!",
    "A  Photo,   of 12 dogs.",  # upper case is unknown (T5 is cased), runs of spaces
    " leading and trailing spaces ",
    "tabs\tand\nnewlines",
    "xyz </s> cat <extra_id_0>",  # added tokens written in the prompt
    "café",
    "",
    " ".join(["the cat"] * 12),  # 24 words: truncated at max_length 16
]


def write_t5_tokenizer_json(folder) -> None:
    """A T5 tokenizer.json as transformers 4's T5TokenizerFast saved it: <pad> 0, </s> 1, <unk> 2, Unigram pieces with
    scores, the sentinels <extra_id_*> last in reverse, the Metaspace pre-tokeniser, "$A </s>" post-processing."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, -1.0 - 0.1 * i if len(piece) > 2 else -5.0 - 0.1 * i) for i, piece in enumerate(PIECES)]
    sentinels = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    vocab += [(token, 0.0) for token in reversed(sentinels)]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=2))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])  # fmt: skip
    tokenizer.add_special_tokens(["<pad>", "</s>", "<unk>", *sentinels])
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": EXTRA_IDS,
                "additional_special_tokens": sentinels, "model_max_length": 512,
                "tokenizer_class": "T5Tokenizer"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))


def test_tokenizer_matches_transformers(tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    write_t5_tokenizer_json(tmp_path / "tokenizer_3")
    reference = transformers.T5TokenizerFast.from_pretrained(tmp_path / "tokenizer_3")
    expected = reference(PROMPTS, padding="max_length", max_length=16, truncation=True)
    tokenizer = T5Tokenizer.from_folder(tmp_path / "tokenizer_3")
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.model_max_length) == (1, 0, 512)
    with caplog.at_level(logging.WARNING, logger="jaxdiff.latent.t5_tokenizer"):
        ours = tokenizer(PROMPTS, max_length=16)
    assert ours.input_ids.shape == (len(PROMPTS), 16) and ours.input_ids.dtype == np.int32
    np.testing.assert_array_equal(ours.input_ids, expected["input_ids"])
    np.testing.assert_array_equal(ours.attention_mask, expected["attention_mask"])
    assert ours.input_ids[0].tolist() == [3, 4, 5, 6, 12, 1] + [0] * 10  # ▁a ▁photo ▁of ▁cat s </s> <pad>...
    ours_records = [record for record in caplog.records if record.name == "jaxdiff.latent.t5_tokenizer"]
    dropped = [record.getMessage().split("16 tokens: ", 1)[1] for record in ours_records]
    assert dropped == ["'.'", "'iling spaces'", "'es'", "'" + "cat the " * 4 + "cat'"]  # prompts 2, 3, 4 and 8
    full = tokenizer(PROMPTS[-1:])  # model_max_length: nothing truncated
    assert full.input_ids.shape == (1, 512) and full.attention_mask.sum() == 25
    reference.save_pretrained(tmp_path / "saved")  # transformers 5's tokenizer.json, padding to 16 written in it
    assert json.loads((tmp_path / "saved" / "tokenizer.json").read_text())["padding"] is not None
    saved = T5Tokenizer.from_folder(tmp_path / "saved")(PROMPTS, max_length=16)
    np.testing.assert_array_equal(saved.input_ids, expected["input_ids"])


def test_spiece_model_matches_transformers(tmp_path):
    """A SentencePiece model trained here: spiece.model alone (SentencePiece), and the tokenizer.json transformers
    converts it to (its Precompiled normaliser: NFKC folds the full-width letters)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    text = ["A photo of a cat sitting on the mat.", "The dog runs in space, fast!", "Café au lait, naïve résumé.",
            "Ｆｕｌｌｗｉｄｔｈ text and 12345 numbers", "cats and dogs and birds"]  # fmt: skip
    (tmp_path / "spm").mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text * 20), model_prefix=str(tmp_path / "spm" / "spiece"), vocab_size=50,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    (tmp_path / "spm" / "spiece.vocab").unlink()
    reference = transformers.T5TokenizerFast.from_pretrained(tmp_path / "spm", extra_ids=0)
    prompts = ["A photo of a cat", "  the  dog\tin space ", "Ｆｕｌｌｗｉｄｔｈ café", "cats " * 20]
    expected = reference(prompts, padding="max_length", max_length=16, truncation=True)["input_ids"]
    reference.save_pretrained(tmp_path / "converted")
    normalizer = json.loads((tmp_path / "converted" / "tokenizer.json").read_text())["normalizer"]
    assert normalizer["type"] == "Precompiled"
    for folder in ("spm", "converted"):
        np.testing.assert_array_equal(T5Tokenizer.from_folder(tmp_path / folder)(prompts, max_length=16).input_ids,
                                      expected, err_msg=folder)  # fmt: skip


def test_tokenizer_refusals(tmp_path):
    write_t5_tokenizer_json(tmp_path / "tokenizer")
    tokenizer = T5Tokenizer.from_folder(tmp_path / "tokenizer")
    with pytest.raises(UsageError, match="max_length=1 must be an int >= 2"):
        tokenizer("a cat", max_length=1)
    with pytest.raises(UsageError, match="prompts must be a string or a non-empty list of strings"):
        tokenizer([1, 2])
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    with pytest.raises(WeightsError, match="eos_token='<eos>' is not in the vocabulary"):
        T5Tokenizer.from_folder(tmp_path / "tokenizer")
    with pytest.raises(WeightsError, match="has neither tokenizer.json nor spiece.model"):
        T5Tokenizer.from_folder(tmp_path)


def test_spiece_model_alone_needs_sentencepiece(tmp_path):
    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed")
    (tmp_path / "spiece.model").write_bytes(b"\0")
    with pytest.raises(WeightsError, match="has only spiece.model, which needs the sentencepiece package"):
        T5Tokenizer.from_folder(tmp_path)
