"""CRC-32C (Castagnoli), the checksum of TF checkpoints, in NumPy.

The data is cut into K chunks of L bytes whose CRC registers are advanced together, one byte
column at a time (L vectorised steps instead of K·L scalar ones); since the register update is
linear over GF(2), the chunks then combine as reg ← zeros_L(reg) ⊕ reg(chunk), where zeros_L
(feeding L zero bytes) is applied through four byte tables. The bytes left over (< L) are fed one by one.
"""

from __future__ import annotations

import functools

import numpy as np

POLYNOMIAL = 0x82F63B78  # reflected Castagnoli polynomial
MASK_DELTA = 0xA282EAD8  # LevelDB/TF's masking of stored CRCs


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(POLYNOMIAL), table >> 1).astype(np.uint32)
    return table


_TABLE = _byte_table()
_TABLE_LIST = _TABLE.tolist()


def _feed(register: int, data: bytes | np.ndarray) -> int:
    """The register after feeding `data` one byte at a time (no initial or final inversion)."""
    table = _TABLE_LIST
    for byte in bytes(data):
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


@functools.lru_cache(maxsize=16)
def _zeros_tables(length: int) -> list[list[int]]:
    """tables[k][v] = the register that feeding `length` zero bytes makes of register v << 8k."""
    basis = [_feed(1 << bit, bytes(length)) for bit in range(32)]
    tables = []
    for k in range(4):
        table = [0] * 256
        for v in range(1, 256):
            low = v & -v
            table[v] = table[v ^ low] ^ basis[8 * k + low.bit_length() - 1]
        tables.append(table)
    return tables


def crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """CRC-32C of `data` (any bytes-like object or array, read as its raw bytes in memory order)."""
    flat = np.frombuffer(memoryview(data).cast("B"), np.uint8) if not isinstance(data, np.ndarray) else data
    flat = np.ascontiguousarray(flat).reshape(-1).view(np.uint8)
    chunk = 64
    while chunk < 4096 and chunk * chunk < flat.size:
        chunk *= 2
    count = flat.size // chunk
    register = 0xFFFFFFFF
    if count:
        columns = flat[: count * chunk].reshape(count, chunk).T.copy()
        chunk_registers = np.zeros(count, np.uint32)
        for column in columns:
            chunk_registers = _TABLE[(chunk_registers ^ column) & 0xFF] ^ (chunk_registers >> 8)
        t0, t1, t2, t3 = _zeros_tables(chunk)
        for value in chunk_registers.tolist():
            register = (
                t0[register & 0xFF] ^ t1[(register >> 8) & 0xFF] ^ t2[(register >> 16) & 0xFF] ^ t3[register >> 24]
            ) ^ value
    return _feed(register, flat[count * chunk :]) ^ 0xFFFFFFFF


def unmask(masked: int) -> int:
    """The CRC that LevelDB/TF stored as `masked` (rotated right by 15 bits plus a constant)."""
    rotated = (masked - MASK_DELTA) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF
