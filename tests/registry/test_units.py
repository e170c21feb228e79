"""Pure pieces: WWW-Authenticate parsing, scopes, re-chunking, the verifying reader, Docker config."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from obdconv.errors import IntegrityError
from obdconv.registry.auth import (
    Credentials,
    docker_config_credentials,
    format_scopes,
    parse_challenges,
    parse_scope,
)
from obdconv.registry.bodies import rechunk
from obdconv.registry.client import _scopes_for
from obdconv.registry.repository import VerifyingReader, buffered


def test_parse_bearer_challenge_with_commas_inside_quotes() -> None:
    header = ('Bearer realm="https://auth.example/token",service="registry.example",'
              'scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope"')
    (challenge,) = parse_challenges(header)
    assert challenge.scheme == "bearer"
    assert challenge.params == {"realm": "https://auth.example/token", "service": "registry.example",
                                "scope": "repository:a/b:pull,push repository:c:pull",
                                "error": "insufficient_scope"}


def test_parse_several_challenges_and_escapes() -> None:
    basic, bearer = parse_challenges('Basic realm="a \\"quoted\\" realm", Bearer realm="https://t/x",service=s')
    assert (basic.scheme, basic.params) == ("basic", {"realm": 'a "quoted" realm'})
    assert (bearer.scheme, bearer.params) == ("bearer", {"realm": "https://t/x", "service": "s"})


def test_scopes_round_trip_and_inference() -> None:
    atoms = parse_scope("repository:a/b:push,pull repository:c:pull repository:a/b:delete")
    assert format_scopes(atoms) == ["repository:a/b:delete,pull,push", "repository:c:pull"]
    assert _scopes_for("GET", "http://h:5/v2/a/b/manifests/latest") == {("repository:a/b", "pull")}
    assert _scopes_for("PATCH", "http://h/v2/x/blobs/uploads/uuid?_state=1") == {
        ("repository:x", "pull"), ("repository:x", "push")}
    assert _scopes_for("GET", "http://h/v2/") == set()


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(1, 200), st.one_of(st.none(), st.integers(1, 400)))
def test_rechunk_keeps_bytes_and_bounds(chunks: list[bytes], limit: int, merge_below: int | None) -> None:
    out = list(rechunk(chunks, limit, merge_below))
    assert b"".join(out) == b"".join(chunks)
    assert all(0 < len(piece) <= limit for piece in out)


def _reader(data: bytes, digest: str, size: int | None) -> io.BufferedReader:
    return buffered(VerifyingReader(io.BytesIO(data), digest, size, "blob under test"))  # type: ignore[return-value]


def test_verifying_reader() -> None:
    data = b"x" * 5000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert _reader(data, digest, len(data)).read() == data
    with pytest.raises(IntegrityError, match="expected " + digest):
        _reader(data[:-1] + b"y", digest, len(data)).read()
    with pytest.raises(IntegrityError, match="4999 bytes, expected 5000"):
        _reader(data[:-1], digest, len(data)).read()
    with pytest.raises(IntegrityError, match="more than the expected 10"):
        _reader(data, digest, 10).read()


def test_docker_config_lookup(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    entry = base64.b64encode(b"user:pa:ss").decode()
    config.write_text(json.dumps({"auths": {"https://localhost:5000/v1/": {"auth": entry},
                                            "https://index.docker.io/v1/": {"auth": entry}}}))
    assert docker_config_credentials("127.0.0.1:5000", config) == ("user", "pa:ss")  # localhost alias
    assert docker_config_credentials("docker.io", config) == ("user", "pa:ss")
    assert docker_config_credentials("other.io", config) is None
    assert docker_config_credentials("other.io", tmp_path / "missing.json") is None


def test_credentials_repr_hides_password() -> None:
    credentials = Credentials("bob", "s3cret-value")
    assert "s3cret" not in repr(credentials) and "s3cret" not in str(credentials)
    assert credentials.basic_header() == "Basic " + base64.b64encode(b"bob:s3cret-value").decode()
