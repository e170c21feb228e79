"""Trees 3,000 directories deep (paths of 6,000 bytes, past PATH_MAX): converted, deleted by a
whiteout or hidden by an opaque marker in the next layer, and verified in userspace and through a
kernel mount. Nothing on these paths may recurse per directory level.

One image holds three chains in layer 0: `w/...` (whited out by layer 1), `o/...` (made opaque by
layer 1, which adds `o/new`) and `k/...` (kept, so the mount walk meets its 6,000-byte paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from obdconv.pipeline.runner import RunnerOptions, convert
from obdconv.request import ConversionRequest
from obdconv.verify import verify_reference
from tests.conftest import requires_root
from tests.pipeline.images import Layout, directory, file, layer, opaque, whiteout

DEPTH = 3000


def _chain(top: str) -> list:
    paths = ["/".join([top] * (i + 1)) for i in range(DEPTH)]
    return [*(directory(p, mode=0o751) for p in paths), file(paths[-1] + "/leaf", b"at the bottom")]


@pytest.fixture(scope="module")
def deep_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("deep")
    lay = Layout(base / "layout")
    lower = layer([*_chain("w"), *_chain("o"), *_chain("k")])
    upper = layer([whiteout("w"), opaque("o"), file("o/new", b"n")])
    lay.image([lower, upper], tag="deep")
    convert(ConversionRequest(repository=f"oci:{lay.root}", input_tag="deep", overlaybd_tag="deep-obd", oci=True,
                              workdir=str(base / "work")), options=RunnerOptions(workers=1))
    return lay.root


KEPT = DEPTH + 1 + 2  # the k chain and its leaf, o and o/new


@pytest.mark.slow
def test_deep_trees_convert_delete_and_verify_userspace(deep_layout: Path) -> None:
    report = verify_reference(f"oci:{deep_layout}:deep-obd", f"oci:{deep_layout}:deep")
    assert report.ok, report.format_text()
    (p,) = report.platforms
    assert p.entries_compared == KEPT and p.fsck.status == "clean"


@pytest.mark.slow
@requires_root
@pytest.mark.root
def test_deep_trees_verify_through_a_mount(deep_layout: Path) -> None:
    """The kernel walk: 6,000-byte paths cannot be handed to lstat/open, only walked by fd."""
    report = verify_reference(f"oci:{deep_layout}:deep-obd", f"oci:{deep_layout}:deep", mount=True)
    assert report.ok, report.format_text()
    assert report.platforms[0].entries_compared == KEPT
