"""Sharded inference of the MMDiT, Flux's transformer and T5 on 8 simulated CPU devices against the unsharded
forwards, the parameters' split, the memory estimate against XLA's memory analysis and against a NumPy reference of
the sharding rule, and `jaxdiff info --pretrained` on SD3 / Flux folders (configs only)."""

import json
import math

import jax
import jax.numpy as jnp
import pytest

from jaxdiff.cli import main
from jaxdiff.errors import ConfigError, UsageError
from jaxdiff.latent.component_weights import param_shapes
from jaxdiff.models import flux, mmdit, param_sharding
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.models.clip_text import clip_text_config, create_clip_text
from jaxdiff.models.t5_encoder import create_t5_encoder, t5_encoder_config
from tests.helpers import run_python

SD3_MEDIUM_PARAMETERS = 2_028_328_000  # REFERENCE_NEXT.md: diffusers 0.42.1
FLUX_DEV_PARAMETERS = 11_901_408_320
DEVICES = 8
# Tiny networks whose widths divide over 8 devices (D = 16; MLP 64), as diffusers / transformers config.json dicts.
TINY_MMDIT = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                  joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                  pos_embed_max_size=6, qk_norm="rms_norm")  # fmt: skip
TINY_FLUX = dict(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=24, pooled_projection_dim=8, axes_dims_rope=[2, 2, 4], guidance_embeds=True)
TINY_T5 = dict(vocab_size=64, d_model=16, d_kv=8, d_ff=40, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, feed_forward_proj="gated-gelu")  # fmt: skip
TINY_CLIP = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=12, bos_token_id=98, eos_token_id=99, pad_token_id=1)
TINY_VAE = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=16, norm_num_groups=4,
                use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip
MIN_SIZE = 64  # elements: the tiny networks' kernels are split, their biases and norms mostly not
RTOL = 1e-5  # max |sharded − unsharded| / max |unsharded|, float32
# XLA memory_analysis / estimate of the small networks below, measured (JAX 0.10.2, CPU): one device 0.97 (MMDiT),
# 0.92 (Flux), 0.83 (T5); batch-split over 8 devices 0.98 (MMDiT), 0.91 (Flux); replicated inputs on 8 devices 0.14,
# 0.13 (XLA splits the activations along the sharded weights).
ONE_DEVICE_FACTOR = 1.35
SHARDED_FACTOR = 2.0


def reference_shard_elements(shape, devices, min_size) -> int:
    """Elements one device holds of a leaf by the documented FSDP rule, in plain Python: split along the largest
    dimension divisible by `devices` (the later one on ties) when the leaf has at least `min_size` elements."""
    size = math.prod(shape)
    axes = [a for a, n in enumerate(shape) if n % devices == 0]
    if devices == 1 or size < min_size or not axes:
        return size
    return size // devices


def test_estimate_parameter_bytes_follow_the_rule_for_flux_dev():
    """Flux.1-dev (11.9 B parameters, abstract): bfloat16 bytes per device on 1 and 8 devices from the rule written
    here, and more than params/8 on 8 devices (small leaves are replicated)."""
    model = flux.create_flux(flux.flux_config(flux.FLUX_DEV, dtype="bfloat16"))
    shapes = [leaf.shape for leaf in jax.tree.leaves(param_sharding.param_shapes(model))]
    held = {}
    for devices in (1, 8):
        e = param_sharding.estimate_memory(model, devices=devices, dtype="bfloat16")
        assert e.parameters == FLUX_DEV_PARAMETERS
        held[devices] = e.param_bytes
        assert held[devices] == 2 * sum(reference_shard_elements(s, devices, 2**14) for s in shapes)
    assert held[1] == 2 * FLUX_DEV_PARAMETERS
    assert 2 * FLUX_DEV_PARAMETERS / 8 < held[8] < 1.01 * 2 * FLUX_DEV_PARAMETERS / 8


