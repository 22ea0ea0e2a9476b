"""LoRA files (safetensors only, never pickles) read into one form whatever wrote them: each adapted module's
low-rank factors and the scale its trainer meant, by component (`unet`, `transformer`, `text_encoder`,
`text_encoder_2`) and the module's PyTorch name inside it.

The formats diffusers' `load_lora_weights` reads, and no others:

- diffusers / peft (`save_lora_weights`, `pytorch_lora_weights.safetensors`): `<component>.<module>.lora_A.weight`
  (down) and `.lora_B.weight` (up), e.g. `unet.down_blocks.0.attentions.0.proj_in.lora_A.weight`,
  `text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight` (`text_model.` before `encoder` or not), SD3's and
  Flux's `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`. The
  scale is lora_alpha / r of the peft `LoraConfig` the header's `lora_adapter_metadata` holds (per module
  `rank_pattern` / `alpha_pattern`, matched as peft does; lora_alpha / √r with `use_rslora`), 1 without it.
- older diffusers (scale 1): U-Net `.lora.down.weight` / `.lora.up.weight`, and attention processors'
  `<attention>.processor.to_q_lora.down.weight` (`to_q`, `to_k`, `to_v`, `to_out` -> `to_out.0`); text encoder
  `.lora_linear_layer.down.weight` / `.up.weight`, and `<self_attn>[.processor].to_q_lora.down.weight` (-> `q_proj`,
  `k_proj`, `v_proj`, `out_proj`).
- kohya (sd-scripts, LyCORIS LoCon): `lora_unet_<module>`, `lora_te_<module>` (SDXL: `lora_te1_`, `lora_te2_`), the
  module's dots written `_` (U-Net modules by their diffusers names or, as kohya writes SDXL's, by the original
  LDM / sgm ones, `lora_unet_input_blocks_4_1_...`: `jaxdiff.latent.lora` tells them apart), with `.lora_down.weight`, `.lora_up.weight` and `.alpha`: scale alpha / r (kohya's
  default alpha = r where `.alpha` is absent or 0). A LoCon conv adapter is a kh×kw down with a 1×1 up. Flux's
  kohya files name the transformer's modules as Black Forest Labs' code does (`lora_unet_double_blocks_0_img_attn_qkv`,
  q, k, v fused), read onto our modules by `jaxdiff.latent.lora`; ComfyUI writes them dotted
  (`diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`, `text_encoders.clip_l.transformer.<module>`),
  read as the same `lora_unet_` / `lora_te_` modules.

Factors stay in PyTorch layout: down [r, in] or [r, in, kh, kw], up [out, r] or [out, r, 1, 1]; the weight's
change is ΔW = up @ down over the rank, [out, in(, kh, kw)], and the adapted weight W + scale·ΔW. DoRA
(`dora_scale`, `lora_magnitude_vector`) and LoRA biases (`lora_B.bias`) are refused with the other keys no format
above names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re

import numpy as np

from jaxdiff.checks import is_real
from jaxdiff.errors import MissingWeightsError, WeightsError
from jaxdiff.weights.files import parse_json
from jaxdiff.weights.matching import MAX_LISTED
from jaxdiff.weights.safetensors_reader import open_safetensors, read_tensor

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes in its folder
METADATA_KEY = "lora_adapter_metadata"  # the header entry holding the peft LoraConfig of each component, as JSON
KOHYA_COMPONENTS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_KOHYA_KEY = re.compile(r"^lora_(unet|te1|te2|te)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# ComfyUI's kohya keys with dotted module names (Flux LoRA files), read as `lora_unet_` / `lora_te_` keys.
COMFY_COMPONENTS = {"diffusion_model": "unet", "text_encoders.clip_l.transformer": "text_encoder"}
_COMFY_KEY = re.compile(r"^(diffusion_model|text_encoders\.clip_l\.transformer)\.(.+)\."
                        r"(lora_down\.weight|lora_up\.weight|alpha)$")
KOHYA_PREFIXES = ("lora_", *(f"{prefix}." for prefix in COMFY_COMPONENTS))
_TEXT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up",
                  ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up"}  # fmt: skip
# Each component's key endings -> role, and its attention processors' keys -> (pattern, module renames).
SUFFIXES = {
    "unet": {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up"},
    "transformer": {".lora_A.weight": "down", ".lora_B.weight": "up"},  # SD3, Flux
    "text_encoder": _TEXT_SUFFIXES,
    "text_encoder_2": _TEXT_SUFFIXES,
}
_TEXT_PROCESSOR = (re.compile(r"^(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$"),
                   {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"})  # fmt: skip
PROCESSORS = {
    "unet": (re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$"),
             {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}),
    "text_encoder": _TEXT_PROCESSOR,
    "text_encoder_2": _TEXT_PROCESSOR,
}  # fmt: skip
# peft LoraConfig settings: those that set the scale, and those refused unless off (they change what is added
# beyond up @ down). The others (target_modules, lora_dropout, init_lora_weights, ...) concern training or which
# modules get adapters, which the tensors say.
SCALE_SETTINGS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")
REFUSED_SETTINGS = ("use_dora", "lora_bias", "fan_in_fan_out", "layer_replication", "modules_to_save",
                    "trainable_token_indices", "target_parameters", "use_qalora", "use_bdlora",
                    "alora_invocation_tokens", "arrow_config")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One adapted module: `down` [r, in] or [r, in, kh, kw] and `up` [out, r] or [out, r, 1, 1] (float32, PyTorch
    layout), `scale` the trainer's alpha / r, `keys` the file's keys it was read from."""

    down: np.ndarray
    up: np.ndarray
    scale: float
    keys: tuple[str, ...]

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """The shape of ΔW = up @ down in PyTorch layout: [out, in] or [out, in, kh, kw]."""
        return (self.up.shape[0], *self.down.shape[1:])


