"""The local runner with a process pool (workers > 1): the helper thread that opens the assemble
gate as soon as every prepare is done must still keep the gate shut when any prepare fails, and
the output must not depend on the pool (same digests as a one-process run)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from obdconv.errors import IntegrityError
from obdconv.pipeline.pool import thread_priority_raised
from obdconv.pipeline.runner import ConversionResult, RunnerOptions, convert
from obdconv.request import ConversionRequest
from tests.conftest import requires_root
from tests.pipeline.edge import edge_layers
from tests.pipeline.images import Layout, copy_layout
from tests.pipeline.readback import blob_path, manifest, tag_digest
from tests.pipeline.test_e2e_layout import tree_hash


def run(layout: Path, work: Path, workers: int) -> ConversionResult:
    request = ConversionRequest(repository=f"oci:{layout}", input_tag="v1", overlaybd_tag="obd",
                                turbo_tag="turbo", workdir=str(work))
    return convert(request, options=RunnerOptions(workers=workers))


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    lay = Layout(tmp_path / "src")
    lay.image(edge_layers(("gzip", "gzip", "none", "gzip"), docker=False), tag="v1")
    return lay.root


@pytest.mark.parametrize("victim_index", [0, 3])
def test_a_corrupt_layer_anywhere_pushes_nothing_with_a_pool(layout: Path, tmp_path: Path,
                                                             victim_index: int) -> None:
    # Layer 3 is the last one: every other layer's metadata is applied (and its assembles are
    # pending) while its prepare fails; layer 0 fails before any metadata runs.
    layers = manifest(layout, tag_digest(layout, "v1"))["layers"]
    victim = blob_path(layout, layers[victim_index]["digest"])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x5A
    victim.write_bytes(bytes(data))
    before = tree_hash(layout)
    with pytest.raises(IntegrityError):
        run(layout, tmp_path / "work", workers=2)
    assert tree_hash(layout) == before


def test_pool_and_inline_runs_give_the_same_digests(layout: Path, tmp_path: Path) -> None:
    other = copy_layout(layout, tmp_path / "other")
    pooled = run(layout, tmp_path / "w2", workers=2)
    inline = run(other, tmp_path / "w1", workers=1)
    for fmt in ("native", "turbo"):
        assert pooled.output(fmt).root_digest == inline.output(fmt).root_digest
        assert pooled.output(fmt).layers == inline.output(fmt).layers
        assert len(pooled.output(fmt).layers) == 4


@requires_root
def test_metadata_thread_priority_is_raised_and_restored() -> None:
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    # Another thread (started before, as the runner's workers and helpers are) keeps its priority.
    inside = threading.Event()
    seen: list[int] = []

    def other() -> None:
        inside.wait(10)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    t = threading.Thread(target=other)
    t.start()
    with thread_priority_raised(3):
        assert os.getpriority(os.PRIO_PROCESS, tid) == max(-20, before - 3)
        inside.set()
        t.join()
    assert seen == [before]
    assert os.getpriority(os.PRIO_PROCESS, tid) == before
    with thread_priority_raised(0):
        assert os.getpriority(os.PRIO_PROCESS, tid) == before
