"""`--flatten`: the whole image as one native layer holding the final filesystem and nothing else."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from obdconv.ext4 import Extent
from obdconv.formats.blob import open_payload
from obdconv.oci.digests import chain_ids
from obdconv.pipeline.flatten import _uncovered, _union, decode_ranges, encode_ranges, live_pieces
from obdconv.pipeline.metadata import AppliedLayer, FilePlacement
from obdconv.pipeline.runner import ConversionResult, ProgressEvent, RunnerOptions, convert
from obdconv.request import ConversionRequest
from obdconv.verify import verify_reference
from tests.conftest import requires_root
from tests.pipeline.base_fixture import base_layer_path
from tests.pipeline.images import Layout, directory, file, hardlink, layer, opaque, whiteout
from tests.pipeline.readback import (
    blob_path,
    check_tree,
    e2fsck,
    flatten,
    manifest,
    source_layer_paths,
    tag_digest,
)

# Payloads a later layer deletes or replaces (must not reach the flattened layer) and ones that stay.
DEAD = {name: random.Random(seed).randbytes(size) for name, seed, size in
        (("replaced", 1, 200_000), ("deleted", 2, 150_000), ("in-opaque-dir", 3, 50_000))}
LIVE = {name: random.Random(seed).randbytes(size) for name, seed, size in
        (("kept", 11, 120_000), ("replacement", 12, 90_000), ("linked", 13, 70_000), ("top", 14, 30_000))}


def layers() -> list[list]:  # type: ignore[type-arg]
    return [
        [directory("etc"), file("etc/a.bin", DEAD["replaced"]), file("etc/b.bin", DEAD["deleted"]),
         file("kept.bin", LIVE["kept"]), directory("d"), file("d/x", DEAD["in-opaque-dir"]),
         file("orig", LIVE["linked"])],
        [file("etc/a.bin", LIVE["replacement"]), whiteout("etc/b.bin")],
        [opaque("d"), file("d/y", b"new y"), hardlink("link", "orig")],
        [whiteout("orig"), file("top.bin", LIVE["top"], mode=0o700)],  # the inode lives on as `link`
        [file("small", b"s" * 10), directory("empty")],
    ]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lay = Layout(tmp_path_factory.mktemp("flat-src") / "src")
    extra = {"config": {"Env": ["A=1"], "Entrypoint": ["/top.bin"], "Labels": {"l": "v"}, "WorkingDir": "/d"},
             "created": "2024-01-02T03:04:05Z",
             "history": [{"created_by": f"step {i}"} for i in range(5)] + [{"created_by": "meta", "empty_layer": True}]}
    kinds = ("gzip", "none", "gzip", "zstd", "gzip")
    lay.image([layer(m, k, True) for m, k in zip(layers(), kinds, strict=True)], docker=True, tag="src",
              config_extra=extra)
    return lay.root


def run(layout: Path, tmp: Path, tag: str, *, flat: bool = True, workers: int = 1, **kw: object) -> ConversionResult:
    request = ConversionRequest(repository=f"oci:{layout}", input_tag="src", overlaybd_tag=tag, flatten=flat,
                                workdir=str(tmp / tag), **kw)  # type: ignore[arg-type]
    return convert(request, options=RunnerOptions(workers=workers))


def lsmt_bytes(layout: Path, digest: str) -> bytes:
    payload = open_payload(str(blob_path(layout, digest)))
    return payload.source.pread(0, payload.size)


def test_interval_helpers_and_wire_form() -> None:
    covered = [(10, 20), (30, 40)]
    assert _uncovered(0, 50, covered, 0)[0] == [(0, 10), (20, 10), (40, 10)]
    assert _uncovered(12, 5, covered, 0)[0] == []
    assert _uncovered(35, 10, covered, 0)[0] == [(40, 5)]
    assert _union(covered, [(20, 30), (45, 50)]) == [(10, 40), (45, 50)]
    ranges = [(0, 9263), (32768, 1033), (1 << 40, 5)]
    assert decode_ranges(encode_ranges(ranges)) == ranges


def test_live_pieces_top_wins_and_only_allocated() -> None:
    """Layer 0's file fills device blocks 100-109 (data area blocks 0-9); layer 1 rewrites 104-105
    and metadata block 5; blocks 108-109 are free in the final filesystem."""
    meta = bytes(4096)
    lower = AppliedLayer([(5, b"\x01" * 4096), (6, meta)], [(FilePlacement("f", 10 * 4096, 0, -1), [Extent(0, 100, 10)])])
    upper = AppliedLayer([(5, b"\x02" * 4096)], [(FilePlacement("g", 2 * 4096, 4096, -1), [Extent(0, 104, 2)])])
    live = live_pieces([lower, upper], [(5, 2), (100, 8)])
    assert live.data == [(100, 4, 0, 0), (104, 2, 1, 1), (106, 2, 0, 6)]
    assert live.metadata == [(5, b"\x02" * 4096), (6, meta)]
    assert live_pieces([lower, upper], [(100, 1)]).metadata == []


@pytest.mark.parametrize("bs", [4096, 16384])
def test_flattened_image_holds_only_the_final_filesystem(layout: Path, tmp_path: Path, bs: int) -> None:
    layered = run(layout, tmp_path, f"layered-{bs}", flat=False, block_size=bs)
    flat = run(layout, tmp_path, f"flat-{bs}", block_size=bs)
    src = tag_digest(layout, "src")
    m = manifest(layout, flat.output("native").root_digest)
    (only,) = m["layers"]
    assert only["annotations"]["containerd.io/snapshot/overlaybd/version"] == "0.1.0"
    diff_ids = json.loads(blob_path(layout, manifest(layout, src)["config"]["digest"]).read_bytes())["rootfs"]["diff_ids"]
    assert list(flat.output("native").layers) == [chain_ids(diff_ids)[-1]]  # filed under the top chain id
    # same filesystem as the layered output and the source, e2fsck clean
    for digest, name in ((flat.output("native").root_digest, "flat"), (layered.output("native").root_digest, "lay")):
        image = tmp_path / f"{name}.img"
        flatten(layout, digest, image)
        assert e2fsck(image) == ""
        assert check_tree(image, source_layer_paths(layout, src)) == []
        image.unlink()
    # nothing a later layer deleted or replaced; all that stays
    data = lsmt_bytes(layout, only["digest"])
    for name, payload in DEAD.items():
        assert payload[4096:8192] not in data, f"dead file {name} reached the flattened layer"
    for name, payload in LIVE.items():
        assert payload[4096:8192] in data, f"live file {name} is missing"
    layered_sizes = sum(d["size"] for d in manifest(layout, layered.output("native").root_digest)["layers"])
    assert only["size"] < layered_sizes - 300_000  # the dead payloads (random: incompressible) are gone


def test_config_and_determinism(layout: Path, tmp_path: Path) -> None:
    first = run(layout, tmp_path, "flat-a")
    again = run(layout, tmp_path, "flat-b", workers=2)
    assert again.output("native").root_digest == first.output("native").root_digest
    m = manifest(layout, first.output("native").root_digest)
    config = json.loads(blob_path(layout, m["config"]["digest"]).read_bytes())
    source = json.loads(blob_path(layout, manifest(layout, tag_digest(layout, "src"))["config"]["digest"]).read_bytes())
    assert config["rootfs"] == {"type": "layers", "diff_ids": [m["layers"][0]["digest"]]}
    history = config["history"]
    assert history[:-1] == [{**h, "empty_layer": True} for h in source["history"]]
    assert history[-1] == {"created": "2024-01-02T03:04:05Z", "created_by": "obdconv convert --flatten",
                           "comment": "5 layer(s) flattened into one overlaybd layer holding the final filesystem"}
    assert [h for h in history if not h.get("empty_layer")] == history[-1:]  # one entry per layer
    for key in source:
        if key not in ("rootfs", "history"):
            assert config[key] == source[key], key  # labels, env, entrypoint, ... stay
    report = verify_reference(f"oci:{layout}:flat-a", f"oci:{layout}:src")
    assert report.ok, report.format_text()


def test_flatten_on_the_base_layer(layout: Path, tmp_path: Path) -> None:
    base = base_layer_path()
    result = run(layout, tmp_path, "flat-base", mkfs=False, base_layer=str(base))
    m = manifest(layout, result.output("native").root_digest)
    assert len(m["layers"]) == 2 and m["layers"][0]["digest"].startswith("sha256:a8b5fca8")
    report = verify_reference(f"oci:{layout}:flat-base", f"oci:{layout}:src")
    assert report.ok, report.format_text()


def test_one_assemble_after_every_prepare(layout: Path, tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    request = ConversionRequest(repository=f"oci:{layout}", input_tag="src", overlaybd_tag="flat-ev", flatten=True,
                                workdir=str(tmp_path / "ev"))
    convert(request, options=RunnerOptions(workers=1), progress=lambda e: events.append(e) if e.finished else None)
    assert [e.stage for e in events].count("prepare") == 5
    assembles = [e for e in events if e.stage == "assemble"]
    assert len(assembles) == 1 and assembles[0].layer_index == 4


@requires_root
def test_flattened_and_layered_mount_to_the_same_tree(layout: Path, tmp_path: Path) -> None:
    run(layout, tmp_path, "m-flat")
    run(layout, tmp_path, "m-layered", flat=False)
    for tag in ("m-flat", "m-layered"):
        report = verify_reference(f"oci:{layout}:{tag}", f"oci:{layout}:src", mount=True)
        assert report.ok, report.format_text()
        assert report.platforms[0].fsck.status == "clean"