def test_estimate_activation_terms_by_hand():
    """The activation peak of SD3-medium at 1024² in bfloat16 (4096 + 333 tokens, 24 heads × 64) from the module
    doc's formula worked out here, and cuDNN attention dropping the S×S arrays; bad arguments refused."""
    model = mmdit.create_mmdit(mmdit.sd3_medium_config(dtype="bfloat16"))
    s, d, h = 4096 + 77 + 256, 1536, 24
    streams = 2 * s * d * 4
    attention = 5 * s * d * 2 + h * s * s * (4 + 4 + 2)
    mlp = 2 * s * d * 2 + 2 * s * 4 * d * 2
    e = param_sharding.estimate_memory(model, devices=1)
    assert e.activation_bytes == streams + max(attention, mlp)
    assert e.param_bytes == 2 * SD3_MEDIUM_PARAMETERS and e.gathered_bytes == 0
    cudnn = mmdit.create_mmdit(mmdit.sd3_medium_config(dtype="bfloat16", attention="cudnn"))
    assert param_sharding.estimate_memory(cudnn).activation_bytes == streams + max(5 * s * d * 2, mlp)
    with pytest.raises(UsageError, match="devices=0 must be a positive integer"):
        param_sharding.estimate_memory(model, devices=0)
    with pytest.raises(UsageError, match="batch=3 does not split evenly over 2 devices"):
        param_sharding.estimate_memory(model, batch=3, devices=2, batch_sharded=True)
    with pytest.raises(ConfigError, match="dtype"):
        param_sharding.estimate_memory(model, dtype="float16")


SHARDED_SCRIPT = f"""
import jax, jax.numpy as jnp, numpy as np
from jaxdiff.models import flux, layers, mmdit, param_sharding as ps
from jaxdiff.models.t5_encoder import create_t5_encoder, t5_encoder_config

layers.QUERY_CHUNK = None  # the estimate is an accelerator's XLA attention (whole score matrices), not CPU's blocks

N, MIN_SIZE, RTOL = {DEVICES}, {MIN_SIZE}, {RTOL}
mesh = ps.inference_mesh()
assert mesh.devices.shape == (1, N)
rng = np.random.default_rng(0)
cases = {{
    "mmdit": mmdit.create_mmdit(mmdit.mmdit_config({TINY_MMDIT!r})),
    "flux": flux.create_flux(flux.flux_config({TINY_FLUX!r})),
    "t5": create_t5_encoder(t5_encoder_config({TINY_T5!r})),
}}

def inputs(name, model, batch):
    if name == "t5":
        return (rng.integers(0, 64, (batch, 7)).astype(np.int32),)
    if name == "mmdit":
        return (rng.standard_normal((batch, 8, 8, 4), np.float32), rng.uniform(0, 1000, batch).astype(np.float32),
                rng.standard_normal((batch, 5, 24), np.float32), rng.standard_normal((batch, 8), np.float32))
    ids = flux.latent_image_ids(8, 8)
    return (rng.standard_normal((batch, 16, 16), np.float32), rng.uniform(0, 1, batch).astype(np.float32),
            rng.standard_normal((batch, 5, 24), np.float32), rng.standard_normal((batch, 8), np.float32),
            ids, np.zeros((5, 3), np.float32), np.full(batch, 3.5, np.float32))

for name, model in cases.items():
    shapes = ps.param_shapes(model)
    # random float32 parameters (std 0.3: the zero-initialised layers count), on the host
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)
    placed = ps.shard_params(params, mesh, min_size=MIN_SIZE)
    split = 0
    for host, leaf in zip(jax.tree.leaves(params), jax.tree.leaves(placed)):
        shards = leaf.addressable_shards
        assert len({{s.device for s in shards}}) == N
        divisible = any(n % N == 0 for n in host.shape)
        if host.size >= MIN_SIZE and divisible:
            split += 1
            assert all(s.data.size * N == host.size for s in shards), (name, host.shape, shards[0].data.shape)
            pieces = np.concatenate([np.asarray(s.data).ravel() for s in shards])
            assert sorted(pieces.tolist()) == sorted(host.ravel().tolist())
        else:
            assert all(s.data.shape == host.shape for s in shards)
        np.testing.assert_array_equal(np.asarray(leaf), host)
    assert split >= 6, (name, split)
    for batch, batch_args in ((1, ()), (N, ps.batch_argnums(model))):
        args = inputs(name, model, batch)
        expected = np.asarray(model.apply({{"params": params}}, *args), np.float64)
        got = np.asarray(ps.sharded_forward(model, mesh, batch_argnums=batch_args)(placed, *args), np.float64)
        error = np.abs(got - expected).max() / np.abs(expected).max()
        assert error <= RTOL, (name, batch, error)
        print(name, batch, "error", error)
print("OK")
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sharded_forwards_equal_unsharded_and_parameters_are_split():
    """MMDiT, Flux and T5 on 8 devices: every large leaf is split 1/8 per device (the shards together are the
    leaf), small ones replicated; the forward with replicated inputs (batch 1) and with batch-split inputs (batch
    8) equals the single-device forward to 1e-5."""
    out = run_python(SHARDED_SCRIPT, devices=DEVICES, timeout=280)
    assert out.strip().endswith("OK"), out


MEMORY_SCRIPT = f"""
import json
import jax, numpy as np
from jax.sharding import Mesh
from jaxdiff.models import flux, layers, mmdit, param_sharding as ps
from jaxdiff.models.t5_encoder import create_t5_encoder, t5_encoder_config

layers.QUERY_CHUNK = None  # the estimate is an accelerator's XLA attention (whole score matrices), not CPU's blocks

N = {DEVICES}
mmdit_model = mmdit.create_mmdit(mmdit.mmdit_config(dict(sample_size=64, num_layers=3, attention_head_dim=32,
    num_attention_heads=8, caption_projection_dim=256, joint_attention_dim=128, pooled_projection_dim=64,
    pos_embed_max_size=64)))
flux_model = flux.create_flux(flux.flux_config(dict(num_layers=1, num_single_layers=2, attention_head_dim=32,
    num_attention_heads=8, axes_dims_rope=[8, 12, 12], joint_attention_dim=128, pooled_projection_dim=64,
    guidance_embeds=True)))
t5_model = create_t5_encoder(t5_encoder_config(dict(vocab_size=1000, d_model=256, d_kv=32, d_ff=640, num_layers=3,
    num_heads=8, feed_forward_proj="gated-gelu")))
one = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
results = {{}}
for name, model, size, tokens in (("mmdit", mmdit_model, 512, 64), ("flux", flux_model, 512, 64),
                                  ("t5", t5_model, 64, 256)):
    settings = dict(height=size, width=size, text_tokens=tokens, dtype="float32", min_size=1024)
    e = ps.estimate_memory(model, devices=1, **settings)
    results[name, 1] = ps.compiled_memory(model, one, **settings)["total"] / e.total_bytes
    if name != "t5":
        batch = dict(settings, batch=N, batch_sharded=True)
        e = ps.estimate_memory(model, devices=N, **batch)
        results[name, N] = ps.compiled_memory(model, ps.inference_mesh(), **batch)["total"] / e.total_bytes
        e = ps.estimate_memory(model, devices=N, **settings)
        measured = ps.compiled_memory(model, ps.inference_mesh(), **settings)["total"]
        results[name, "replicated"] = measured / e.total_bytes
print("RATIOS", json.dumps({{f"{{k[0]}}-{{k[1]}}": round(v, 3) for k, v in results.items()}}))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_memory_estimate_against_xla_memory_analysis():
    """compiled memory / estimate of small MMDiT, Flux (4096 + 64 tokens, D = 256) and T5 (256 tokens) forwards:
    within ONE_DEVICE_FACTOR on one device, within SHARDED_FACTOR batch-split over 8 devices, and at most 1 with
    replicated inputs over 8 devices (the estimate counts the whole activations there: an upper bound)."""
    out = run_python(MEMORY_SCRIPT, devices=DEVICES, timeout=280)
    ratios = json.loads(out.split("RATIOS", 1)[1])
    print(ratios)
    for key, ratio in ratios.items():
        if key.endswith("-1"):
            assert 1 / ONE_DEVICE_FACTOR <= ratio <= ONE_DEVICE_FACTOR, (key, ratio)
        elif key.endswith(f"-{DEVICES}"):
            assert 1 / SHARDED_FACTOR <= ratio <= SHARDED_FACTOR, (key, ratio)
        else:
            assert ratio <= 1.0, (key, ratio)
    assert len(ratios) == 7


