"""`weights.safetensors_reader`: `read_tensor` reads every stored dtype as float32 with file reads (equal to
safetensors' own reader; bfloat16 to ml_dtypes' rounding) into a fresh aligned array; `read_param` reads in blocks of
rows straight into our layout, equal to `param_from_torch` of `read_tensor`; a damaged tensor or an unreadable
dtype is a `WeightsError` naming the file and the tensor."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from jaxdiff.errors import WeightsError
from jaxdiff.weights.safetensors_reader import open_safetensors, read_param, read_tensor
from jaxdiff.weights.torch_layout import ALIGNMENT, from_torch, param_from_torch

SHAPE = (3, 5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64, np.int8, np.uint8, np.bool_])
def test_values_equal_safetensors_reader(tmp_path, dtype):
    values = np.random.default_rng(0).normal(scale=50, size=SHAPE).astype(dtype)
    file = tmp_path / "w.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(7, np.float32), "b": values}, file)
    with open_safetensors(file) as handle:
        expected = handle.get_tensor("b")
        out = read_tensor(file, "b")
    np.testing.assert_array_equal(out, expected.astype(np.float32))
    assert out.dtype == np.float32 and out.shape == SHAPE and out.ctypes.data % ALIGNMENT == 0


def _write_raw(file, dtype_name: str, shape, data: bytes) -> None:
    """A safetensors file written byte by byte: header length, JSON header, data."""
    header = json.dumps({"t": {"dtype": dtype_name, "shape": list(shape), "data_offsets": [0, len(data)]}}).encode()
    file.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_bfloat16_is_read_as_its_float32_values(tmp_path):
    values = np.array([[1.0, -2.5, 3.140625], [1e-3, 65504.0, -0.0078125]], np.float32)
    file = tmp_path / "bf16.safetensors"
    _write_raw(file, "BF16", values.shape, values.astype(ml_dtypes.bfloat16).tobytes())
    np.testing.assert_array_equal(read_tensor(file, "t"), values.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_a_tensor_cut_short_is_a_weights_error_naming_it(tmp_path):
    file = tmp_path / "w.safetensors"
    safetensors.numpy.save_file({"weight": np.ones((64, 64), np.float32)}, file)
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=r"w\.safetensors: tensor weight is cut short: 16284 of 16384 bytes read"):
        read_tensor(file, "weight")


def test_an_unreadable_dtype_is_named(tmp_path):
    file = tmp_path / "f8.safetensors"
    _write_raw(file, "F8_E4M3", (4,), bytes(4))
    with pytest.raises(WeightsError, match=r"tensor t is stored as F8_E4M3; readable: F64, F32, F16, BF16"):
        read_tensor(file, "t")


@pytest.mark.parametrize("path, torch_shape, shape", [
    (("conv", "kernel"), (300, 3, 3, 2), (3, 2, 3, 300)),  # OIHW -> HWIO, three blocks of rows, the last partial
    (("dense", "kernel"), (300, 4), (4, 300)),
    (("nin_shortcut", "kernel"), (130, 4, 1, 1), (4, 130)),
    (("token", "embedding"), (260, 3), (260, 3)),  # kept as it is, in blocks
    (("norm", "bias"), (129,), (129,)),
    (("scalar", "value"), (), ()),
])  # fmt: skip
@pytest.mark.parametrize("stored", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_read_param_is_param_from_torch_of_read_tensor(tmp_path, path, torch_shape, shape, stored):
    values = np.random.default_rng(1).normal(size=torch_shape).astype(stored)
    file = tmp_path / "w.safetensors"
    _write_raw(file, {np.float32: "F32", np.float16: "F16", ml_dtypes.bfloat16: "BF16"}[stored], torch_shape,
               values.tobytes())
    out = read_param(file, "t", path, shape)
    np.testing.assert_array_equal(out, param_from_torch(path, read_tensor(file, "t"), shape))
    expected = values.astype(np.float32)
    np.testing.assert_array_equal(out, expected if len(shape) not in (2, 4) or path[-1] == "embedding"
                                  else from_torch(expected, shape))  # fmt: skip
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.ctypes.data % ALIGNMENT == 0
    for dtype in (ml_dtypes.bfloat16, np.float16):  # inference: each value rounded to nearest, as torch's .to(dtype)
        rounded = read_param(file, "t", path, shape, dtype)
        assert rounded.dtype == dtype and rounded.flags.c_contiguous and rounded.ctypes.data % ALIGNMENT == 0
        np.testing.assert_array_equal(rounded.view(np.uint16), out.astype(dtype).view(np.uint16))
        direct = param_from_torch(path, values, shape, dtype)
        np.testing.assert_array_equal(rounded.view(np.uint16), direct.view(np.uint16))


def test_read_param_of_a_tensor_cut_short_names_it(tmp_path):
    file = tmp_path / "w.safetensors"
    safetensors.numpy.save_file({"weight": np.ones((300, 8), np.float32)}, file)
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=r"w\.safetensors: tensor weight is cut short"):
        read_param(file, "weight", ("dense", "kernel"), (8, 300))
