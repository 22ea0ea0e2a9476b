"""Reading PyTorch tensor files without running pickle code: `torch.save` files (zip archive or the legacy format)
and TorchScript archives, by a restricted unpickler that admits only the globals a tensor file needs; PyTorch
itself is not imported. Shared by the FID Inception weights (`jaxdiff.evaluation.inception_weights`) and EDM
snapshots (`jaxdiff.readers.edm_pickle`), whose own unpickler reuses `rebuild_tensor`, reads each storage with
`read_legacy` and collects tensors with `collect_tensors`.

`read_zip_archive` gives the unpickled object of a zip archive to readers that need more than its tensors.

A storage pickles as a persistent id ("storage", storage type, key, location, numel[, view]); a tensor as
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, here a strided NumPy view of the storage.

A hostile file gets one `WeightsError` before memory is spent on it; what reading a file builds is bounded by its
size on disk:
- a storage's declared element count must match the bytes the file holds for it, checked before it is allocated
  (a zip member that inflates to more than `MAX_EXPANSION` times its compressed bytes is refused: torch stores
  them uncompressed);
- a tensor's size, stride and offset must be non-negative ints keeping the view inside its storage, and the view
  may hold at most `MAX_EXPANSION` times its storage's elements (torch.save keeps the zero strides of an expanded
  tensor, so zero and overlapping strides are allowed within that bound);
- `collect_tensors` walks nested containers without recursion, at most `MAX_NESTING` deep, and copies tensors
  only while the copies, their names and the containers visited stay within `MAX_EXPANSION` times the file's size.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import reprlib
import textwrap
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from jaxdiff.checks import is_int
from jaxdiff.errors import WeightsError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy torch.save file
LEGACY_PROTOCOL = 1001  # its second
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip
MAX_EXPANSION = 16  # the most a tensor may copy of its storage, and a file's tensors of the file, in bytes (×)
MAX_NESTING = 1000  # the deepest nesting of containers (dicts, modules) a file may have
MAX_DIMS = 32  # the most dimensions a tensor may have


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


def error_summary(err: BaseException) -> str:
    """`Type: message` of an exception, on one line of at most about 200 characters."""
    return f"{type(err).__name__}: {textwrap.shorten(str(err), 200, placeholder=' ...')}"


def _int_sequence(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) <= MAX_DIMS and all(is_int(n, numpy=False) for n in value)


def rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2`: a read-only strided view of a 1-D storage (copied later).

    `size` and `stride` are sequences of non-negative ints of one length (at most `MAX_DIMS`), `offset` a
    non-negative int, and the view lies inside the storage: offset + Σ (size_i − 1)·stride_i < numel. Zero or
    overlapping strides are allowed (torch.save keeps those of an expanded tensor, e.g. (0, 1) for
    `arange(n).expand(1, n)`), but the view holds at most `MAX_EXPANSION` times the storage's elements, so its copy
    is bounded by the storage's bytes. WeightsError otherwise, before anything is allocated.
    """
    if not (isinstance(storage, np.ndarray) and storage.ndim == 1):
        raise WeightsError(f"a tensor is built on a {type(storage).__name__}, not a storage")
    if not (is_int(offset, numpy=False) and _int_sequence(size) and _int_sequence(stride)
            and len(size) == len(stride) and min((offset, *size, *stride)) >= 0):  # fmt: skip
        layout = ", ".join(f"{key} {reprlib.repr(value)}" for key, value in dict(size=size, stride=stride,
                                                                                   offset=offset).items())
        raise WeightsError(f"invalid tensor layout ({layout}): non-negative ints expected, at most {MAX_DIMS} dims")
    size, stride = tuple(size), tuple(stride)
    elements = math.prod(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if elements else offset - 1
    if last >= storage.size:
        raise WeightsError(
            f"tensor (size {size}, stride {stride}, offset {offset}) exceeds its storage of {storage.size} elements"
        )
    if elements > MAX_EXPANSION * storage.size:
        raise WeightsError(
            f"tensor (size {size}, stride {stride}) repeats its storage of {storage.size} elements into {elements}, "
            f"more than {MAX_EXPANSION} times"
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
    """Admits OrderedDict, tensor rebuilding, storage types and (if `script_objects`) inert TorchScript classes.

    `load_storage(key, dtype, numel)` is called with a string key and a non-negative int `numel`."""

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
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and isinstance(pid[0], str) and pid[0] == "storage"
                and isinstance(pid[1], StorageType) and isinstance(pid[2], str)
                and is_int(pid[4], numpy=False) and pid[4] >= 0):  # fmt: skip
            raise UnsafePickleError(f"unexpected persistent id {reprlib.repr(pid)}")
        if len(pid) == 6 and pid[5] is not None:
            raise WeightsError(f"storage views (legacy format before PyTorch 0.4) are not supported: "
                               f"{reprlib.repr(pid)}")  # fmt: skip
        return self._load_storage(pid[2], pid[1].dtype, pid[4])


def _same_storage(storage: np.ndarray, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    """The storage already read for `key`, if the new reference declares it alike."""
    if storage.dtype != dtype or storage.size != numel:
        raise WeightsError(f"storage {reprlib.repr(key)} is declared as {storage.size} × {storage.dtype} and as "
                           f"{numel} × {dtype}")  # fmt: skip
    return storage


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A zip member's bytes, unless it would inflate to more than `MAX_EXPANSION` times its stored bytes."""
    if info.file_size > MAX_EXPANSION * info.compress_size:
        raise WeightsError(f"{info.filename} inflates {info.compress_size} bytes to {info.file_size}, more than "
                           f"{MAX_EXPANSION} times (torch stores its members uncompressed)")  # fmt: skip
    return archive.read(info)


def read_zip_archive(path: Path, unpickler: type[RestrictedUnpickler] = RestrictedUnpickler) -> Any:
    """The object in a torch.save zip archive or TorchScript archive (`<dir>/data.pkl` + `<dir>/data/<key>`
    storages), unpickled by `unpickler` (a RestrictedUnpickler that may admit a few more globals); tensors are
    read-only views of their storages, each storage read once after its declared size is checked."""
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsError(f"not a PyTorch archive (expected one <dir>/data.pkl, found {reprlib.repr(pickles)})")
        root = pickles[0][: -len("data.pkl")]
        order = _read_member(archive, archive.getinfo(root + "byteorder")) if root + "byteorder" in names else b"little"
        if order not in (b"little", b"big"):
            raise WeightsError(f"byteorder {reprlib.repr(order)} is neither 'little' nor 'big'")
        endian = "<" if order == b"little" else ">"
        storages: dict[str, np.ndarray] = {}

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            if key not in storages:
                info = archive.getinfo(f"{root}data/{key}")
                if info.file_size != numel * dtype.itemsize:
                    raise WeightsError(f"storage {reprlib.repr(key)} holds {info.file_size} bytes, but its tensors "
                                       f"declare {numel} elements of {dtype.itemsize} bytes")  # fmt: skip
                storages[key] = np.frombuffer(_read_member(archive, info), dtype.newbyteorder(endian)).astype(dtype)
            return _same_storage(storages[key], key, dtype, numel)

        data = _read_member(archive, archive.getinfo(pickles[0]))
        return unpickler(io.BytesIO(data), load_storage, script_objects=root + "constants.pkl" in names).load()


def read_legacy(stream: BinaryIO, size: int) -> Any:
    """The object saved in a legacy-format torch.save stream of `size` bytes: pickles of the magic number, the
    protocol, sys_info, the object and its storage keys, then each storage's element count and raw bytes.

    A storage is allocated only while the storages declared so far fit in `size` bytes; WeightsError otherwise, and
    for a stream in another format, a storage count that differs from its declaration, or a stream that ends early.
    """
    storages: dict[str, np.ndarray] = {}
    declared = 0

    def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        nonlocal declared
        if key not in storages:
            declared += numel * dtype.itemsize
            if declared > size:
                raise WeightsError(f"its storages declare {declared} bytes, more than its {size}")
            storages[key] = np.empty(numel, dtype)
        return _same_storage(storages[key], key, dtype, numel)

    def next_pickle() -> Any:
        return RestrictedUnpickler(stream, load_storage).load()

    try:
        magic = next_pickle()
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the first pickle is, it is not the magic number
        raise WeightsError("not in a PyTorch format (neither a zip archive nor the legacy format)") from err
    if magic != LEGACY_MAGIC or next_pickle() != LEGACY_PROTOCOL:
        raise WeightsError("not in a PyTorch format (neither a zip archive nor the legacy format)")
    sys_info = next_pickle()
    endian = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"
    result = next_pickle()
    keys = next_pickle()
    if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)) or set(keys) != storages.keys():
        raise WeightsError(f"its storage keys {reprlib.repr(keys)} are not those of its tensors "
                           f"{reprlib.repr(sorted(storages))}")  # fmt: skip
    for key in keys:
        storage = storages[key]
        count = stream.read(8)
        if len(count) != 8 or int(np.frombuffer(count, endian + "i8")[0]) != storage.size:
            raise WeightsError(f"storage {reprlib.repr(key)} does not hold the {storage.size} elements declared")
        raw = stream.read(storage.nbytes)
        if len(raw) != storage.nbytes:
            raise WeightsError(f"it ends inside storage {reprlib.repr(key)}")
        storage[...] = np.frombuffer(raw, storage.dtype.newbyteorder(endian))
    return result


