"""Reading TensorFlow V2 checkpoints ("tensor bundles") without TensorFlow.

A checkpoint `prefix` is `prefix.index` plus `prefix.data-0000k-of-0000N`. The index is a LevelDB
table: data blocks of sorted (key, value) entries whose keys share prefixes with the entry before
(each restart point starts a full key), a block index mapping to them, and a 48-byte footer. Every
block ends in a compression byte and the masked CRC-32C of the block and that byte. Under the key ""
sits a BundleHeaderProto (num_shards, endianness); under each tensor name a BundleEntryProto (dtype,
shape, shard_id, offset, size, masked crc32c) locating the tensor's raw bytes in data shard `shard_id`.
Partitioned tensors (whose entries list slices stored under separate keys) are not supported.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Iterator

import numpy as np

from jaxdiff.readers.crc32c import crc32c, unmask
from jaxdiff.errors import WeightsError

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c
NO_COMPRESSION = 0
COMPRESSION_NAMES = {1: "snappy", 2: "zlib"}
DTYPES = {  # TF DataType enum -> NumPy dtype (little-endian)
    1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 10: "?",
    17: "<u2", 19: "<f2", 22: "<u4", 23: "<u8",
}  # fmt: skip
DTYPE_NAMES = {7: "string", 8: "complex64", 14: "bfloat16", 18: "complex128", 20: "resource", 21: "variant"}
BIG_ENDIAN = 1
SLICE_KEY_START = b"\x00"  # keys of the pieces of partitioned tensors (OrderedCode-encoded name + extents)


class CheckpointFormatError(WeightsError):
    """The files are not a TF V2 checkpoint this reader understands, or are damaged."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the base-128 varint at buf[pos]."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise CheckpointFormatError("truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of a serialised protobuf message: ints or bytes."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, pos = int.from_bytes(buf[pos : pos + size], "little"), pos + size
        elif wire_type == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise CheckpointFormatError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(buf):
            raise CheckpointFormatError("truncated protobuf message")
        yield number, value


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where a tensor lives: `size` bytes at `offset` of data shard `shard_id`; `crc32c` unmasked."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int
    sliced: bool


def _shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for number, value in _fields(buf):
        if number == 2:
            dims.append(_int64(dict(_fields(value)).get(1, 0)))
        elif number == 3 and value:
            raise CheckpointFormatError("a tensor of unknown rank")
    return tuple(dims)


def _entry(buf: bytes) -> TensorEntry:
    fields = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "crc32c": 0, "sliced": False}
    for number, value in _fields(buf):
        if number == 2:
            fields["shape"] = _shape(value)
        elif number == 7:
            fields["sliced"] = True
        elif 1 <= number <= 6:
            fields[("dtype", "shape", "shard_id", "offset", "size", "crc32c")[number - 1]] = value
    fields["crc32c"] = unmask(fields["crc32c"])
    return TensorEntry(**fields)


def _block(table: bytes, handle: bytes, source: str) -> bytes:
    """Contents of the block a BlockHandle (varint offset, varint size) points at, its CRC checked."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(table):
        raise CheckpointFormatError(f"{source}: a block at bytes {offset}..{end} lies past the end of the file")
    compression = table[end]
    if compression != NO_COMPRESSION:
        name = COMPRESSION_NAMES.get(compression, f"type {compression}")
        raise CheckpointFormatError(f"{source}: a {name}-compressed block; only uncompressed tables are supported")
    (stored,) = struct.unpack_from("<I", table, end + 1)
    if crc32c(table[offset : end + 1]) != unmask(stored):
        raise CheckpointFormatError(f"{source}: block at byte {offset} fails its CRC-32C check (damaged file)")
    return table[offset:end]


def _block_entries(block: bytes, source: str) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of each entry of a table block, keys rebuilt from their shared prefixes."""
    if len(block) < 4:
        raise CheckpointFormatError(f"{source}: a block too short to hold its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * num_restarts
    if end < 0:
        raise CheckpointFormatError(f"{source}: a block claims {num_restarts} restart points, more than fit")
    restarts = set(struct.unpack_from(f"<{num_restarts}I", block, end))
    key, pos = b"", 0
    while pos < end:
        start = pos
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_size, pos = _varint(block, pos)
        if shared > len(key) or (start in restarts and shared):
            raise CheckpointFormatError(f"{source}: bad key prefix at byte {start} of a block")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_size]
        pos += value_size