def write_pipeline(folder, transformer: dict, *, flux_pipeline: bool, count: bool = True) -> dict:
    """A diffusers SD3 (or Flux) pipeline folder holding only config.json files, as diffusers and transformers
    write them; returns {component: parameter count} from each config through eval_shape (empty unless `count`)."""
    clip = dict(TINY_CLIP, architectures=["CLIPTextModelWithProjection"], model_type="clip_text_model")
    t5 = dict(TINY_T5, architectures=["T5EncoderModel"], model_type="t5")
    ids = (jax.ShapeDtypeStruct((1, 1), jnp.int32),)
    vae_image = (jax.ShapeDtypeStruct((1, 2, 2, 3), jnp.float32),)
    if flux_pipeline:
        settings = dict(transformer, _class_name="FluxTransformer2DModel")
        transformer_entry = (flux.flux_config, flux.create_flux, settings)
        components = {"text_encoder": dict(clip, architectures=["CLIPTextModel"]), "text_encoder_2": t5}
    else:
        settings = dict(transformer, _class_name="SD3Transformer2DModel")
        transformer_entry = (mmdit.mmdit_config, mmdit.create_mmdit, settings)
        components = {"text_encoder": clip, "text_encoder_2": clip, "text_encoder_3": t5}
    entries = {"transformer": transformer_entry}
    for name, settings in components.items():
        entries[name] = (t5_encoder_config if "T5" in settings["architectures"][0] else clip_text_config,
                         create_t5_encoder if "T5" in settings["architectures"][0] else create_clip_text, settings)
    entries["vae"] = (autoencoder_config, create_autoencoder, dict(TINY_VAE, _class_name="AutoencoderKL"))
    index = {"_class_name": "FluxPipeline" if flux_pipeline else "StableDiffusion3Pipeline"}
    for name, (_, _, settings) in entries.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(settings))
        index[name] = ["diffusers" if "_class_name" in settings else "transformers",
                       settings.get("_class_name") or settings["architectures"][0]]
    (folder / "model_index.json").write_text(json.dumps(index))
    counted = {}
    for name, (make_config, create, settings) in entries.items() if count else ():
        model = create(make_config({k: v for k, v in settings.items() if k != "_class_name"}))
        inputs = (mmdit.example_inputs(model, size=2) if name == "transformer" and not flux_pipeline
                  else flux.example_inputs(model) if name == "transformer" else vae_image if name == "vae" else ids)
        counted[name] = sum(math.prod(s) for s in param_shapes(model, *inputs).values())
    return counted


def table_counts(out: str) -> dict:
    """{component: parameter count} from the printed table."""
    counts = {}
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
            counts[fields[0]] = int(fields[2].replace(",", ""))
    return counts