def _read_legacy(path: Path) -> Any:
    with open(path, "rb") as f:
        return read_legacy(f, os.fstat(f.fileno()).st_size)


def _key_name(key: Any, source: str) -> str:
    if isinstance(key, str):
        return key
    if is_int(key, numpy=False) and key.bit_length() <= 64:
        return str(key)
    raise WeightsError(f"{source}: a tensor or container is stored under a key of type {type(key).__name__}")


def collect_tensors(
    root: Any, entries: Callable[[Any], Iterable[tuple[Any, Any]]], source: str, size: int
) -> dict[str, np.ndarray]:
    """Dotted name -> copy of every array under `root`, depth first in the containers' order.

    `entries(container)` gives a container's (key, child) pairs, each child an array or a container; keys are
    strings or ints. Whatever the pickle holds (it can nest containers deeply and reference one container or view
    many times), the walk uses no recursion, refuses containers nested deeper than `MAX_NESTING`, and refuses,
    before copying, once the copies, the names and the containers visited (one byte each) would exceed
    `MAX_EXPANSION` times `size` (the file's bytes). WeightsError naming `source` in either case.
    """
    budget = MAX_EXPANSION * size
    tensors: dict[str, np.ndarray] = {}
    stack: list[tuple[str, Any, int]] = [("", root, 0)]

    def spend(nbytes: int) -> None:
        nonlocal budget
        budget -= nbytes
        if budget < 0:
            raise WeightsError(f"{source}: reading it would build more than {MAX_EXPANSION} times its {size} bytes "
                               "(tensors or containers referenced many times)")  # fmt: skip

    while stack:
        name, obj, depth = stack.pop()
        if isinstance(obj, np.ndarray):
            spend(obj.nbytes)
            tensors[name] = np.array(obj)
            continue
        spend(1)
        if depth == MAX_NESTING:
            raise WeightsError(f"{source}: containers are nested more than {MAX_NESTING} deep")
        children = []
        for key, child in entries(obj):
            key = _key_name(key, source)
            spend(len(name) + 1 + len(key))
            children.append((f"{name}.{key}" if name else key, child, depth + 1))
        stack.extend(reversed(children))
    return tensors


def _tensor_entries(obj: Any) -> list[tuple[Any, Any]]:
    """The tensors and containers in a dict or a TorchScript object's attributes."""
    fields = getattr(obj, "fields", None) if isinstance(obj, ScriptObject) else obj
    if not isinstance(fields, dict):
        return []
    return [(key, value) for key, value in fields.items() if isinstance(value, (np.ndarray, dict, ScriptObject))]


def read_torch_file(path: os.PathLike | str) -> dict[str, np.ndarray]:
    """Every tensor in a torch.save file (zip or legacy) or TorchScript archive, as dotted name -> array.

    Pickle code is not executed: globals other than those a tensor file needs
    raise UnsafePickleError. TorchScript modules contribute their attribute
    paths (`net.layers.conv.weight`). Memory is bounded as the module docstring
    says; every fault of the file is a WeightsError naming it.
    """
    path = Path(path)
    try:
        obj = read_zip_archive(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    except WeightsError as err:
        raise type(err)(f"{path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - whatever a damaged file makes the reader raise is the file's fault
        raise WeightsError(f"{path}: not a readable PyTorch file ({error_summary(err)})") from err
    return collect_tensors(obj, _tensor_entries, str(path), path.stat().st_size)