def read_index(prefix: str | os.PathLike) -> tuple[dict[str, TensorEntry], int, bool]:
    """(entries by tensor name, number of data shards, big-endian?) from `prefix.index`."""
    source = f"{os.fspath(prefix)}.index"
    with open(source, "rb") as f:
        table = f.read()
    if len(table) < FOOTER_SIZE or int.from_bytes(table[-8:], "little") != TABLE_MAGIC:
        raise CheckpointFormatError(f"{source} is not a TF checkpoint index (no LevelDB table magic number)")
    footer = table[-FOOTER_SIZE:]
    _, pos = _varint(footer, _varint(footer, 0)[1])  # skip the metaindex handle
    index_handle = footer[pos:]
    entries, num_shards, big_endian = {}, None, False
    for _, data_handle in _block_entries(_block(table, index_handle, source), source):
        for key, value in _block_entries(_block(table, data_handle, source), source):
            if key == b"":
                header = dict(_fields(value))
                num_shards, big_endian = header.get(1, 0), header.get(2, 0) == BIG_ENDIAN
            elif not key.startswith(SLICE_KEY_START):
                entries[key.decode("utf-8")] = _entry(value)
    if num_shards is None:
        raise CheckpointFormatError(f"{source} has no bundle header: not a TF V2 checkpoint")
    return entries, num_shards, big_endian


class TFCheckpoint:
    """The tensors of TF V2 checkpoint `prefix` (e.g. ".../model.ckpt-790000"), read on demand."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        self.entries, self.num_shards, self._big_endian = read_index(self.prefix)
        shards = {e.shard_id for e in self.entries.values()}
        if shards and max(shards) >= self.num_shards:
            raise CheckpointFormatError(f"{self.prefix}.index names shard {max(shards)} of {self.num_shards}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, for every tensor in the checkpoint."""
        return {name: entry.shape for name, entry in self.entries.items()}

    def shard_path(self, shard_id: int) -> str:
        return f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}"

    def tensor(self, name: str) -> np.ndarray:
        """Tensor `name` as a NumPy array in its stored dtype, its CRC-32C checked."""
        if name not in self.entries:
            raise KeyError(f"{self.prefix} has no tensor {name!r}")
        entry = self.entries[name]
        if entry.sliced:
            raise CheckpointFormatError(f"{self.prefix}: {name} is a partitioned variable, which is not supported")
        if entry.dtype not in DTYPES:
            kind = DTYPE_NAMES.get(entry.dtype, f"DataType {entry.dtype}")
            raise CheckpointFormatError(f"{self.prefix}: {name} is a {kind} tensor; only numeric tensors are read")
        dtype = np.dtype(DTYPES[entry.dtype])
        expected = int(np.prod(entry.shape, dtype=np.int64)) * dtype.itemsize
        if entry.size != expected:
            raise CheckpointFormatError(
                f"{self.prefix}: {name} holds {entry.size} bytes, expected {expected} for {dtype} {entry.shape}"
            )
        with open(self.shard_path(entry.shard_id), "rb") as f:
            f.seek(entry.offset)
            raw = f.read(entry.size)
        if len(raw) != entry.size:
            raise CheckpointFormatError(f"{self.shard_path(entry.shard_id)} is truncated: {name} lies past its end")
        if crc32c(raw) != entry.crc32c:
            raise CheckpointFormatError(f"{self.prefix}: {name} fails its CRC-32C check (damaged data file)")
        if self._big_endian:
            dtype = dtype.newbyteorder(">")
        return np.frombuffer(raw, dtype).reshape(entry.shape).astype(dtype.newbyteorder("="))
