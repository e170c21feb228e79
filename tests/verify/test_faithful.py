"""verify and convert share one definition of a faithful conversion (obdconv/faithful.py): what the
converter skips, drops or clamps on purpose verifies as a documented difference, not a failure."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from obdconv import faithful
from obdconv.faithful import Difference, summarize
from obdconv.pipeline.runner import RunnerOptions, convert
from obdconv.request import ConversionRequest
from obdconv.verify import verify_reference
from tests.conftest import requires_root
from tests.oci.helpers import raw_header
from tests.pipeline.images import (
    LAYER_TYPES,
    Layer,
    Layout,
    compress,
    directory,
    file,
    make_tar,
    sha,
    symlink,
)

TOO_OLD = -(1 << 33)  # seconds: ~ year 1697, below ext4's range (1901-12-13 ..)
TOO_NEW = 1 << 36  # seconds: ~ year 4147, above it (.. 2446-05-10)


def _layer(members: list, *, socket: bool = False) -> Layer:
    tar = make_tar(members)
    if socket:  # tarfile masks the type bits of `mode`: a hand-made member with S_IFSOCK in it
        tar = bytes(raw_header(b"app.sock", mode=0o140755)) + tar
    return Layer(compress(tar, "gzip"), sha(tar), LAYER_TYPES[(False, "gzip")])


def _members(with_lost_found: bool) -> list:
    members = [
        file("attrs", b"a", xattrs={"user.kept": "1", "gnu.dropped": "2", "system.nfs4_acl": "3"}),
        symlink("link", "attrs", xattrs={"user.dropped": "1", "trusted.kept": "2"}),
        file("old", b"o", mtime=TOO_OLD),
        file("future", b"f", mtime=TOO_NEW),
        directory("dir", mtime=TOO_NEW),
    ]
    if with_lost_found:
        members += [directory("lost+found", mode=0o750, uid=7), file("lost+found/kept", b"k")]
    return members


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("faithful")
    lay = Layout(base / "layout")
    lay.image([_layer(_members(True), socket=True)], tag="with-lf")
    lay.image([_layer(_members(False), socket=True), _layer([file("second", b"2", mtime=TOO_NEW)])], tag="no-lf")
    for tag in ("with-lf", "no-lf"):
        convert(ConversionRequest(repository=f"oci:{lay.root}", input_tag=tag, overlaybd_tag=f"{tag}-obd",
                                  turbo_tag=f"{tag}-turbo", oci=True, workdir=str(base / f"w-{tag}")),
                options=RunnerOptions(workers=1))
    return lay.root


def _groups(report: object) -> dict[str, int]:
    (p,) = report.platforms  # type: ignore[attr-defined]
    return {g.rule: g.count for g in p.differences}


@pytest.mark.parametrize("fmt", ["obd", "turbo"])
def test_deliberate_differences_verify_and_are_reported(converted: Path, fmt: str) -> None:
    report = verify_reference(f"oci:{converted}:with-lf-{fmt}", f"oci:{converted}:with-lf")
    assert report.ok, report.format_text()
    assert _groups(report) == {"socket-skipped": 1, "xattr-namespace-dropped": 2, "user-xattr-on-special-file": 1,
                               "mtime-clamped": 3}
    text = report.format_text()
    assert "documented differences" in text and "app.sock" in text and "gnu.dropped" in text
    assert "clamped" in text and "1901-12-13" in text  # the reason is part of the report
    doc = json.loads(report.to_json())
    groups = {g["rule"]: g for g in doc["platforms"][0]["differences"]}
    assert groups["mtime-clamped"]["count"] == 3 and doc["ok"] is True
    assert any("user.dropped" in e for e in groups["user-xattr-on-special-file"]["examples"])


def test_mkfs_lost_found_is_a_difference_only_when_the_source_has_none(converted: Path) -> None:
    report = verify_reference(f"oci:{converted}:no-lf-obd", f"oci:{converted}:no-lf")
    assert report.ok, report.format_text()
    groups = _groups(report)
    assert groups["lost-found-added"] == 1 and groups["mtime-clamped"] == 4  # with layer 1's file
    # The image's own lost+found (mode, owner, content) is compared like any directory.
    with_lf = verify_reference(f"oci:{converted}:with-lf-obd", f"oci:{converted}:with-lf")
    assert "lost-found-added" not in _groups(with_lf)
    assert with_lf.platforms[0].entries_compared == 7  # attrs link old future dir lost+found lost+found/kept


@requires_root
@pytest.mark.root
def test_deliberate_differences_verify_through_a_mount(converted: Path) -> None:
    for tag in ("with-lf", "no-lf"):
        report = verify_reference(f"oci:{converted}:{tag}-obd", f"oci:{converted}:{tag}", mount=True)
        assert report.ok, report.format_text()


def test_out_of_range_times_warn_once_per_layer_at_convert(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lay = Layout(tmp_path / "layout")
    lay.image([_layer([file("a", b"1"), file("b", b"2", mtime=TOO_NEW), file("c", b"3", mtime=TOO_NEW)]),
               _layer([file("d", b"4", mtime=TOO_OLD)]), _layer([file("e", b"5")])], tag="t")
    with caplog.at_level(logging.WARNING, logger="obdconv.pipeline.metadata"):
        convert(ConversionRequest(repository=f"oci:{lay.root}", input_tag="t", overlaybd_tag="o", oci=True,
                                  workdir=str(tmp_path / "w")), options=RunnerOptions(workers=1))
    warnings = [r.getMessage() for r in caplog.records if "outside ext4's range" in r.getMessage()]
    assert len(warnings) == 2, warnings  # one per affected layer, none for the third
    assert "2 entries" in warnings[0] and "'b'" in warnings[0]
    assert "1 entry " in warnings[1] and "'d'" in warnings[1]


def test_rules_decide_for_the_converter() -> None:
    assert faithful.xattr_dropped_by("user.a", True) is None
    assert faithful.xattr_dropped_by("user.a", False) is faithful.XATTR_USER_ON_SPECIAL
    assert faithful.xattr_dropped_by("trusted.a", False) is None
    assert faithful.xattr_dropped_by("system.posix_acl_access", False) is None
    assert faithful.xattr_dropped_by("system.other", True) is faithful.XATTR_NAMESPACE_DROPPED
    assert faithful.xattr_dropped_by("gnu.x", True) is faithful.XATTR_NAMESPACE_DROPPED
    assert faithful.clamp_time_ns(faithful.MAX_TIME_NS + 1) == faithful.MAX_TIME_NS
    assert faithful.clamp_time_ns(faithful.MIN_TIME_NS - 1) == faithful.MIN_TIME_NS
    assert faithful.clamp_time_ns(-5) == -5
    assert faithful.is_socket(0o140644) and not faithful.is_socket(0o100644)
    groups = summarize([Difference(faithful.MTIME_CLAMPED, f"p{i}", layer=0) for i in range(7)]
                       + [Difference(faithful.SOCKET_SKIPPED, "s")])
    assert [(g.rule, g.count, len(g.examples)) for g in groups] == [("socket-skipped", 1, 1), ("mtime-clamped", 7, 5)]
