"""CRC-32C in the "raw" form overlaybd uses (spec §0).

overlaybd's crc32c computes the reflected Castagnoli CRC with the register initialised to `seed` and
no pre- or post-inversion. The C-backed `crc32c` package computes the standard CRC-32C (inverted at
both ends, continuing from a previous *finalised* value), so the raw value is derived by undoing both
inversions: raw(d, s) = std(d, s ^ 0xFFFFFFFF) ^ 0xFFFFFFFF.
"""

from __future__ import annotations

from typing import TypeAlias

import crc32c as _crc32c

Buffer: TypeAlias = bytes | bytearray | memoryview

_MASK = 0xFFFFFFFF

ZFILE_BLOCK_CRC_SEED = 100007  # `crc32c_salt` seed of per-block ZFile CRCs (spec §2.3)


def raw_crc32c(data: Buffer, seed: int = 0) -> int:
    """rawCRC32C(data, seed) of spec §0: no inversion before or after."""
    return _crc32c.crc32c(data, (seed ^ _MASK) & _MASK) ^ _MASK


# Appending a block's raw CRC (little-endian) to the block drives the raw CRC register to 0, for any
# seed: raw(seed, block + le32(raw(seed, block))) == 0, and for a given block only the right 4 bytes
# do (appending 4 bytes is a bijection of the register). So a stored block + CRC is intact exactly
# when the *standard* CRC-32C over all of it, continued from `seed ^ 0xFFFFFFFF`, equals this
# constant: one C call per block, no unpacking of the stored value.
STD_CRC_RESIDUE = _MASK


def block_crc_ok(stored_with_crc: Buffer, seed: int) -> bool:
    """True if `stored_with_crc` ends with the raw CRC32C (seed `seed`, little-endian) of the rest."""
    return len(stored_with_crc) >= 4 and _crc32c.crc32c(stored_with_crc, (seed ^ _MASK) & _MASK) == STD_CRC_RESIDUE
