"""prepare_layer gives byte-identical spools with and without the tar scanner's C fast path, and its
data area sink accepts writes of any shape."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from obdconv.oci import tarscan
from obdconv.pipeline.prepare import DataAreaBlocks, prepare_layer
from obdconv.registry import open_repository
from tests.pipeline.edge import edge_layers
from tests.pipeline.images import Layout, directory, file, layer, symlink

SPOOL_FILES = ("blocks.bin", "lengths.u32", "entries.json.zst")


def _spool_bytes(spool: str) -> dict[str, bytes]:
    root = Path(spool)
    prepared = json.loads((root / "prepared.json").read_text())
    prepared.pop("spool")
    return {name: (root / name).read_bytes() for name in SPOOL_FILES} | {"prepared": json.dumps(prepared).encode()}


@pytest.mark.skipif(tarscan.FAST is None, reason="tar scanner C fast path not built or disabled")
def test_spools_identical_with_and_without_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(3)
    many = [directory("many")] + [file(f"many/{'long-' * 30}{i}", rng.randbytes(rng.choice([0, 1, 700, 5000])))
                                  for i in range(3000)]
    many += [file("many/big", rng.randbytes(3 << 20)), symlink("many/s", "big")]
    lay = Layout(tmp_path / "src")
    layers = [*edge_layers(("gzip", "zstd", "none", "gzip"), docker=False), layer(many, "gzip")]
    lay.image(layers, tag="t")
    repo = open_repository(f"oci:{lay.root}")
    descriptors = json.loads(repo.get_manifest("t").data)["layers"]
    results = {}
    for mode in ("fast", "python"):
        if mode == "python":
            monkeypatch.setattr(tarscan, "FAST", None)
        results[mode] = [_spool_bytes(prepare_layer(repo, d, tmp_path / mode, native=True, turbo=False).spool)
                         for d in descriptors]
    assert results["fast"] == results["python"]
    assert len(results["fast"][-1]["blocks.bin"]) > 3 << 20 // 2  # the big layer really went through


@pytest.mark.parametrize("threads", [1, 3])
def test_data_area_blocks_any_write_shape(threads: int) -> None:
    """Small memoryview writes (the fast path), bytes, bytearray and batch-crossing writes give
    the same blocks as one whole write, compressed in the caller's thread or on a pool."""
    rng = random.Random(5)
    data = b"".join(rng.randbytes(rng.randint(0, 9000)) + bytes(rng.randint(0, 9000)) for _ in range(200))
    data += bytes(-len(data) % 4096)

    def blocks(pieces: list[bytes | bytearray | memoryview]) -> tuple[bytes, list[int]]:
        out = io.BytesIO()
        sink = DataAreaBlocks(out, "lz4", 4096, threads)
        for piece in pieces:
            sink.write(piece)
        assert sink.finish() == len(data)
        return out.getvalue(), list(sink.lengths)

    whole = blocks([data])
    view = memoryview(data)
    cuts = sorted(rng.sample(range(1, len(data)), 300))
    spans = list(zip([0, *cuts], [*cuts, len(data)], strict=True))
    assert blocks([view[a:b] for a, b in spans]) == whole
    assert blocks([data[a:b] if i % 3 == 0 else bytearray(data[a:b]) if i % 3 == 1 else view[a:b]
                   for i, (a, b) in enumerate(spans)]) == whole
    assert blocks([view[a:b] for a, b in zip(range(0, len(data), 1 << 20), range(1 << 20, len(data) + (1 << 20),
                                                                                1 << 20), strict=True)]) == whole
    assert len(whole[1]) == len(data) // 4096
