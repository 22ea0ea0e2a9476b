"""The pretrained weights a LoRA run adapts, and its adapters' name and scale.

A LoRA run (task `latent` with `training.lora.rank` > 0 on a Stable Diffusion U-Net, task `flow_lora` on an SD3 /
Flux transformer) records the folder and the SHA-256 of the weights it adapts (`lora_base_identity`, in its
checkpoints' extras as "lora_base"); resuming or sampling against other weights is refused (`check_lora_base`).
A trained run's adapters are loaded into its folder's pipeline as `LORA_NAME` at scale 1.
"""

from __future__ import annotations

import hashlib
import os

import flax.traverse_util
import ml_collections
import numpy as np

from jaxdiff.errors import WeightsError
from jaxdiff.latent.unet_weights import read_unet_condition

LORA_NAME = "run"  # the name a LoRA run's adapters are loaded under in its pipeline (`pipe.lora_scales`)
LORA_SOURCE = "training.lora adapters"  # what errors about them call them


def lora_target_modules(lora: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The module name suffixes of `training.lora.target_modules`."""
    return tuple(item.strip() for item in lora.target_modules.split(","))


def lora_scale(lora: ml_collections.ConfigDict) -> float:
    """alpha / r of `training.lora` (alpha 0: alpha = r)."""
    return (lora.alpha or lora.rank) / lora.rank


def weights_digest(params: dict) -> str:
    """SHA-256 of a parameter tree's arrays (float32 bytes, in sorted path order): which weights a LoRA run adapts."""
    digest = hashlib.sha256()
    for path, leaf in sorted(flax.traverse_util.flatten_dict(params).items()):
        digest.update("/".join(path).encode())
        digest.update(np.ascontiguousarray(leaf, np.float32).tobytes())
    return digest.hexdigest()


def check_lora_base(recorded: dict, given: dict) -> None:
    """WeightsError naming both when the U-Net a LoRA run was trained on is not the one given."""
    if recorded != given:
        raise WeightsError(f"this LoRA run was trained on the U-Net of {recorded['path']} (weights sha256 "
                           f"{recorded['sha256'][:12]}) but is given {given['path']} (sha256 {given['sha256'][:12]}); "
                           "use the U-Net it was trained on")  # fmt: skip


def lora_base_identity(folder: str, params: dict) -> dict:
    """{"path": absolute path, "sha256"} of the U-Net `params` of the `unet_init` folder: what a LoRA run adapts."""
    return {"path": os.path.abspath(folder), "sha256": weights_digest(params)}


def read_lora_base(folder: str) -> tuple[dict, dict]:
    """(U-Net params as float32 NumPy, `lora_base_identity`) of the `unet_init` folder."""
    params = read_unet_condition(folder)[1]
    return params, lora_base_identity(folder, params)
