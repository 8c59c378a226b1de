"""CRC32C (Castagnoli), as TFRecord framing uses it: ``google-crc32c`` (C, part of the
``tfds`` extra) when it is installed, else NumPy (no extra dependency).

A byte-at-a-time CRC in Python runs at about 1 MB/s, too slow for image records. CRC is
linear over GF(2), so the message is cut into ``K`` equal lanes (zero-padded in front:
with a zero register, leading zeros change nothing) that are updated together, one byte
column per NumPy step; the lanes' CRCs are then combined pairwise, shifting the left one
over the right one's length with a 32x32 bit matrix ("append m zero bytes").
"""

from __future__ import annotations

import functools

import numpy as np

_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_MASK_DELTA = 0xA282EAD8  # TFRecord's checksum masking constant


@functools.cache
def _table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1)
    return table.astype(np.uint32)


def _update(crc: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The raw register of every lane after its bytes ``columns[lane, :]``."""
    table = _table()
    for j in range(columns.shape[1]):
        crc = table[(crc ^ columns[:, j]) & 0xFF] ^ (crc >> 8)
    return crc


def _apply(matrix: np.ndarray, v: np.ndarray) -> np.ndarray:
    """GF(2) matrix (its 32 columns as uint32) times each uint32 of ``v``."""
    bits = (v[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    return np.bitwise_xor.reduce(bits * matrix[None, :], axis=1).astype(np.uint32)


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The columns of the map ``a`` after ``b``."""
    return _apply(a, b)


@functools.cache
def _pow2_operators() -> list[np.ndarray]:
    """Columns of the map register -> register after 2^k zero bytes, k = 0..63."""
    basis = np.uint32(1) << np.arange(32, dtype=np.uint32)
    ops = [_update(basis, np.zeros((32, 1), np.uint8))]
    for _ in range(63):
        ops.append(_compose(ops[-1], ops[-1]))
    return ops


def _zeros_operator(length: int) -> np.ndarray:
    """The map register -> register after ``length`` zero bytes (by its binary digits)."""
    ops = _pow2_operators()
    result = np.uint32(1) << np.arange(32, dtype=np.uint32)  # the identity
    for k in range(length.bit_length()):
        if length >> k & 1:
            result = _compose(ops[k], result)
    return result


def _raw(data: np.ndarray) -> int:
    """The register after ``data`` from a zero register (no init, no final xor)."""
    n = len(data)
    lanes = max(1, min(1024, n // 64))
    length = -(-n // lanes)
    padded = np.zeros(lanes * length, np.uint8)
    padded[lanes * length - n :] = data
    crc = _update(np.zeros(lanes, np.uint32), padded.reshape(lanes, length))
    shift = _zeros_operator(length)
    while len(crc) > 1:
        if len(crc) % 2:  # a zero lane in front is more leading zeros
            crc = np.concatenate([np.zeros(1, np.uint32), crc])
        crc = _apply(shift, crc[0::2]) ^ crc[1::2]
        shift = _compose(shift, shift)  # the lanes are twice as long now
    return int(crc[0])


def _google_crc32c() -> object | None:
    try:
        import google_crc32c
    except ImportError:
        return None
    # Its pure-Python fallback is slower than ours; only the C build is worth taking.
    return google_crc32c if google_crc32c.implementation == "c" else None


_FAST = _google_crc32c()


def crc32c(data: bytes | memoryview) -> int:
    """Standard CRC32C (init and final xor 0xFFFFFFFF)."""
    if _FAST is not None:
        return _FAST.value(bytes(data))
    return crc32c_numpy(data)


def crc32c_numpy(data: bytes | memoryview) -> int:
    """:func:`crc32c` in NumPy (~45 MB/s here: 3.5 ms for a 160 KB record)."""
    arr = np.frombuffer(data, np.uint8)
    if len(arr) < 4:
        reg = _update(np.array([0xFFFFFFFF], np.uint32), arr[None, :])[0]
        return int(reg) ^ 0xFFFFFFFF
    # The init value enters a reflected CRC as an xor onto the first four bytes.
    arr = arr.copy()
    arr[:4] ^= 0xFF
    return _raw(arr) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked checksum of ``data``."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF
