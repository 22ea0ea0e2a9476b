"""Reading PyTorch tensor files without running pickle code: `torch.save` files (zip archive or the legacy format)
and TorchScript archives, by a restricted unpickler that admits only the globals a tensor file needs; PyTorch
itself is not imported. Shared by the FID Inception weights (`jaxdiff.evaluation.inception_weights`) and EDM
snapshots (`jaxdiff.readers.edm_pickle`), whose own unpickler reuses `rebuild_tensor` and reads each storage with
`RestrictedUnpickler`.

A storage pickles as a persistent id ("storage", storage type, key, location, numel[, view]); a tensor as
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, here a strided NumPy view of the storage.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from jaxdiff.errors import WeightsError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy torch.save file
LEGACY_PROTOCOL = 1001  # its second
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip


class UnsafePickleError(WeightsError, pickle.UnpicklingError):
    """A pickle asked for something a plain tensor file never needs (e.g. `os.system`)."""


@dataclasses.dataclass(frozen=True)
class StorageType:
    """Stands in for `torch.FloatStorage` etc.: only its dtype matters."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name])


class ScriptObject:
    """Inert stand-in for a TorchScript class (`__torch__.*`): keeps its pickled attributes."""

    fields: dict

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"{type(self).__name__}: expected a dict of attributes, got {type(state)}")
        self.fields = state


def rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
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


TENSOR_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch.jit._pickle", "build_intlist"): _int_list,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Admits OrderedDict, tensor rebuilding, storage types and (if `script_objects`) inert TorchScript classes."""

    def __init__(self, file: BinaryIO, load_storage: Callable[[str, np.dtype, int], np.ndarray], *,
                 script_objects: bool = False):
        super().__init__(file)
        self._load_storage = load_storage
        self._script_objects = script_objects

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        if (module, name) in TENSOR_GLOBALS:
            return TENSOR_GLOBALS[module, name]
        if self._script_objects and module.startswith("__torch__."):
            return type(name, (ScriptObject,), {"__module__": module})
        raise UnsafePickleError(f"refusing to load global {module}.{name}: not part of a tensor file")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], StorageType)):
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

        unpickler = RestrictedUnpickler(
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
            return RestrictedUnpickler(f, load_storage).load()

        try:
            magic = next_pickle()
        except UnsafePickleError:
            raise
        except Exception as err:
            raise WeightsError(f"{path}: not a PyTorch file (neither a zip archive nor the legacy format)") from err
        if magic != LEGACY_MAGIC or next_pickle() != LEGACY_PROTOCOL:
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
    if isinstance(obj, ScriptObject):
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
