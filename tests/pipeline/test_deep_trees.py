"""Trees 3,000 directories deep (paths of 6,000 bytes, past PATH_MAX): converted, deleted by a
whiteout or hidden by an opaque marker in the next layer, and verified in userspace and through a
kernel mount. Nothing on these paths may recurse per directory level."""

from __future__ import annotations

from pathlib import Path

import pytest

from obdconv.pipeline.runner import RunnerOptions, convert
from obdconv.request import ConversionRequest
from obdconv.verify import verify_reference
from tests.conftest import requires_root
from tests.pipeline.images import Layout, directory, file, layer, opaque, whiteout

DEPTH = 3000
BOTTOM = "/".join(["d"] * DEPTH)

UPPERS = {
    "deep": [],
    "deep-whiteout": [layer([whiteout("d"), file("kept", b"k")])],
    "deep-opaque": [layer([opaque("d"), file("d/new", b"n")])],
}


@pytest.fixture(scope="module")
def deep_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("deep")
    lay = Layout(base / "layout")
    chain = [directory("/".join(["d"] * (i + 1)), mode=0o751) for i in range(DEPTH)]
    lower = layer([*chain, file(BOTTOM + "/leaf", b"at the bottom"), file("top", b"t")])
    for tag, uppers in UPPERS.items():
        lay.image([lower, *uppers], tag=tag)
    for tag in UPPERS:  # after every image is written: Layout rewrites index.json from what it knows
        convert(ConversionRequest(repository=f"oci:{lay.root}", input_tag=tag, overlaybd_tag=f"{tag}-obd", oci=True,
                                  workdir=str(base / f"work-{tag}")),
                options=RunnerOptions(workers=1, spool_dir=str(base / "spool"), keep_spool=True))  # layer 0 once
    return lay.root


@pytest.mark.slow
@pytest.mark.parametrize("tag", list(UPPERS))
def test_deep_tree_converts_and_verifies_userspace(deep_layout: Path, tag: str) -> None:
    report = verify_reference(f"oci:{deep_layout}:{tag}-obd", f"oci:{deep_layout}:{tag}")
    assert report.ok, report.format_text()
    (p,) = report.platforms
    want = {"deep": DEPTH + 2, "deep-whiteout": 2, "deep-opaque": 3}[tag]  # paths in the tree
    assert p.entries_compared == want and p.fsck.status == "clean"


@pytest.mark.slow
@requires_root
@pytest.mark.root
def test_deep_tree_verifies_through_a_mount(deep_layout: Path) -> None:
    """The kernel walk: 6,000-byte paths cannot be handed to lstat/open, only walked by fd."""
    report = verify_reference(f"oci:{deep_layout}:deep-obd", f"oci:{deep_layout}:deep", mount=True)
    assert report.ok, report.format_text()
    assert report.platforms[0].entries_compared == DEPTH + 2
