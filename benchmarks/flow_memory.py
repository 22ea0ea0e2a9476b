"""Per-device memory of one forward of SD3.5-large's and Flux.1-dev's transformers and of the T5-XXL encoder, by
`jaxdiff.models.param_sharding.estimate_memory` (shapes only: nothing is allocated, no weights needed).

Parameters are cast to the compute dtype and split over the devices by the FSDP rule (`state_sharding`); the inputs
are replicated (batch 1), so the activations count in full on every device (an upper bound: XLA may split them);
with several devices one block's weights are gathered in full. Text: SD3's 77 CLIP + 256 T5 tokens, Flux's 512 T5
tokens; T5 alone at 512 tokens. `--attention cudnn` estimates the transformers with cuDNN's flash attention (no
S×S logits).

    python benchmarks/flow_memory.py [--size 1024] [--dtype bfloat16] [--devices 1 4 8] [--attention auto]

Prints a markdown table (GiB per device).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxdiff.models import flux, mmdit  # noqa: E402
from jaxdiff.models.param_sharding import estimate_memory  # noqa: E402
from jaxdiff.models.t5_encoder import create_t5_encoder, t5_encoder_config  # noqa: E402

GIB = 2**30
# stabilityai/stable-diffusion-3.5-large transformer/config.json.
SD35_LARGE = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm",
)  # fmt: skip
# google/t5-v1_1-xxl's encoder: the text encoder of SD3 and Flux.
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
)  # fmt: skip


def networks(dtype: str, attention: str) -> dict:
    return {
        "SD3.5-large transformer": mmdit.create_mmdit(mmdit.mmdit_config(SD35_LARGE, dtype=dtype, attention=attention)),
        "Flux.1-dev transformer": flux.create_flux(flux.flux_config(flux.FLUX_DEV, dtype=dtype, attention=attention)),
        "T5-XXL encoder (512 tokens)": create_t5_encoder(t5_encoder_config(T5_XXL, dtype=dtype)),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image height and width in pixels")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--attention", choices=("auto", "cudnn"), default="auto")
    args = parser.parse_args(argv)
    rows = []
    print(f"{args.size}² pixels, batch 1, {args.dtype}, attention {args.attention}; GiB per device")
    print("| network | parameters | devices | parameters GiB | gathered block GiB | activations GiB | total GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, model in networks(args.dtype, args.attention).items():
        for devices in args.devices:
            e = estimate_memory(model, height=args.size, width=args.size, dtype=args.dtype, devices=devices)
            rows.append({"network": name, "devices": devices, **vars(e), "total_bytes": e.total_bytes})
            print(f"| {name} | {e.parameters:,} | {devices} | {e.param_bytes / GIB:.2f} | {e.gathered_bytes / GIB:.2f} "
                  f"| {e.activation_bytes / GIB:.2f} | {e.total_bytes / GIB:.2f} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
