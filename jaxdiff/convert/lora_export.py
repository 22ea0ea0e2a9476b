"""Writing a LoRA run's adapters (`training.lora`) as diffusers' `save_lora_weights` writes LoRA weights: one
`pytorch_lora_weights.safetensors` with peft's names, `unet.<module>.lora_A.weight` (down [r, in] or [r, in, kh, kw])
and `unet.<module>.lora_B.weight` (up [out, r] or [out, r, 1, 1]), float32 in PyTorch layout, and the peft
`LoraConfig` in the header's `lora_adapter_metadata` (`unet.r`, `unet.lora_alpha`, `unet.target_modules`), from
which diffusers' `load_lora_weights` (and `jaxdiff.latent.lora`) take the scale alpha / r. A flow_lora run's
adapters (SD3 / Flux transformer) are written under `transformer.` instead of `unet.`."""

from __future__ import annotations

import os
import pathlib
from typing import NamedTuple

import ml_collections
import numpy as np
import safetensors.numpy

from jaxdiff.errors import UsageError
from jaxdiff.training.flow_lora_step import COMPONENT as FLOW_COMPONENT
from jaxdiff.training.latent_step import trained_lora
from jaxdiff.training.lora_base import lora_scale, lora_target_modules
from jaxdiff.weights.lora_files import LORA_WEIGHTS_FILE, peft_file_contents


class LoraExport(NamedTuple):
    """An exported LoRA file: tensors by their peft names, and the safetensors header's metadata."""

    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]


def lora_export(config: ml_collections.ConfigDict, params: dict, source: str | os.PathLike) -> LoraExport:
    """The LoRA file of the adapters `params["lora"]` of the LoRA run at `source` with config `config`; UsageError
    for a run that trained no adapters."""
    lora = config.training.lora
    if config.task not in ("latent", "flow_lora") or not lora.rank:
        raise UsageError(f"{source} is not a LoRA run (task 'latent' or 'flow_lora' with training.lora.rank > 0; it "
                         f"is task {config.task!r}, rank {lora.rank}): convert it with --to diffusers")  # fmt: skip
    component = FLOW_COMPONENT if config.task == "flow_lora" else "unet"
    contents = peft_file_contents(trained_lora(params["lora"], lora_scale(lora), source, component), component,
                                  lora.rank, lora.alpha or lora.rank, lora_target_modules(lora))  # fmt: skip
    return LoraExport(*contents)


def save_lora_export(export: LoraExport, folder: str | os.PathLike) -> None:
    """Write `export` as `folder`/pytorch_lora_weights.safetensors (the folder exists)."""
    safetensors.numpy.save_file(export.tensors, pathlib.Path(folder) / LORA_WEIGHTS_FILE, metadata=export.metadata)