@dataclasses.dataclass(frozen=True)
class LoraFile:
    """A LoRA file's adapters: (component, module name) -> factors. `underscored`: kohya names, the module's
    dots written `_` (`down_blocks_0_attentions_0_proj_in`); otherwise PyTorch's dotted names."""

    path: pathlib.Path
    modules: dict[tuple[str, str], LoraModule]
    underscored: bool


def listed(items: list[str]) -> str:
    """`items` joined on one line, the first MAX_LISTED of them and how many more."""
    more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def lora_file_path(path: str | os.PathLike) -> pathlib.Path:
    """The safetensors file of `path`: a file, or a folder holding `pytorch_lora_weights.safetensors`."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHTS_FILE
    if not path.is_file():
        raise MissingWeightsError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: LoRA files are read from .safetensors only (never pickles)")
    return path


def _diffusers_key(key: str) -> tuple[str, str, str] | None:
    """(component, module, role) of a diffusers / peft key, None for a key no such format names."""
    component, _, rest = key.partition(".")
    if component not in SUFFIXES:
        return None
    for suffix, role in SUFFIXES[component].items():
        if rest.endswith(suffix):
            return component, rest[: -len(suffix)], role
    pattern, renames = PROCESSORS.get(component, (None, None))
    match = pattern and pattern.match(rest)
    return (component, f"{match[1]}.{renames[match[2]]}", match[3]) if match else None


def _kohya_key(key: str) -> tuple[str, str, str] | None:
    match = _KOHYA_KEY.match(key)
    if match:
        return KOHYA_COMPONENTS[match[1]], match[2], _KOHYA_ROLES[match[3]]
    match = _COMFY_KEY.match(key)
    return (COMFY_COMPONENTS[match[1]], match[2].replace(".", "_"), _KOHYA_ROLES[match[3]]) if match else None


def _peft_settings(metadata: dict[str, str], path: pathlib.Path) -> dict[str, dict]:
    """Each component's peft LoraConfig settings from the header's `lora_adapter_metadata` ({} without it);
    WeightsError for a setting of REFUSED_SETTINGS that is on, or a scale setting of the wrong type."""
    if METADATA_KEY not in metadata:
        return {}
    where = f"{path} header {METADATA_KEY}"
    content = parse_json(metadata[METADATA_KEY], where)
    if not isinstance(content, dict):
        raise WeightsError(f"{where} must be a JSON object, got {type(content).__name__}")
    settings: dict[str, dict] = {}
    for key, value in content.items():
        component, _, name = key.partition(".")
        settings.setdefault(component, {})[name] = value
    for component, values in settings.items():
        refused = [f"{component}.{name}={values[name]!r}" for name in REFUSED_SETTINGS if values.get(name)]
        if values.get("peft_type", "LORA") != "LORA":
            refused.append(f"{component}.peft_type={values['peft_type']!r}")
        if values.get("bias", "none") != "none":
            refused.append(f"{component}.bias={values['bias']!r}")
        if refused:
            raise WeightsError(f"{where}: {', '.join(refused)}: only plain LoRA (up @ down added to the weight) is "
                               "supported")  # fmt: skip
        for name in ("r", "lora_alpha"):
            if name in values and not (is_real(values[name], finite=True) and values[name] > 0):
                raise WeightsError(f"{where}: {component}.{name}={values[name]!r} must be a number > 0")
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(values.get(name) or {}, dict):
                raise WeightsError(f"{where}: {component}.{name} must be an object of module pattern -> number")
    return settings


def _pattern_value(patterns: dict, module: str, default, where: str):
    """peft's per-module setting: the value of the first pattern that ends the module name at a dot, else `default`."""
    for pattern, value in patterns.items():
        try:
            found = re.match(rf"(.*\.)?({pattern})$", module)
        except re.error as err:
            raise WeightsError(f"{where}: module pattern {pattern!r} is not a regular expression ({err})") from None
        if found:
            if not (is_real(value, finite=True) and value > 0):
                raise WeightsError(f"{where}: {pattern!r}: {value!r} must be a number > 0")
            return value
    return default


