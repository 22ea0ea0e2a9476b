"""`jaxdiff info --pretrained FOLDER` for an SD3 / SD3.5 or Flux.1 pipeline folder: each component's parameter count
and per-device memory estimate (`jaxdiff.models.param_sharding.estimate_memory`) from its config.json alone, no
weights read.

The components are the folder's transformer/, text_encoder/, text_encoder_2/, text_encoder_3/ and vae/ that hold a
config.json, each recognised by its class (`_class_name`, or transformers' `architectures`). Text lengths are the
pipelines' defaults: CLIP 77 tokens; T5 256 (SD3) or 512 (Flux); the transformer SD3's 77 + 256 or Flux's 512. The
VAE's estimate is its decode of the height×width image's latents.
"""

from __future__ import annotations

import pathlib
from typing import Any

from jaxdiff.cli.errors import UsageError, reject_extra
from jaxdiff.latent.component_weights import read_config
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.models.clip_text import clip_text_config, create_clip_text
from jaxdiff.models.flux import create_flux, flux_config
from jaxdiff.models.mmdit import create_mmdit, mmdit_config
from jaxdiff.models.param_sharding import estimate_memory
from jaxdiff.models.t5_encoder import create_t5_encoder, t5_encoder_config
from jaxdiff.weights.files import CONFIG_FILE, load_json

GIB = 2**30
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
TRANSFORMERS = {"SD3Transformer2DModel": (mmdit_config, create_mmdit),
                "FluxTransformer2DModel": (flux_config, create_flux)}  # fmt: skip
OTHERS = {
    "AutoencoderKL": (autoencoder_config, create_autoencoder),
    "CLIPTextModel": (clip_text_config, create_clip_text),
    "CLIPTextModelWithProjection": (clip_text_config, create_clip_text),
    "T5EncoderModel": (t5_encoder_config, create_t5_encoder),
}
SD3_T5_TOKENS = 256  # SD3 pipelines' max_sequence_length; Flux's T5 takes 512 (the estimate's default)
SIZE_MULTIPLE = 16  # the VAE's 8× and the transformers' 2×2 patches


def flow_transformer_class(path: str) -> str | None:
    """The class of `path`/transformer/config.json when it is SD3's or Flux's transformer, else None."""
    config = pathlib.Path(path) / "transformer" / CONFIG_FILE
    if not config.is_file():
        return None
    name = load_json(config).get("_class_name")
    return name if name in TRANSFORMERS else None


def _component_class(config_file: pathlib.Path) -> str:
    settings = load_json(config_file)
    names = [settings.get("_class_name"), *(settings.get("architectures") or [])]
    known = [name for name in names if name in {**TRANSFORMERS, **OTHERS}]
    if not known:
        raise UsageError(f"{config_file}: class {names[0] or names[1:]} is none jaxdiff estimates; known: "
                         f"{', '.join({**TRANSFORMERS, **OTHERS})}")  # fmt: skip
    return known[0]


def _check_sizes(devices: int, height: int, width: int) -> None:
    if devices < 1:
        raise UsageError(f"--devices {devices} must be a positive integer")
    for flag, value in (("--height", height), ("--width", width)):
        if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
            raise UsageError(f"{flag} {value} must be a positive multiple of {SIZE_MULTIPLE} pixels")


def flow_pipeline_info(path: str, extra: list[str], *, devices: int, height: int, width: int, dtype: str) -> int:
    """Print the table of the pipeline folder `path` (see the module doc) and its peaks; returns 0."""
    reject_extra(extra)
    _check_sizes(devices, height, width)
    folder = pathlib.Path(path)
    pipeline = flow_transformer_class(path)
    rows: list[tuple[str, str, Any]] = []
    for component in COMPONENTS:
        config_file = folder / component / CONFIG_FILE
        if not config_file.is_file():
            continue
        name = _component_class(config_file)
        make_config, create = {**TRANSFORMERS, **OTHERS}[name]
        model = create(read_config(folder / component, make_config, dtype=dtype))
        # The estimate's defaults otherwise: CLIP's 77, SD3's 77 + 256 and Flux's 512 text tokens, T5's 512.
        tokens = SD3_T5_TOKENS if name == "T5EncoderModel" and pipeline == "SD3Transformer2DModel" else None
        rows.append((component, name, estimate_memory(model, height=height, width=width, text_tokens=tokens,
                                                      dtype=dtype, devices=devices)))  # fmt: skip
    print(f"{folder} ({pipeline}): {height}×{width}, batch 1, {dtype}, {devices} device(s); GiB per device")
    print(f"{'component':16}{'class':30}{'parameters':>16}{'params':>9}{'gathered':>10}{'activations':>13}"
          f"{'total':>9}")  # fmt: skip
    for component, name, e in rows:
        print(f"{component:16}{name:30}{e.parameters:16,}{e.param_bytes / GIB:9.2f}{e.gathered_bytes / GIB:10.2f}"
              f"{e.activation_bytes / GIB:13.2f}{e.total_bytes / GIB:9.2f}")  # fmt: skip
    print(f"{'all':46}{sum(e.parameters for _, _, e in rows):16,}")
    largest = max(rows, key=lambda row: row[2].total_bytes)
    working = max(e.total_bytes - e.param_bytes for _, _, e in rows)
    print(f"peak, one component on the devices at a time: {largest[2].total_bytes / GIB:.2f} GiB ({largest[0]})")
    print(f"peak, every component on the devices: {(sum(e.param_bytes for _, _, e in rows) + working) / GIB:.2f} GiB")
    return 0
