"""Checks that a prepared-layer spool still holds what prepare wrote, before it is reused.

A spool outlives the run that made it (`--spool-dir`, the fleet's per-worker spools), so a disk
error, a full disk during a copy or a stray write can change it; trusting it blindly once published
a flipped byte as a corrupt ZFile block. The checks are cheap next to preparing again:

* `prepared.json` carries a sha256 of its own content (`seal` / `unseal`);
* the small files (entries, block lengths, gzip index) are listed in it with size and sha256;
* `blocks.bin` is checked block by block with the CRC32C each compressed block already carries
  (one C call per block, no decompression), and its size against the lengths.

Each check returns None when all is well, else a sentence naming the file and what is wrong.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import crc32c as _crc32c

from obdconv.formats.crc import STD_CRC_RESIDUE, ZFILE_BLOCK_CRC_SEED

READ_CHUNK = 8 << 20
_STD_SEED = ZFILE_BLOCK_CRC_SEED ^ 0xFFFFFFFF  # raw-CRC seed in the standard library's terms (crc.py)
SEAL_KEY = "sha256"


def _canonical(d: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in d.items() if k != SEAL_KEY}, sort_keys=True,
                      separators=(",", ":")).encode()


def seal(d: dict[str, Any]) -> dict[str, Any]:
    """`d` with a sha256 of the rest of its content, for `unseal`."""
    return {**d, SEAL_KEY: hashlib.sha256(_canonical(d)).hexdigest()}


def unseal(d: dict[str, Any]) -> str | None:
    """None when `d` is as `seal` left it, else the problem."""
    if d.get(SEAL_KEY) != hashlib.sha256(_canonical(d)).hexdigest():
        return "prepared.json does not match its own checksum"
    return None


def file_record(path: Path) -> list[Any]:
    """[size, sha256 hex] of a spool file, as `check_files` expects it."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return [size, h.hexdigest()]


def check_files(spool: Path, files: dict[str, list[Any]]) -> str | None:
    """Every file recorded by `file_record` still has its size and sha256."""
    for name, (size, digest) in sorted(files.items()):
        path = spool / name
        try:
            actual = path.stat().st_size
            if actual != size:
                return f"{name} is {actual} bytes, prepare wrote {size}"
            if file_record(path)[1] != digest:
                return f"{name} does not match the sha256 prepare recorded"
        except OSError as e:
            return f"{name}: {e.strerror or e}"
    return None


def read_lengths(path: Path, count: int) -> list[int]:
    """The little-endian u32 block lengths of `lengths.u32`."""
    lengths = array.array("I")
    with open(path, "rb") as f:
        lengths.fromfile(f, count)
    if sys.byteorder != "little":
        lengths.byteswap()
    return lengths.tolist()


def check_blocks(blocks: Path, lengths: list[int], compressed_size: int, offset: int = 0) -> str | None:
    """`blocks.bin` from `offset` is the blocks `lengths` describe, each ending with its valid
    CRC32C. A file with room in front of its blocks may also hold a blob's head and tail around
    them (finished in place, see inplace.py); without room it holds the blocks alone."""
    total = sum(lengths)
    try:
        actual = blocks.stat().st_size
    except OSError as e:
        return f"blocks.bin: {e.strerror or e}"
    if total != compressed_size or actual < offset + total or (not offset and actual != total):
        return (f"blocks.bin is {actual} bytes, its block lengths add up to {total} from byte {offset}, "
                f"prepare wrote {compressed_size}")
    with open(blocks, "rb") as f:
        f.seek(offset)
        k = 0  # next block
        carry = b""
        while k < len(lengths):
            data = carry + f.read(READ_CHUNK)
            # The blocks wholly inside `data`; the rest is carried to the next read.
            ends = list(itertools.accumulate(lengths[k:k + len(data) // 5 + 1]))
            n = next((i for i, e in enumerate(ends) if e > len(data)), len(ends))
            if n == 0:
                return f"blocks.bin ends inside block {k}"
            starts = [0, *ends[:n - 1]]
            mv = memoryview(data)
            sums = list(map(_crc32c.crc32c, map(mv.__getitem__, map(slice, starts, ends[:n])),
                            itertools.repeat(_STD_SEED)))
            if sums.count(STD_CRC_RESIDUE) != n:
                bad = k + next(i for i, v in enumerate(sums) if v != STD_CRC_RESIDUE)
                return f"blocks.bin block {bad} fails its CRC32C"
            carry = data[ends[n - 1]:]
            k += n
    return None