def _scale(settings: dict | None, alpha: np.ndarray | None, component: str, module: str, rank: int,
           where: str) -> float | str:  # fmt: skip
    """The module's alpha / r; a message (str) when the file's settings give another rank than the tensors'."""
    if alpha is not None:  # kohya
        value = float(alpha.reshape(-1)[0]) if alpha.size == 1 else math.nan
        if not math.isfinite(value) or value < 0:
            return f"{component}.{module}: alpha {alpha.reshape(-1)[:1].tolist()} must be one finite number >= 0"
        return 1.0 if value == 0 else value / rank
    if not settings:
        return 1.0
    r = _pattern_value(settings.get("rank_pattern") or {}, module, settings.get("r", rank), where)
    lora_alpha = _pattern_value(settings.get("alpha_pattern") or {}, module, settings.get("lora_alpha", r), where)
    if r != rank:
        return f"{component}.{module}: r={r} in the metadata, rank {rank} in the tensors"
    return float(lora_alpha / math.sqrt(r) if settings.get("use_rslora") else lora_alpha / r)


def read_lora_file(path: str | os.PathLike) -> LoraFile:
    """Every adapter of a LoRA file (or of a folder holding `pytorch_lora_weights.safetensors`), checked: one
    WeightsError lists the keys no format names, another the modules lacking their down or up factor, another
    those whose factors do not make a weight change (ranks that differ, an up that is not 1×1, an alpha that is
    not one finite number >= 0). A file whose every key starts with `lora_` (or ComfyUI's `diffusion_model.` /
    `text_encoders.clip_l.transformer.`) is read as kohya's, as diffusers does."""
    path = lora_file_path(path)
    with open_safetensors(path) as f:
        keys = list(f.keys())  # noqa: SIM118 (a safe_open handle)
        kohya = bool(keys) and all(key.startswith(KOHYA_PREFIXES) for key in keys)
        parse = _kohya_key if kohya else _diffusers_key
        entries: dict[tuple[str, str], dict[str, str]] = {}
        unknown = []
        for key in keys:
            parsed = parse(key)
            if parsed is None:
                unknown.append(key)
            else:
                entries.setdefault(parsed[:2], {})[parsed[2]] = key
        if not keys or unknown:
            raise WeightsError(
                f"{path}: {len(unknown)} of its {len(keys)} keys are not LoRA factors of a format jaxdiff reads "
                "(diffusers/peft lora_A/lora_B, older diffusers lora.down/lora.up, kohya lora_down/lora_up/alpha; "
                f"DoRA and LoRA biases are not supported): {listed(unknown)}"
            )
        incomplete = sorted(key for roles in entries.values() if not {"down", "up"} <= roles.keys()
                            for key in roles.values())  # fmt: skip
        if incomplete:
            raise WeightsError(f"{path}: {len(incomplete)} keys lack their down or up factor: {listed(incomplete)}")
        settings = {} if kohya else _peft_settings(f.metadata() or {}, path)
        modules, bad = {}, []
        for (component, module), roles in entries.items():
            down, up = (read_tensor(path, roles[role]) for role in ("down", "up"))
            alpha = read_tensor(path, roles["alpha"]) if "alpha" in roles else None
            name = f"{component}.{module}"
            if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[2:] not in ((), (1, 1)):
                bad.append(f"{name}: down {list(down.shape)} and up {list(up.shape)} are not [r, in(, kh, kw)] and "
                           "[out, r(, 1, 1)]")  # fmt: skip
                continue
            if down.shape[0] != up.shape[1]:
                bad.append(f"{name}: rank {down.shape[0]} in down, {up.shape[1]} in up")
                continue
            scale = _scale(settings.get(component), alpha, component, module, down.shape[0], f"{path} header")
            if isinstance(scale, str):
                bad.append(scale)
                continue
            modules[component, module] = LoraModule(down, up, scale, tuple(sorted(roles.values())))
        if bad:
            raise WeightsError(f"{path}: {len(bad)} adapters whose factors do not make a weight change: {listed(bad)}")
    return LoraFile(path, modules, underscored=kohya)


def peft_file_contents(lora: LoraFile, component: str, rank: int, alpha: float,
                       target_modules: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, str]]:  # fmt: skip
    """(tensors, header metadata) of the diffusers-format file (`save_lora_weights`) holding `lora`'s adapters of
    `component`: each module's down and up factors (float32, PyTorch layout) under its keys (the peft names,
    `<component>.<module>.lora_A.weight` / `.lora_B.weight`), and the peft LoraConfig (`<component>.r`,
    `.lora_alpha`, `.target_modules`) in the header's METADATA_KEY, from which readers take the scale alpha / r."""
    tensors = {}
    for factors in lora.modules.values():
        down_key, up_key = factors.keys
        tensors[down_key], tensors[up_key] = (np.ascontiguousarray(a, np.float32) for a in (factors.down, factors.up))
    peft_config = {f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                   f"{component}.target_modules": list(target_modules)}  # fmt: skip
    return tensors, {"format": "pt", METADATA_KEY: json.dumps(peft_config, indent=2, sort_keys=True)}
