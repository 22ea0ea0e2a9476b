"""Stable Diffusion 1.x text-to-image speed at 512×512 with random weights of the released sizes.

The networks are SD 1.5's (U-Net 859,520,964 parameters, KL autoencoder 83,653,863, CLIP ViT-L/14 text
encoder 123,060,480), their configs written below from diffusers'/transformers' defaults and SD 1.5's
config.json values; the speed does not depend on the weights. Each network's parameters are drawn by its
jitted `init` straight into device memory (float32; `--dtype bfloat16` sets the compute dtype). One prompt
with classifier-free guidance (2 U-Net rows per step), DPM-Solver++ on SD 1.5's scheduler settings.

Reported, for one dtype per process (so that the peak memory is that dtype's):
  compile     seconds of the first `text_to_image` call minus the second (the denoising loop, the text
              encoder and the VAE decode are compiled on the first call);
  run         seconds of a `text_to_image` call with --steps steps (second call);
  U-Net       seconds of one guided U-Net forward (batch 2) alone, best of --repeats, and its compile time;
  20 steps    seconds per image extrapolated to 20 steps: run + (20 − steps)·U-Net (labelled "extrapolated"
              unless --steps is 20), and images/s = 1 / that;
  peak RSS    the process's peak resident memory, `resource.getrusage(RUSAGE_SELF).ru_maxrss`.

    python benchmarks/text_to_image.py --dtype float32 [--steps 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
from tokenizers import pre_tokenizers

from jaxdiff.latent.stable_diffusion import SCHEDULER_PRESETS
from jaxdiff.diffusion.scheduler_config import scheduler_settings
from jaxdiff.latent.bundle import LatentModels
from jaxdiff.latent.pipeline import LatentPipeline
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.models.clip_text import clip_text_config, create_clip_text
from jaxdiff.models.unet_condition import create_unet_condition
from jaxdiff.models.unet_condition_config import config_from_diffusers
from jaxdiff.latent.clip_tokenizer import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_SPECIAL_TOKENS,
    CLIPTokenizer,
    bpe_tokenizer,
)

# SD 1.5's config.json values where they differ from the library defaults.
UNET_SD15 = {"sample_size": 64, "cross_attention_dim": 768}  # UNet2DConditionModel defaults otherwise
VAE_SD15 = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "sample_size": 512}  # fmt: skip
CLIP_VIT_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
              "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77}  # fmt: skip
GUIDANCE, SIZE, TARGET_STEPS = 7.5, 512, 20
PROMPT = "a photograph of an astronaut riding a horse"


def byte_level_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer with only the byte-level symbols as vocabulary (no merges): prompts tokenize to
    single bytes, which costs the same downstream as CLIP's 49,408-token vocabulary."""
    symbols = pre_tokenizers.ByteLevel.alphabet()
    tokens = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(bpe_tokenizer(vocab, [], "<|endoftext|>"), DEFAULT_SPECIAL_TOKENS, DEFAULT_MAX_LENGTH)


def sd15_configs(dtype: str, unet: dict = UNET_SD15, vae: dict = VAE_SD15, text: dict = CLIP_VIT_L):
    """(U-Net, VAE, CLIP text) ConfigDicts with compute dtype `dtype`: SD 1.5's, or those of the given
    diffusers / transformers config values."""
    return (config_from_diffusers(unet, dtype=dtype), autoencoder_config(vae, dtype=dtype),
            clip_text_config(text, dtype=dtype))  # fmt: skip


def random_params(module, *inputs):
    """Parameters drawn by the jitted `init` on small inputs, created once, in device memory."""
    return jax.jit(lambda key: module.init(key, *inputs)["params"])(jax.random.PRNGKey(0))


