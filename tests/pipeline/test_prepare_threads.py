"""A layer prepared on several threads (inflate, tar hash, tar scan, block compression on a pool)
gives the spool of the single-thread pass byte for byte: on varied layers (empty, tiny, many small
files, a file bigger than every batch and read chunk, edge cases), gzip/zstd/plain sources, lz4
and zstd blocks, block sizes 4 KiB..32 KiB, native and turbo."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from obdconv.pipeline.prepare import prepare_layer, prepare_threads
from obdconv.registry import open_repository
from tests.pipeline.edge import edge_layers
from tests.pipeline.images import Layout, directory, file, hardlink, layer, symlink

SPOOL_FILES = ("blocks.bin", "lengths.u32", "entries.json.zst", "gzip.meta")


def _spool(spool: str) -> dict[str, bytes]:
    root = Path(spool)
    prepared = json.loads((root / "prepared.json").read_text())
    prepared.pop("spool")
    return {n: (root / n).read_bytes() for n in SPOOL_FILES if (root / n).exists()} | {
        "prepared": json.dumps(prepared, sort_keys=True).encode()}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, object]]]:
    rng = random.Random(14)
    many = [directory("many")] + [file(f"many/f{i}", rng.randbytes(rng.choice([0, 1, 100, 4095, 4097, 9000])))
                                  for i in range(2500)]
    huge = rng.randbytes(3 << 20) * 3 + bytes(5 << 20) + b"tail"  # > batches, chunks, pieces
    layers = [
        *edge_layers(("gzip", "zstd", "none", "gzip"), docker=False),
        layer([*many, symlink("many/s", "f1"), hardlink("many/h", "many/f2")], "gzip"),
        layer([file("huge", huge), file("tiny", b"x"), file("empty", b"")], "zstd"),
        layer([file("huge2", huge[:7 << 20])], "gzip"),
    ]
    lay = Layout(tmp_path_factory.mktemp("threads") / "src")
    lay.image(layers, tag="t")
    repo = open_repository(f"oci:{lay.root}")
    return f"oci:{lay.root}", json.loads(repo.get_manifest("t").data)["layers"]


def _prepare_all(name: str, descriptors: list[dict[str, object]], spool: Path, threads: int,
                 monkeypatch: pytest.MonkeyPatch, **kw: object) -> list[dict[str, bytes]]:
    monkeypatch.setenv("OBDCONV_PREPARE_THREADS", str(threads))
    assert prepare_threads() == threads
    repo = open_repository(name)
    turbo = bool(kw.pop("turbo", False))
    out = []
    for d in descriptors:
        if turbo and d["mediaType"].endswith("zstd"):  # type: ignore[union-attr]
            continue  # turboOCI refuses zstd layers (tested elsewhere)
        out.append(_spool(prepare_layer(repo, d, spool, native=not turbo, turbo=turbo, **kw).spool))  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize(("algorithm", "block_size"), [("lz4", 4096), ("lz4", 8192), ("zstd", 16384),
                                                       ("lz4", 32768)])
def test_native_spool_same_on_any_thread_count(image: tuple[str, list[dict[str, object]]], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, algorithm: str,
                                               block_size: int) -> None:
    name, descriptors = image
    one = _prepare_all(name, descriptors, tmp_path / "1", 1, monkeypatch, algorithm=algorithm, block_size=block_size)
    four = _prepare_all(name, descriptors, tmp_path / "4", 4, monkeypatch, algorithm=algorithm, block_size=block_size)
    assert four == one
    assert max(len(s["blocks.bin"]) for s in one) > 4 << 20  # the huge file really went through


def test_turbo_spool_same_on_any_thread_count(image: tuple[str, list[dict[str, object]]], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    name, descriptors = image
    one = _prepare_all(name, descriptors, tmp_path / "1", 1, monkeypatch, turbo=True)
    three = _prepare_all(name, descriptors, tmp_path / "3", 3, monkeypatch, turbo=True)
    assert three == one
    assert any("gzip.meta" in s for s in one)


def test_prepare_threads_follows_the_cpu_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OBDCONV_PREPARE_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 3, 5})
    assert prepare_threads() == 3
    monkeypatch.setenv("OBDCONV_PREPARE_THREADS", "junk")
    assert prepare_threads() == 3
    monkeypatch.setenv("OBDCONV_PREPARE_THREADS", "0")
    assert prepare_threads() == 1


@pytest.mark.slow
@pytest.mark.parametrize(("algorithm", "bs"), [("lz4", 4), ("zstd", 32)])
def test_converted_digests_same_on_any_thread_count(image: tuple[str, list[dict[str, object]]], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, algorithm: str, bs: int) -> None:
    """End to end: the native image converted with one prepare thread and with several is the
    same, layer blob by layer blob (turbo's spools are compared above; it refuses the zstd layers)."""
    from obdconv.pipeline.results import RunnerOptions
    from obdconv.pipeline.runner import convert
    from obdconv.request import ConversionRequest

    name, _ = image
    digests = {}
    for threads in (1, 3):
        monkeypatch.setenv("OBDCONV_PREPARE_THREADS", str(threads))
        request = ConversionRequest(name, input_tag="t", overlaybd_tag=f"obd-{algorithm}-{threads}", oci=True,
                                    algorithm=algorithm, block_size=bs << 10, workdir=str(tmp_path / f"w{threads}"),
                                    no_upload=True)
        result = convert(request, options=RunnerOptions(workers=1))
        digests[threads] = [o.root_digest for o in result.outputs] + sorted(
            layer["digest"] for o in result.outputs for layer in o.layers.values())
    assert digests[3] == digests[1]
    assert len(digests[1]) == 1 + 7  # the image and each of its layers
