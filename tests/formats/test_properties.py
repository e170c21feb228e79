"""Property tests: random RW histories -> committed LSMT -> ZFile -> reads equal a bytearray model;
stacks of 2-4 such layers equal the layered model (top wins, zeroed hides)."""

from __future__ import annotations

import io
import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obdconv.formats import lsmt, zfile
from obdconv.formats.blob import open_layer_blob
from obdconv.formats.lsmt import LSMTStack, LSMTWriter

SECTOR = 512
VSIZE_SECTORS = 256  # 128 KiB virtual disk keeps examples small and overlaps frequent
VSIZE = VSIZE_SECTORS * SECTOR

Op = tuple[str, int, int, int]  # (kind, first sector, sectors, fill seed)

ops_strategy = st.lists(
    st.tuples(st.sampled_from(["w", "w", "w", "z"]), st.integers(0, VSIZE_SECTORS - 1),
              st.integers(1, 80), st.integers(0, 255)),
    min_size=0, max_size=12,
)


def _fill(seed: int, n: int) -> bytes:
    # Distinct, compressible-but-not-trivial content per write: position-dependent bytes.
    return bytes((seed * 31 + i * 7 + (i >> 9)) & 0xFF for i in range(n))


def _apply(model: bytearray, ops: list[Op]) -> None:
    for kind, first, count, seed in ops:
        count = min(count, VSIZE_SECTORS - first)
        a, b = first * SECTOR, (first + count) * SECTOR
        model[a:b] = _fill(seed, b - a) if kind == "w" else bytes(b - a)


def _layer_blob(ops: list[Op], algorithm: str, block_size: int) -> bytes:
    w = LSMTWriter(virtual_size=VSIZE)
    for kind, first, count, seed in ops:
        count = min(count, VSIZE_SECTORS - first)
        if kind == "w":
            w.write(first * SECTOR, _fill(seed, count * SECTOR))
        else:
            w.zero(first * SECTOR, count * SECTOR)
    raw = io.BytesIO()
    w.commit(raw)
    return zfile.compress_zfile(raw.getvalue(), algorithm, block_size)


reads_strategy = st.lists(st.tuples(st.integers(0, VSIZE - 1), st.integers(0, 20000)), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy, reads=reads_strategy, algorithm=st.sampled_from(["lz4", "zstd"]),
       block_size=st.sampled_from([4096, 8192]))
def test_single_layer_matches_model(ops: list[Op], reads: list[tuple[int, int]], algorithm: str,
                                    block_size: int) -> None:
    model = bytearray(VSIZE)
    _apply(model, ops)
    layer = open_layer_blob(_layer_blob(ops, algorithm, block_size))
    assert layer.pread(0, VSIZE) == model
    for off, n in reads:
        n = min(n, VSIZE - off)
        assert layer.pread(off, n) == model[off : off + n]
    # the committed index satisfies the reader's rules and the merge limit
    assert all(m.length < lsmt.MAX_LENGTH for m in layer.mappings)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stack=st.lists(ops_strategy, min_size=2, max_size=4), reads=reads_strategy)
def test_stack_matches_layered_model(stack: list[list[Op]], reads: list[tuple[int, int]]) -> None:
    model = bytearray(VSIZE)
    for ops in stack:  # bottom first: later layers overwrite, zeroed ranges hide what is below
        _apply(model, ops)
    st_ = LSMTStack([open_layer_blob(_layer_blob(ops, "lz4", 4096)) for ops in stack])
    assert st_.virtual_size == VSIZE
    assert st_.pread(0, VSIZE) == model
    for off, n in reads:
        n = min(n, VSIZE - off)
        assert st_.pread(off, n) == model[off : off + n]
    # extents are sorted, disjoint, and cover exactly the sectors some layer mapped
    ext = st_.extents()
    assert all(a.offset + a.length <= b.offset for a, b in itertools.pairwise(ext))
    mapped = {s for lay in st_.layers for m in lay.mappings for s in range(m.offset, m.end)}
    covered = {s for e in ext for s in range(e.offset // SECTOR, (e.offset + e.length) // SECTOR)}
    assert covered == mapped
    # each extent comes from the highest layer that maps its sectors
    for e in ext:
        s0 = e.offset // SECTOR
        top = max(i for i, lay in enumerate(st_.layers) if any(m.offset <= s0 < m.end for m in lay.mappings))
        assert e.layer == top
