"""Opening safetensors files with their damage answered as a `WeightsError` naming the file (`open_safetensors`,
`load_safetensors`), and one tensor as float32 NumPy (`read_tensor`; `read_param` in our parameter layout and a
chosen dtype), bfloat16 included (which safetensors' NumPy reader lacks).

The format: an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and byte
range (`data_offsets`, relative to the end of the header), then the raw little-endian bytes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pathlib
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from jaxdiff.errors import WeightsError
from jaxdiff.weights.matching import ParamPath
from jaxdiff.weights.torch_layout import TRANSPOSE_ROWS, aligned_empty, param_from_torch, write_rows

HEADER_LENGTH_BYTES = 8


@contextlib.contextmanager
def open_safetensors(file: str | os.PathLike) -> Iterator:
    """`safetensors.safe_open(file, framework="np")`; safetensors' error for a damaged file or tensor, raised while
    opening or reading, becomes a `WeightsError` naming the file."""
    try:
        with safetensors.safe_open(file, framework="np") as handle:
            yield handle
    except safetensors.SafetensorError as err:
        raise WeightsError(f"{file}: damaged or not a safetensors file ({err})") from err


def load_safetensors(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of `file` by name, in its stored dtype (bfloat16 not supported: use `read_tensor`)."""
    try:
        return safetensors.numpy.load_file(file)
    except safetensors.SafetensorError as err:
        raise WeightsError(f"{file}: damaged or not a safetensors file ({err})") from err


# The stored dtypes `read_tensor` reads (safetensors' names).
STORED_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


@functools.lru_cache(maxsize=4)
def _header(file: str, modified_ns: int) -> tuple[int, dict]:
    """(header length, header) of a file, cached per file version."""
    with open(file, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(HEADER_LENGTH_BYTES))
        return header_length, json.loads(f.read(header_length))


def _stored(file: pathlib.Path, name: str) -> tuple[int, tuple[int, ...], np.dtype]:
    """(byte offset in the file, PyTorch shape, stored dtype) of tensor `name`."""
    header_length, header = _header(str(file), file.stat().st_mtime_ns)
    entry = header[name]
    if entry["dtype"] not in STORED_DTYPES:
        raise WeightsError(f"{file}: tensor {name} is stored as {entry['dtype']}; readable: {', '.join(STORED_DTYPES)}")
    shape, dtype = tuple(entry["shape"]), np.dtype(STORED_DTYPES[entry["dtype"]])
    start, end = entry["data_offsets"]
    if end - start != math.prod(shape) * dtype.itemsize:
        raise WeightsError(f"{file}: tensor {name} spans {end - start} bytes, not the {math.prod(shape)} × "
                           f"{dtype.itemsize} of its shape {list(shape)} (damaged file)")  # fmt: skip
    return HEADER_LENGTH_BYTES + header_length + start, shape, dtype


def _read_into(f, file: pathlib.Path, name: str, buffer: np.ndarray) -> None:
    read = f.readinto(buffer.reshape(-1).view(np.uint8))
    if read != buffer.nbytes:
        raise WeightsError(f"{file}: tensor {name} is cut short: {read} of {buffer.nbytes} bytes read (damaged file)")


def read_tensor(file: str | os.PathLike, name: str) -> np.ndarray:
    """Tensor `name` of the safetensors `file` (opened once with `open_safetensors`, which checks its header) as
    float32, in a fresh `aligned_empty` array.

    The bytes are read with file reads, not through safetensors' memory map: the pages of a map count in the
    process's resident memory for as long as the file is open, which doubled a loading reader's peak."""
    file = pathlib.Path(file)
    offset, shape, dtype = _stored(file, name)
    stored = aligned_empty(shape, dtype)
    with open(file, "rb") as f:
        f.seek(offset)
        _read_into(f, file, name, stored)
    if stored.dtype == np.float32:
        return stored
    out = aligned_empty(shape, np.float32)
    np.copyto(out, stored, casting="unsafe")
    return out


def read_param(
    file: str | os.PathLike, name: str, path: ParamPath, shape: tuple[int, ...], dtype=np.float32
) -> np.ndarray:
    """`param_from_torch(path, read_tensor(file, name), shape, dtype)` without a whole-tensor buffer: the stored
    rows are read TRANSPOSE_ROWS at a time into one small buffer and written into the parameter's layout in `dtype`,
    so the only fresh memory is the parameter itself (first writes to fresh memory were most of a load's time on a
    virtual machine) and a bfloat16 parameter never has a float32 copy."""
    file = pathlib.Path(file)
    offset, stored_shape, stored_dtype = _stored(file, name)
    if not stored_shape:
        return param_from_torch(path, read_tensor(file, name), shape, dtype)
    out = aligned_empty(shape, dtype)
    buffer = np.empty((min(TRANSPOSE_ROWS, stored_shape[0]), *stored_shape[1:]), stored_dtype)
    with open(file, "rb") as f:
        f.seek(offset)
        for start in range(0, stored_shape[0], TRANSPOSE_ROWS):
            rows = buffer[: min(TRANSPOSE_ROWS, stored_shape[0] - start)]
            _read_into(f, file, name, rows)
            write_rows(path, out, start, rows)
    return out
