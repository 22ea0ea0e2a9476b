"""Reading TF V2 checkpoints without TensorFlow, checked on files real TensorFlow wrote (tests/data/tf_checkpoint,
made by tests/data/make_tf_fixtures.py), and CRC-32C against a bit-by-bit reference."""

import shutil

import numpy as np
import pytest

from jaxdiff.readers import tf_checkpoint
from jaxdiff.readers.crc32c import crc32c
from jaxdiff.readers.tf_bundle import FOOTER_SIZE, CheckpointFormatError, TFCheckpoint, _block_entries, _varint
from tests.helpers import ROOT

FIXTURES = ROOT / "tests" / "data" / "tf_checkpoint"
SINGLE = FIXTURES / "single" / "model.ckpt-5"
SHARDED = FIXTURES / "sharded" / "ckpt-1"


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C one bit at a time (reflected polynomial 0x82F63B78, initial and final inversion)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_matches_the_bitwise_definition():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    rng = np.random.default_rng(0)
    for size in (0, 1, 63, 64, 65, 4095, 4097, 20_011):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert crc32c(data) == crc32c_bitwise(data), size
    floats = rng.normal(size=(7, 301)).astype(np.float32)
    assert crc32c(floats) == crc32c_bitwise(floats.tobytes())


def test_every_tensor_of_a_tf_written_checkpoint_reads_back_exactly():
    checkpoint = TFCheckpoint(SINGLE)
    with np.load(FIXTURES / "single.npz") as expected:
        assert sorted(checkpoint.shapes()) == sorted(expected.files)  # 151 keys: several index blocks
        for name in expected.files:
            got = checkpoint.tensor(name)
            assert got.dtype == expected[name].dtype and got.shape == expected[name].shape, name
            np.testing.assert_array_equal(got, expected[name], err_msg=name)
            assert checkpoint.shapes()[name] == expected[name].shape
    assert checkpoint.num_shards == 1


def test_two_shard_checkpoint_and_unsupported_tensors_are_named():
    checkpoint = TFCheckpoint(SHARDED)
    assert checkpoint.num_shards == 2
    with np.load(FIXTURES / "sharded.npz") as expected:
        for name in ("module/w/.ATTRIBUTES/VARIABLE_VALUE", "module/step/.ATTRIBUTES/VARIABLE_VALUE"):
            np.testing.assert_array_equal(checkpoint.tensor(name), expected[name])
    assert checkpoint.entries["module/step/.ATTRIBUTES/VARIABLE_VALUE"].shard_id == 1
    assert checkpoint.shapes()["module/v/.ATTRIBUTES/VARIABLE_VALUE"] == (10, 10)
    with pytest.raises(CheckpointFormatError, match="module/v/.ATTRIBUTES/VARIABLE_VALUE is a partitioned variable"):
        checkpoint.tensor("module/v/.ATTRIBUTES/VARIABLE_VALUE")
    with pytest.raises(CheckpointFormatError, match="_CHECKPOINTABLE_OBJECT_GRAPH is a string tensor"):
        checkpoint.tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
    with pytest.raises(KeyError, match="no tensor 'model/nothing'"):
        checkpoint.tensor("model/nothing")


@pytest.fixture
def copied(tmp_path):
    for path in SINGLE.parent.iterdir():
        shutil.copy(path, tmp_path / path.name)
    return tmp_path / SINGLE.name


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_files_are_refused(copied):
    index = copied.with_name(copied.name + ".index")
    shard = copied.with_name(copied.name + ".data-00000-of-00001")
    entry = TFCheckpoint(copied).entries["model/conv_in/W"]
    flip_byte(shard, entry.offset + 5)
    with pytest.raises(CheckpointFormatError, match="model/conv_in/W fails its CRC-32C check"):
        TFCheckpoint(copied).tensor("model/conv_in/W")
    shard.write_bytes(shard.read_bytes()[: entry.offset + 3])
    with pytest.raises(CheckpointFormatError, match="is truncated: model/conv_in/W"):
        TFCheckpoint(copied).tensor("model/conv_in/W")
    flip_byte(index, 40)
    with pytest.raises(CheckpointFormatError, match="fails its CRC-32C check"):
        TFCheckpoint(copied)
    index.write_bytes(b"not a table" * 10)
    with pytest.raises(CheckpointFormatError, match="not a TF checkpoint index"):
        TFCheckpoint(copied)


def test_compressed_blocks_are_refused(copied):
    index = copied.with_name(copied.name + ".index")
    table = bytearray(index.read_bytes())
    footer = bytes(table[-FOOTER_SIZE:])
    _, pos = _varint(footer, _varint(footer, 0)[1])
    index_offset, p = _varint(footer, pos)
    index_size, _ = _varint(footer, p)
    first_handle = next(_block_entries(bytes(table[index_offset : index_offset + index_size]), "x"))[1]
    offset, p = _varint(first_handle, 0)
    size, _ = _varint(first_handle, p)
    table[offset + size] = 1  # the compression byte after the first data block: snappy
    index.write_bytes(bytes(table))
    with pytest.raises(CheckpointFormatError, match="snappy-compressed block; only uncompressed"):
        TFCheckpoint(copied)


def test_checkpoint_folder_resolves_through_its_checkpoint_file(tmp_path):
    for name in ("model.ckpt-5", "model.ckpt-9"):
        for suffix in (".index", ".data-00000-of-00001"):
            shutil.copy(SINGLE.with_name(SINGLE.name + suffix), tmp_path / (name + suffix))
    with pytest.raises(ValueError, match="holds several checkpoints"):
        tf_checkpoint.checkpoint_prefix(tmp_path)
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "model.ckpt-5"\nall_model_checkpoint_paths: "model.ckpt-9"\n'
    )
    assert tf_checkpoint.checkpoint_prefix(tmp_path) == str(tmp_path / "model.ckpt-5")
    assert tf_checkpoint.checkpoint_prefix(tmp_path / "model.ckpt-9") == str(tmp_path / "model.ckpt-9")