def random_sd15(dtype: str, unet: dict = UNET_SD15, vae: dict = VAE_SD15, text: dict = CLIP_VIT_L) -> LatentModels:
    """Random-weight SD 1.5 networks (or networks of the given configs) with SD 1.5's scheduler."""
    unet_config, vae_config, text_config = sd15_configs(dtype, unet, vae, text)
    latent = jnp.zeros((1, 8, 8, 4))
    context = jnp.zeros((1, 77, unet["cross_attention_dim"]))
    unet_params = random_params(create_unet_condition(unet_config), latent, jnp.zeros((1,)), context)
    vae_params = random_params(create_autoencoder(vae_config), jnp.zeros((1, 16, 16, 3)))
    text_params = random_params(create_clip_text(text_config), jnp.zeros((1, 77), jnp.int32))
    scheduler = scheduler_settings(SCHEDULER_PRESETS["sd1"], "SD 1.5 preset")
    return LatentModels(unet_config=unet_config, unet_params=unet_params, vae_config=vae_config, vae_params=vae_params,
                        text_config=text_config, text_params=text_params, tokenizer=byte_level_tokenizer(),
                        scheduler=scheduler,
                        settings={"unet": unet, "vae": vae, "text_encoder": text})


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args, **kwargs))
    return time.perf_counter() - start


def unet_forward_seconds(pipe: LatentPipeline, repeats: int) -> tuple[float, float]:
    """(compile seconds, best seconds) of one U-Net forward on the 2 guidance rows at 64×64×4."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, SIZE // 8, SIZE // 8, 4))
    t, context = jnp.full((2,), 500.0), jnp.zeros((2, 77, 768))
    forward = jax.jit(lambda p, x, t, c: pipe.unet.apply({"params": p}, x, t, c))
    start = time.perf_counter()
    compiled = forward.lower(pipe.params["unet"], x, t, context).compile()
    compile_seconds = time.perf_counter() - start
    best = min(timed(compiled, pipe.params["unet"], x, t, context) for _ in range(repeats))
    return compile_seconds, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=2, help="DPM-Solver++ steps actually run (extrapolated to 20)")
    parser.add_argument("--repeats", type=int, default=2, help="U-Net forward timings (best is reported)")
    args = parser.parse_args()
    if not 1 <= args.steps <= TARGET_STEPS:
        parser.error(f"--steps={args.steps} must lie in 1..{TARGET_STEPS}")
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")

    print(f"SD 1.5-sized random weights, {SIZE}x{SIZE}, dtype {args.dtype}, DPM-Solver++, guidance {GUIDANCE}, "
          f"batch 1; {jax.devices()[0].device_kind}, JAX {jax.__version__}", flush=True)  # fmt: skip
    start = time.perf_counter()
    pipe = LatentPipeline(random_sd15(args.dtype))
    report("parameter init", f"{time.perf_counter() - start:8.1f} s")
    run = dict(steps=args.steps, guidance=GUIDANCE, sampler="dpm_solver++", height=SIZE, width=SIZE, seed=0)
    first = timed(pipe.text_to_image, [PROMPT], **run)
    report("first call (compile + run)", f"{first:8.1f} s")
    second = timed(pipe.text_to_image, [PROMPT], **run)
    report("compile (first - second)", f"{first - second:8.1f} s")
    report(f"text_to_image, {args.steps} steps", f"{second:8.1f} s")
    unet_compile, unet_seconds = unet_forward_seconds(pipe, args.repeats)
    report("U-Net forward, batch 2", f"{unet_seconds:8.2f} s   (compile {unet_compile:.1f} s)")
    per_image = second + (TARGET_STEPS - args.steps) * unet_seconds
    label = "measured" if args.steps == TARGET_STEPS else f"extrapolated from {args.steps} steps"
    report("20 steps: s/image", f"{per_image:8.1f} s   ({label})")
    report("20 steps: images/s", f"{1.0 / per_image:8.4f}     ({label})")
    report("peak RSS (ru_maxrss)", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:8.2f} GiB")


def report(what: str, value: str) -> None:
    print(f"{what:28s}{value}", flush=True)

if __name__ == "__main__":
    main()
