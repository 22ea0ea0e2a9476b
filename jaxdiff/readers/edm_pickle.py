"""EDM's `network-snapshot-*.pkl` -> our `SongUNet` and its preconditioning, without running any of its code.

The snapshot is a plain pickle of dict(ema, loss_fn, augment_pipe, dataset_kwargs). EDM's networks are
"persistent" classes (`torch_utils/persistence.py`): each instance pickles as
`_reconstruct_persistent_obj(meta)`, meta = dict(type="class", version, module_src, class_name, state),
where `module_src` is the source code EDM's loader `exec`s and `state` is the module's `__dict__`
(`_init_args`, `_init_kwargs`, `_parameters`, `_buffers`, `_modules`, ...). Tensors pickle as
`torch._utils._rebuild_tensor_v2` over storages that are themselves small legacy `torch.save` files.

Here a restricted unpickler admits an explicit list of globals only: the reconstruct function becomes a
`PersistentObject` record (class name and state; `module_src` is dropped unread), tensor and storage
rebuilding become NumPy, torch's module containers become inert `ModuleContainer` records, NumPy scalars
(EDM records e.g. skip_scale = np.sqrt(0.5)) are rebuilt from their bytes; anything else
(`os.system`, `builtins.eval`, ...) is refused by name before it is called.

A crafted snapshot is answered by one EdmPickleError naming the file, in memory bounded by the file's size: storages
and tensor views are checked as `jaxdiff.weights.torch_pickle` checks them, modules are walked without recursion to
at most `MAX_NESTING` levels, every recorded constructor argument is type-checked, and the network is traced
(shapes only) once its arguments are known to need no more blocks than the file has tensors.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pathlib
import pickle
import reprlib
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.checks import is_int, is_real
from jaxdiff.weights.torch_layout import param_from_torch, torch_shape
from jaxdiff.weights.matching import match_names
from jaxdiff.errors import WeightsError
from jaxdiff.weights.torch_pickle import collect_tensors, error_summary, read_legacy, rebuild_tensor
from jaxdiff.models import song_unet

PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond")
# EDM's SongUNet constructor arguments in order (for positional `_init_args`).
SONG_UNET_ARGS = (
    "img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim", "model_channels", "channel_mult",
    "channel_mult_emb", "num_blocks", "attn_resolutions", "dropout", "label_dropout", "embedding_type",
    "channel_mult_noise", "encoder_type", "decoder_type", "resample_filter",
)  # fmt: skip
TRAINING_ONLY_ARGS = ("label_dropout",)
# The preconditioning arguments EDM defaults, per class (its `training/networks.py`).
PRECOND_DEFAULTS = {
    "EDMPrecond": dict(sigma_min=0.0, sigma_max=float("inf"), sigma_data=0.5),
    "VPPrecond": dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5),
    "VEPrecond": dict(sigma_min=0.02, sigma_max=100.0),
}
LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "W": "freqs"}
NUMERIC_KINDS = "biufc"


class EdmPickleError(WeightsError):
    """An EDM snapshot that cannot be read safely or holds a network we do not support."""


@dataclasses.dataclass
class PersistentObject:
    """What `_reconstruct_persistent_obj(meta)` would have built: the class name and its pickled state."""

    class_name: str
    state: dict


class ModuleContainer:
    """Inert stand-in for torch's ModuleDict/ModuleList/Sequential: keeps the pickled `__dict__`."""

    state: dict

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


class EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict` (a dict with attribute access): a plain dict here."""


def _mapping(state: dict, key: str) -> dict:
    """`state[key]` if it is a dict, else an empty one (what EDM's modules leave out or a damaged file garbles)."""
    value = state.get(key)
    return value if isinstance(value, dict) else {}


def _persistent_record(meta: Any) -> PersistentObject:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise EdmPickleError("persistent object without type 'class' and a class_name")
    return PersistentObject(meta["class_name"], dict(_mapping(meta, "state")))


def _storage_from_bytes(data: Any) -> np.ndarray:
    """`torch.storage._load_from_bytes`: a storage saved alone in the legacy `torch.save` format."""
    if not isinstance(data, bytes):
        raise EdmPickleError(f"a tensor storage is given as {type(data).__name__}, not bytes")
    try:
        storage = read_legacy(io.BytesIO(data), len(data))
    except WeightsError as err:
        raise EdmPickleError(f"a tensor storage: {err}") from None
    if not isinstance(storage, np.ndarray):
        raise EdmPickleError(f"a tensor storage holds a {type(storage).__name__}, not a storage")
    return storage


def _rebuild_parameter(data: np.ndarray, *_unused) -> np.ndarray:
    return data


def _numpy_dtype(name: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """`numpy.dtype` for numeric types only; always a copy, since unpickling then sets its state."""
    dtype = np.dtype(name) if isinstance(name, str) else None
    if dtype is None or dtype.kind not in NUMERIC_KINDS:
        raise EdmPickleError(f"refusing numpy dtype {reprlib.repr(name)}: only numeric scalars belong in a snapshot")
    return np.dtype(name, bool(align), True)


def _numpy_scalar(dtype: Any, data: Any) -> np.generic:
    """`numpy.core.multiarray.scalar`: one numeric value from its raw bytes (e.g. EDM's skip_scale)."""
    if not (isinstance(dtype, np.dtype) and dtype.kind in NUMERIC_KINDS and isinstance(data, bytes)
            and len(data) == dtype.itemsize):  # fmt: skip
        raise EdmPickleError(f"invalid numpy scalar of dtype {reprlib.repr(dtype)}")
    return np.frombuffer(data, dtype)[0]


def _latin1_bytes(text: Any, encoding: Any) -> bytes:
    """`_codecs.encode(text, "latin1")`: how pickle protocols below 3 store bytes."""
    if not isinstance(text, str) or encoding != "latin1":
        raise EdmPickleError(f"refusing _codecs.encode with encoding {reprlib.repr(encoding)}")
    return text.encode("latin1")


ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # the name protocol 2 writes
    ("__builtin__", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("torch.nn.modules.container", "ModuleDict"): ModuleContainer,
    ("torch.nn.modules.container", "ModuleList"): ModuleContainer,
    ("torch.nn.modules.container", "Sequential"): ModuleContainer,
}


class _SnapshotUnpickler(pickle.Unpickler):
    """Resolves only `ALLOWED_GLOBALS`; everything else is refused, naming the global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[module, name]
        raise EdmPickleError(f"refusing to load global {module}.{name}: not part of an EDM network snapshot")


def read_snapshot(path: str | os.PathLike) -> dict:
    """The snapshot dict with networks as `PersistentObject`s and tensors as NumPy arrays; no code is run."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise EdmPickleError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            snapshot = _SnapshotUnpickler(f).load()
    except WeightsError as err:
        raise EdmPickleError(f"{path}: {err}") from err
    except Exception as err:  # noqa: BLE001 - whatever a damaged file makes the unpickler raise is the file's fault
        raise EdmPickleError(f"{path}: not a readable EDM snapshot ({error_summary(err)})") from err
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("ema"), PersistentObject):
        raise EdmPickleError(f"{path}: not an EDM network snapshot (no persistent 'ema' network)")
    return snapshot


def _module_entries(obj: PersistentObject | ModuleContainer) -> list[tuple[Any, Any]]:
    """A module's persistent parameters and buffers (arrays), then its submodules, as (name, value) pairs."""
    state = obj.state
    skipped = state.get("_non_persistent_buffers_set")
    skipped = skipped if isinstance(skipped, (set, frozenset)) else set()
    entries = [(name, value) for group in ("_parameters", "_buffers") for name, value in _mapping(state, group).items()
               if isinstance(value, np.ndarray) and name not in skipped]  # fmt: skip
    modules = [(name, child) for name, child in _mapping(state, "_modules").items()
               if isinstance(child, (PersistentObject, ModuleContainer))]  # fmt: skip
    return entries + modules


def state_dict(module: PersistentObject | ModuleContainer, source: str, size: int) -> dict[str, np.ndarray]:
    """The module's tensors by torch state-dict name (`model.enc.32x32_conv.weight`), as NumPy copies; read from a
    file (`source`) of `size` bytes, within the bounds of `collect_tensors` (nesting, copies per file byte)."""
    return collect_tensors(module, _module_entries, source, size)


def _recorded_arguments(obj: PersistentObject, source: str) -> tuple[tuple | list, dict]:
    """(`_init_args`, `_init_kwargs`) EDM's persistence recorded for `obj` (none: empty), checked to be a sequence
    and a dict keyed by names."""
    args, kwargs = (obj.state.get(key) for key in ("_init_args", "_init_kwargs"))
    args, kwargs = () if args is None else args, {} if kwargs is None else kwargs
    named = isinstance(kwargs, dict) and all(isinstance(key, str) for key in kwargs)
    if not isinstance(args, (tuple, list)) or not named:
        raise EdmPickleError(f"{source}: {obj.class_name}'s recorded arguments are not a tuple and a dict by name "
                             f"({type(args).__name__}, {type(kwargs).__name__})")  # fmt: skip
    return args, kwargs


def _song_unet_argument(key: str, value: Any, default: Any, source: str) -> Any:
    """A recorded SongUNet argument as our config holds it, checked against the type of its default (int, float,
    string, or tuple of ints); EdmPickleError naming the key, the value and the type expected otherwise."""
    if isinstance(default, tuple):
        valid, expected = isinstance(value, (tuple, list)) and all(is_int(item) for item in value), "a list of ints"
        plain = tuple(int(item) for item in value) if valid else None
    elif isinstance(default, int):
        valid, expected, plain = is_int(value), "an int", int(value) if is_int(value) else None
    elif isinstance(default, float):
        valid, expected, plain = is_real(value), "a number", float(value) if is_real(value) else None
    else:
        valid, expected, plain = isinstance(value, str), "a string", value
    if not valid:
        raise EdmPickleError(f"{source}: SongUNet argument {key}={reprlib.repr(value)} is not {expected}")
    return plain


def song_unet_config(network: PersistentObject, source: str) -> ml_collections.ConfigDict:
    """Our SongUNet config from the constructor arguments EDM recorded (`_init_args`, `_init_kwargs`), each
    type-checked before it is used."""
    if network.class_name != "SongUNet":
        raise EdmPickleError(f"{source}: network {network.class_name} is not supported (only SongUNet)")
    args, kwargs = _recorded_arguments(network, source)
    if len(args) > len(SONG_UNET_ARGS):
        raise EdmPickleError(f"{source}: {len(args)} positional SongUNet arguments; it takes {len(SONG_UNET_ARGS)}")
    kwargs = {**kwargs, **dict(zip(SONG_UNET_ARGS, args))}
    unknown = sorted(set(kwargs) - set(SONG_UNET_ARGS))
    if unknown:
        raise EdmPickleError(f"{source}: unknown SongUNet arguments {reprlib.repr(unknown)}; EDM's are "
                             f"{list(SONG_UNET_ARGS)}")  # fmt: skip
    config = song_unet.default_config()
    config.update({key: _song_unet_argument(key, value, config[key], source) for key, value in kwargs.items()
                   if key not in TRAINING_ONLY_ARGS})  # fmt: skip
    try:
        song_unet.create_song_unet(config)
    except ValueError as err:
        raise EdmPickleError(f"{source}: unsupported SongUNet arguments: {err}") from err
    return config


def edm_name(path: tuple[str, ...]) -> str:
    """EDM's state-dict name of our SongUNet parameter, e.g. ("enc_16x16_down", "conv0", "conv", "kernel")
    -> "model.enc.16x16_down.conv0.weight" (our ResampleConv's inner "conv" is EDM's Conv2d itself)."""
    top = path[0]
    if top.startswith(("enc_", "dec_")):
        top = f"{top[:3]}.{top[4:]}"
    inner = [p for p in path[1:-1] if p != "conv"]
    return ".".join(["model", top, *inner, LEAF_NAMES[path[-1]]])


def _check_size(config: ml_collections.ConfigDict, shapes: list[tuple[int, ...]], source: str) -> None:
    """EdmPickleError unless the network the config describes could be made of tensors of `shapes`: it has at least
    L·(2·num_blocks + 1) UNet blocks (L = len(channel_mult)), each holding tensors, and every width
    (model_channels times a channel multiplier) and the k×k resampling filter are no larger than the largest tensor.
    This bounds the work and memory of tracing the network by the file's size."""
    blocks = len(config.channel_mult) * (2 * config.num_blocks + 1)
    if blocks > len(shapes):
        raise EdmPickleError(f"{source}: channel_mult {tuple(config.channel_mult)} and num_blocks {config.num_blocks} "
                             f"make {blocks} UNet blocks, more than its {len(shapes)} model tensors")  # fmt: skip
    largest = max(map(math.prod, shapes))
    widest = config.model_channels * max(*config.channel_mult, config.channel_mult_emb, config.channel_mult_noise)
    taps = len(config.resample_filter)
    if max(widest, taps**2) > largest:
        raise EdmPickleError(f"{source}: its arguments make layers {widest} channels wide and a {taps}×{taps} "
                             f"resampling filter, larger than its largest model tensor ({largest} "
                             "elements)")  # fmt: skip


def params_from_edm(config: ml_collections.ConfigDict, tensors: dict[str, np.ndarray], source: str) -> dict:
    """Our SongUNet params (NumPy float32) from EDM's `model.*` tensors; resampling filters are derived
    from the config and skipped. Missing, mis-shaped or left-over tensors raise one EdmPickleError; so does a
    config too large for the tensors (`_check_size`), before the network is traced (for its shapes only)."""
    available = {n: t.shape for n, t in tensors.items() if n.startswith("model.") and not n.endswith("resample_filter")}
    _check_size(config, list(available.values()), source)
    model = song_unet.create_song_unet(config)
    size, channels = config.img_resolution, config.in_channels
    images = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, jax.ShapeDtypeStruct((1,), jnp.float32))
    shapes = {p: tuple(s.shape) for p, s in flax.traverse_util.flatten_dict(abstract["params"]).items()}
    wanted = {p: ((edm_name(p),), torch_shape(p, s)) for p, s in shapes.items()}
    try:
        found = match_names(wanted, available, source=source)
    except ValueError as err:
        raise EdmPickleError(str(err)) from err
    flat = {p: param_from_torch(p, tensors[n].astype(np.float32), shapes[p]) for p, n in found.items()}
    return flax.traverse_util.unflatten_dict(flat)


def _precond_info(precond: PersistentObject, source: str) -> dict:
    kwargs = {**PRECOND_DEFAULTS[precond.class_name], **_recorded_arguments(precond, source)[1]}
    for key in PRECOND_DEFAULTS[precond.class_name]:
        if not is_real(kwargs[key]):
            raise EdmPickleError(f"{source}: {precond.class_name} argument {key}={reprlib.repr(kwargs[key])} "
                                 "is not a number")  # fmt: skip
    info = {k: float(kwargs[k]) for k in PRECOND_DEFAULTS[precond.class_name]}
    if precond.class_name == "EDMPrecond":
        return dict(process="edm", parameterization="edm_precond", **info)
    if precond.class_name == "VEPrecond":
        return dict(process="ve", parameterization="ve_precond", **info)
    return dict(process="vp", parameterization="vp_precond", beta_max=info["beta_min"] + info["beta_d"], **info)


def read_edm_snapshot(path: str | os.PathLike) -> tuple[str, ml_collections.ConfigDict, dict, dict]:
    """("song_unet", our network config, params (NumPy), process info) of the snapshot's `ema` network.

    Process info: process ("edm", "vp", "ve"), parameterization ("edm_precond", "vp_precond", "ve_precond")
    and the preconditioning's constants as the snapshot recorded them (EDM's defaults where it did not).
    """
    snapshot = read_snapshot(path)
    precond = snapshot["ema"]
    if precond.class_name not in PRECONDS:
        raise EdmPickleError(f"{path}: preconditioning {precond.class_name} is not supported; supported: {PRECONDS}")
    network = _mapping(precond.state, "_modules").get("model")
    if not isinstance(network, PersistentObject):
        raise EdmPickleError(f"{path}: {precond.class_name} holds no persistent 'model' network")
    info = _precond_info(precond, str(path))
    config = song_unet_config(network, str(path))
    tensors = state_dict(precond, str(path), pathlib.Path(path).stat().st_size)
    return "song_unet", config, params_from_edm(config, tensors, f"{path} (ema)"), info
