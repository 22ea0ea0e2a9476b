"""PyTorch layouts -> ours: `param_from_torch` writes `from_torch`'s values into a new 64-byte-aligned C-contiguous
array (embedding tables untouched; layout changes in blocks of rows, checked across block edges), which the CPU
device then holds without a copy."""

import jax
import numpy as np
import pytest

from jaxdiff.weights.torch_layout import ALIGNMENT, from_torch, param_from_torch


@pytest.mark.parametrize("path, torch_shape, shape", [
    (("conv", "kernel"), (5, 3, 3, 2), (3, 2, 3, 5)),  # OIHW -> HWIO
    (("dense", "kernel"), (7, 4), (4, 7)),  # [out, in] -> [in, out]
    (("nin_shortcut", "kernel"), (6, 4, 1, 1), (4, 6)),  # a 1×1 Conv2d as a dense kernel
    (("label", "embedding"), (9, 3), (9, 3)),  # embedding tables keep [rows, dim]
    (("norm", "scale"), (5,), (5,)),
    # more rows than one TRANSPOSE_ROWS block, the last block partial
    (("conv", "kernel"), (300, 3, 3, 2), (3, 2, 3, 300)),
    (("dense", "kernel"), (300, 4), (4, 300)),
    (("nin_shortcut", "kernel"), (300, 4, 1, 1), (4, 300)),
])  # fmt: skip
def test_param_from_torch_is_from_torch_aligned_and_contiguous(path, torch_shape, shape):
    array = np.random.default_rng(0).normal(size=torch_shape).astype(np.float32)
    expected = array if path[-1] == "embedding" else from_torch(array, shape)
    out = param_from_torch(path, array, shape)
    np.testing.assert_array_equal(out, expected)
    assert out.shape == shape and out.dtype == np.float32 and out.flags.c_contiguous
    assert out.ctypes.data % ALIGNMENT == 0 and not np.shares_memory(out, array)


def test_the_cpu_device_holds_a_converted_parameter_without_copying_it():
    out = param_from_torch(("dense", "kernel"), np.ones((256, 128), np.float32), (128, 256))
    on_device = jax.device_put(out, jax.devices("cpu")[0])
    assert on_device.unsafe_buffer_pointer() == out.ctypes.data
