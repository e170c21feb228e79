from __future__ import annotations

import pytest

from obdconv.errors import BadInputError
from obdconv.registry.reference import Reference, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost:5000/redis", Reference("localhost:5000", "redis")),
        ("127.0.0.1:5000/a/b/c:v1", Reference("127.0.0.1:5000", "a/b/c", "v1")),
        (f"registry.example.com/team/app@{DIGEST}", Reference("registry.example.com", "team/app", "", DIGEST)),
        (f"registry.example.com/team/app:t@{DIGEST}", Reference("registry.example.com", "team/app", "t", DIGEST)),
        ("localhost/app:latest", Reference("localhost", "app", "latest")),
        ("redis", Reference("docker.io", "library/redis")),
        ("overlaybd/redis:6", Reference("docker.io", "overlaybd/redis", "6")),
        ("docker.io/overlaybd/redis", Reference("docker.io", "overlaybd/redis")),
        ("[::1]:5000/x", Reference("[::1]:5000", "x")),
        ("oci:/tmp/layout", Reference("", "/tmp/layout", layout=True)),
        ("oci:/tmp/lay:out/dir:tag1", Reference("", "/tmp/lay:out/dir", "tag1", layout=True)),
        ("oci:relative/dir", Reference("", "relative/dir", layout=True)),
        (f"oci:/tmp/x@{DIGEST}", Reference("", "/tmp/x", "", DIGEST, layout=True)),
    ],
)
def test_parse_reference(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected


def test_name_and_str_round_trip() -> None:
    ref = parse_reference("127.0.0.1:5000/a/b:v1")
    assert ref.name == "127.0.0.1:5000/a/b"
    assert str(ref) == "127.0.0.1:5000/a/b:v1"
    assert parse_reference(str(ref)) == ref
    assert parse_reference("oci:/x/y:t").name == "oci:/x/y"
    assert ref.ref == "v1"
    assert parse_reference(f"h.io/a@{DIGEST}").ref == DIGEST


@pytest.mark.parametrize(
    "text",
    ["", " host.io/a", "host.io/UPPER", "host.io/a:bad tag", "host.io/a@sha256:short", "oci:", "host.io/a//b",
     "bad_host.io:x:y/a"],
)
def test_invalid_references_are_rejected_with_a_message(text: str) -> None:
    with pytest.raises(BadInputError) as info:
        parse_reference(text)
    assert str(info.value)