@pytest.mark.parametrize("flux_pipeline", [False, True], ids=["sd3", "flux"])
def test_info_pretrained_prints_each_components_parameters(tmp_path, capsys, flux_pipeline):
    """Tiny folders: each component's count as eval_shape gives it from its config, and the total."""
    counted = write_pipeline(tmp_path, TINY_FLUX if flux_pipeline else TINY_MMDIT, flux_pipeline=flux_pipeline)
    assert main(["info", "--pretrained", str(tmp_path), "--devices", "2", "--height", "64", "--width", "32",
                 "--dtype", "float32"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert table_counts(out) == counted
    assert f"{sum(counted.values()):,}" in out and "64×32, batch 1, float32, 2 device(s)" in out
    assert "peak, one component on the devices at a time" in out


@pytest.mark.parametrize("flux_pipeline", [False, True], ids=["sd3-medium", "flux-dev"])
def test_info_pretrained_counts_the_real_transformers(tmp_path, capsys, flux_pipeline):
    """SD3-medium's and Flux.1-dev's transformer config.json: the published counts."""
    transformer = flux.FLUX_DEV if flux_pipeline else mmdit.SD3_MEDIUM
    write_pipeline(tmp_path, transformer, flux_pipeline=flux_pipeline, count=False)
    assert main(["info", "--pretrained", str(tmp_path), "--devices", "8"]) == 0
    expected = FLUX_DEV_PARAMETERS if flux_pipeline else SD3_MEDIUM_PARAMETERS
    assert table_counts(capsys.readouterr().out)["transformer"] == expected


@pytest.mark.parametrize("flags, message", [
    (["--devices", "0"], "--devices 0 must be a positive integer"),
    (["--devices", "-3"], "--devices -3 must be a positive integer"),
    (["--height", "1000"], "--height 1000 must be a positive multiple of 16 pixels"),
])  # fmt: skip
def test_info_pretrained_refuses_bad_flags_in_one_line(tmp_path, capsys, flags, message):
    write_pipeline(tmp_path, TINY_MMDIT, flux_pipeline=False, count=False)
    assert main(["info", "--pretrained", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"jaxdiff: error: {message}\n"


def test_info_estimate_flags_need_a_flow_folder(tmp_path, capsys):
    assert main(["info", "--config", "tiny", "--devices", "4"]) == 2
    assert capsys.readouterr().err == ("jaxdiff: error: --devices: only for --pretrained SD3 / Flux pipeline folders "
                                       "(memory estimates)\n")  # fmt: skip


PIPELINE_SCRIPT = """
import pathlib
import jax
import numpy as np
from jaxdiff.weights.lora_files import LoraFile, LoraModule
from jaxdiff.latent.flux_pipeline import FluxPipeline
from jaxdiff.latent.sd3 import SD3Pipeline
from jaxdiff.models import param_sharding
from jaxdiff.models.param_sharding import inference_mesh
from tests.test_flux_pipeline import jax_flux
from tests.test_sd3_pipeline import SIZE, T5_LENGTH, build_jax_sd3

param_sharding.shard_params.__kwdefaults__["min_size"] = MIN_SIZE  # the tiny networks' leaves are all small
mesh = inference_mesh()
run = dict(steps=2, max_sequence_length=T5_LENGTH, output_type="float")
for name, whole, cls in (("sd3", build_jax_sd3(), SD3Pipeline), ("flux", jax_flux(True), FluxPipeline)):
    split = cls(whole.model, mesh)
    large = [leaf for leaf in jax.tree.leaves(split.params["transformer"]) if leaf.size >= MIN_SIZE]
    assert large and all(leaf.addressable_shards[0].data.size * 8 == leaf.size for leaf in large), name
    images = np.zeros((2, SIZE, SIZE, 3), np.uint8) + np.arange(SIZE, dtype=np.uint8)[None, :, None, None] * 8
    for call in (lambda p: p.text_to_image(["a cat", "a dog"], seed=1, height=SIZE, width=SIZE, **run),
                 lambda p: p.image_to_image(images, ["a cat", "a dog"], strength=0.6, seed=2, **run)):
        expected, got = call(whole), call(split)
        error = float(np.abs(got - expected).max())
        assert error <= 1e-5, (name, error)
        print(name, "max difference", error)
    d = whole.model.transformer_config.num_attention_heads * whole.model.transformer_config.attention_head_dim
    rng = np.random.default_rng(0)
    lora = LoraFile(pathlib.Path("peft"), {("transformer", "transformer_blocks.0.attn.to_q"): LoraModule(
        rng.normal(size=(2, d)).astype(np.float32), rng.normal(size=(d, 2)).astype(np.float32), 0.5, ("a",))},
        underscored=False)
    for pipe in (whole, split):
        pipe.load_lora(lora)
    expected, got = (p.text_to_image(["a cat"], seed=1, height=SIZE, width=SIZE, **run) for p in (whole, split))
    assert float(np.abs(got - expected).max()) <= 1e-5, name
    assert split._run_params["transformer"]["transformer_blocks_0"]["attn"]["to_q"]["kernel"].sharding == (
        split.params["transformer"]["transformer_blocks_0"]["attn"]["to_q"]["kernel"].sharding)
print("OK")
""".replace("MIN_SIZE", "64")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sharded_pipelines_equal_unsharded():
    """SD3 and Flux pipelines built with an 8-device mesh hold their parameters split (1/8 of each large leaf per
    device; leaves of 64 elements and more here) and give the single-device pipelines' images (text-to-image and
    image-to-image) to 1e-5, with a LoRA too (its adapted weights split as the originals)."""
    out = run_python(PIPELINE_SCRIPT, devices=DEVICES, timeout=280)
    assert out.strip().endswith("OK"), out
