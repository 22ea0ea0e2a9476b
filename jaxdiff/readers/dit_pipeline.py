"""A diffusers `DiTPipeline` folder -> what `jaxdiff.sampling.pipeline.Pipeline` runs (`DiTPipelineFolder`), without
torch:

    model_index.json   _class_name "DiTPipeline"; transformer, vae, scheduler as ["diffusers", class]; id2label
    transformer/       a DiTTransformer2DModel (or the legacy Transformer2DModel): `read_diffusers_dit`
    vae/               an AutoencoderKL: `read_autoencoder`
    scheduler/         scheduler_config.json: `scheduler_settings`, every key honoured or refused in one line

Every key of model_index.json is read or refused in one line naming it. The run config is DiT's
(`jaxdiff.readers.dit_checkpoint.dit_run_config`) with the training schedule and prediction type of the scheduler
config, and classifier-free guidance on every latent channel, as DiTPipeline guides (its `latent_channels`); the
pipeline samples as the scheduler steps (`jaxdiff.latent.scheduler_sampling`). id2label ("0": "tench, Tinca tinca",
...) becomes `class_names` (each comma-separated name -> its class, DiTPipeline's `labels`). DiTPipeline's null class
is the literal 1000 (ImageNet's); here it is the model's num_classes, the same for its 1000-class releases.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import ml_collections

from jaxdiff.checks import is_int
from jaxdiff.diffusion.scheduler_config import SchedulerSettings, apply_scheduler_config, scheduler_settings
from jaxdiff.errors import MissingWeightsError, WeightsError
from jaxdiff.latent.component_weights import read_autoencoder
from jaxdiff.latent.decoding_autoencoder import DecodingAutoencoder
from jaxdiff.latent.scheduler_sampling import folder_sampler
from jaxdiff.readers.dit_checkpoint import DIFFUSERS_CLASSES, dit_run_config, read_diffusers_dit
from jaxdiff.weights.files import MODEL_INDEX_FILE, load_json

PIPELINE_CLASS = "DiTPipeline"
SCHEDULER_FILE = "scheduler_config.json"
# model_index.json: component -> the classes allowed for it (None: any; the scheduler's is its config's _class_name).
COMPONENTS = {"transformer": DIFFUSERS_CLASSES, "vae": ("AutoencoderKL",), "scheduler": None}
INDEX_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "id2label", *COMPONENTS)
# The scheduler config's keys that set the training schedule and what the network predicts.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")


@dataclasses.dataclass(frozen=True)
class DiTPipelineFolder:
    """A DiTPipeline folder read: the run config, the transformer's float32 NumPy params, the autoencoder, the
    scheduler settings and the class names of id2label (name -> class)."""

    config: ml_collections.ConfigDict
    params: dict
    autoencoder: DecodingAutoencoder
    scheduler: SchedulerSettings
    class_names: dict[str, int]


def is_dit_pipeline(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder whose model_index.json names DiTPipeline."""
    try:
        index = json.loads((pathlib.Path(path) / MODEL_INDEX_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("_class_name") == PIPELINE_CLASS


def _class_names(id2label, num_classes: int, source: str) -> dict[str, int]:
    """id2label {"<class>": "name, other name", ...} -> {name: class}, each class in [0, num_classes)."""
    if not isinstance(id2label, dict):
        raise WeightsError(f"{source}: id2label is a {type(id2label).__name__}, expected a dict of class -> names")
    names = {}
    for key, value in id2label.items():
        label = int(key) if isinstance(key, str) and key.isdigit() else key
        if not is_int(label, numpy=False) or not 0 <= label < num_classes or not isinstance(value, str):
            raise WeightsError(f"{source}: id2label entry {key!r}: {value!r} is not a class in [0, {num_classes}) "
                               "with its names")  # fmt: skip
        names.update({name.strip(): label for name in value.split(",")})
    return names


def _index(folder: pathlib.Path, scheduler_class: str | None) -> dict:
    """model_index.json, every key checked; `scheduler_class` is the scheduler config's _class_name."""
    source = str(folder / MODEL_INDEX_FILE)
    index = load_json(folder / MODEL_INDEX_FILE)
    unknown = sorted(set(index) - set(INDEX_KEYS))
    if unknown:
        raise WeightsError(f"{source}: unknown DiTPipeline entries {unknown}; known: {list(INDEX_KEYS)}")
    if index.get("_class_name") != PIPELINE_CLASS:
        raise WeightsError(f"{source}: _class_name={index.get('_class_name')!r}; expected {PIPELINE_CLASS!r}")
    for component, classes in COMPONENTS.items():
        entry = index.get(component)
        allowed = classes or (scheduler_class,)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == "diffusers" and entry[1] in allowed):
            raise WeightsError(f"{source}: unsupported {component}={entry!r}; expected ['diffusers', one of "
                               f"{list(allowed)}]" + ("" if classes else f" (the class of {SCHEDULER_FILE})"))
    return index


def read_dit_pipeline(folder: str | os.PathLike, *, dtype: str = "float32") -> DiTPipelineFolder:
    """A diffusers DiTPipeline folder (module docstring), its transformer computing in `dtype` and held in it (the
    VAE in float32); bad or missing files raise WeightsError naming them."""
    folder = pathlib.Path(folder)
    scheduler_file = folder / "scheduler" / SCHEDULER_FILE
    if not scheduler_file.is_file():
        raise MissingWeightsError(f"{folder}: no scheduler/{SCHEDULER_FILE} (expected a diffusers DiTPipeline folder)")
    settings = load_json(scheduler_file)
    scheduler = scheduler_settings(settings, str(scheduler_file))
    folder_sampler(scheduler, str(scheduler_file))  # a class jaxdiff steps as
    index = _index(folder, settings.get("_class_name"))
    model_config, params = read_diffusers_dit(folder / "transformer", dtype=dtype)
    config = dit_run_config(model_config, guidance_channels=0)
    var_type = config.diffusion.var_type  # what the network's σ channels are, whatever the scheduler reads
    apply_scheduler_config(config, {key: settings[key] for key in SCHEDULE_KEYS if key in settings},
                           str(scheduler_file))  # fmt: skip
    config.diffusion.var_type, config.sampling.clip_denoised = var_type, False
    vae_config, vae_params = read_autoencoder(folder / "vae")
    if vae_config.shift_factor:
        raise WeightsError(f"{folder / 'vae'}: shift_factor={vae_config.shift_factor}; DiTPipeline decodes latents "
                           "/ scaling_factor, with no shift")  # fmt: skip
    autoencoder = DecodingAutoencoder(vae_config, vae_params)
    autoencoder.check_latents((model_config.image_size, model_config.image_size, model_config.in_channels),
                              str(folder))  # fmt: skip
    names = _class_names(index.get("id2label", {}), model_config.num_classes, str(folder / MODEL_INDEX_FILE))
    return DiTPipelineFolder(config, params, autoencoder, scheduler, names)
