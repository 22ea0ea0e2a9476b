"""Opening safetensors files with their damage answered as a `WeightsError` naming the file (`open_safetensors`,
`load_safetensors`), and one tensor as float32 NumPy, bfloat16 included (which safetensors' NumPy reader lacks).

The format: an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and byte
range (`data_offsets`, relative to the end of the header), then the raw little-endian bytes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from jaxdiff.errors import WeightsError

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


@functools.lru_cache(maxsize=4)
def _header(file: str, modified_ns: int) -> tuple[int, dict]:
    """(header length, header) of a file, cached per file version."""
    with open(file, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(HEADER_LENGTH_BYTES))
        return header_length, json.loads(f.read(header_length))


def _bfloat16_tensor(file: pathlib.Path, name: str) -> np.ndarray:
    header_length, header = _header(str(file), file.stat().st_mtime_ns)
    entry = header[name]
    start, end = entry["data_offsets"]
    with open(file, "rb") as f:
        f.seek(HEADER_LENGTH_BYTES + header_length + start)
        data = f.read(end - start)
    return np.frombuffer(data, dtype=ml_dtypes.bfloat16).reshape(entry["shape"])


def read_tensor(handle, file: pathlib.Path, name: str) -> np.ndarray:
    """Tensor `name` of the open `safetensors.safe_open(file, framework="np")` handle, as float32."""
    if handle.get_slice(name).get_dtype() == "BF16":
        return _bfloat16_tensor(file, name).astype(np.float32)
    return np.asarray(handle.get_tensor(name), np.float32)
