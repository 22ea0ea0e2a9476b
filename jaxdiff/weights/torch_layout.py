"""PyTorch parameter layouts <-> ours: convolution kernels OIHW <-> HWIO, Linear weights [out, in] <-> dense
kernels [in, out] (a 1×1 `conv_shortcut` [out, in, 1, 1] for our `nin_shortcut`); every converter of PyTorch
weights (diffusers, EDM, Stable Diffusion) goes through these."""

from __future__ import annotations

import numpy as np

from jaxdiff.weights.matching import ParamPath

# PyTorch's name for the leaf of each of our parameters (a module's weight or bias).
TORCH_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_shape(path: ParamPath, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of our parameter: HWIO -> OIHW, dense [in, out] -> Linear [out, in],
    `nin_shortcut` -> the 1×1 Conv2d `conv_shortcut` [out, in, 1, 1]; embeddings keep [rows, dim]."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2 and path[-1] != "embedding":
        return (shape[1], shape[0], 1, 1) if path[-2] == "nin_shortcut" else (shape[1], shape[0])
    return shape


def to_torch(path: ParamPath, array: np.ndarray) -> np.ndarray:
    """Our parameter at `path` in PyTorch layout (shape `torch_shape(path, array.shape)`)."""
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if array.ndim == 2 and path[-1] != "embedding":
        return array.T.reshape(torch_shape(path, array.shape))
    return array


def from_torch(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A PyTorch tensor as our parameter of shape `shape`: OIHW -> HWIO, [out, in] or [out, in, 1, 1] -> [in, out].
    (Embedding tables need no conversion: do not pass them here.)"""
    if len(shape) == 4:
        return array.transpose(2, 3, 1, 0)
    if len(shape) == 2:
        return array.reshape(shape[::-1]).T
    return array


ALIGNMENT = 64  # bytes: XLA:CPU takes a host array this aligned as it is (`jax.device_put` makes no copy)
TRANSPOSE_ROWS = 128  # PyTorch rows (output channels) moved per block of a layout change


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts at a multiple of ALIGNMENT bytes."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    return raw[offset : offset + size].view(dtype).reshape(shape)


def param_from_torch(path: ParamPath, array: np.ndarray, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A PyTorch tensor as our parameter at `path` of shape `shape` (`from_torch`; embedding tables as they are),
    written in `dtype` (float32, or bfloat16 / float16 for inference) into a new `aligned_empty` array, so that a
    CPU device takes it without a second copy; each block is rounded to `dtype` as it is written."""
    out = aligned_empty(shape, dtype)
    if array.ndim == 0:
        np.copyto(out, array)
        return out
    for start in range(0, len(array), TRANSPOSE_ROWS):
        write_rows(path, out, start, array[start : start + TRANSPOSE_ROWS])
    return out


def write_rows(path: ParamPath, out: np.ndarray, start: int, rows: np.ndarray) -> None:
    """Write PyTorch rows start, start + 1, ... (`rows`, along the tensor's first axis: output channels, or the
    entries of a vector) of our parameter at `path` into `out`, cast to its dtype. Layout changes go block by block:
    one whole-array transposed copy strides through memory and ran at a third to a half of the blocked speed."""
    if path[-1] == "embedding" or out.ndim not in (2, 4):
        np.copyto(out[start : start + len(rows)], rows, casting="unsafe")
        return
    np.copyto(out[..., start : start + len(rows)], from_torch(rows, out.shape[:-1] + (len(rows),)), casting="unsafe")
