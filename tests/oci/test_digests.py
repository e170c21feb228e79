"""Chain ids and LSMT uuids against the reference convertor's real output (edge3, hello-world fixtures)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import lz4.block
import pytest

from obdconv.errors import BadInputError
from obdconv.oci.digests import chain_id_to_uuid, chain_ids, parse_digest, sha256_digest, validate_sha256
from obdconv.oci.tarscan import scan_tar
from tests.conftest import requires_shared
from tests.oci.helpers import EDGE3_OVERLAYBD_LAYERS, EDGE3_SOURCE_CONFIG, FIXTURES

HELLO_BLOBS = FIXTURES / "hello-world" / "blobs" / "sha256"


def _lsmt_uuids(layer_blob: Path) -> tuple[str, str]:
    """(uuid, parent_uuid) from the LSMT header inside tar wrapper -> ZFile block 0 (spec §1.1, §2.2)."""
    blob = layer_blob.read_bytes()
    with open(layer_blob, "rb") as f:
        (entry,) = scan_tar(f).entries
    zfile = blob[entry.tar_offset : entry.tar_offset + entry.size]
    assert zfile[:5] == b"ZFile"
    index_offset = struct.unpack_from("<Q", zfile, 40)[0]
    first_len = struct.unpack_from("<I", zfile, index_offset)[0]
    header = lz4.block.decompress(zfile[512 : 512 + first_len - 4], uncompressed_size=4096)
    assert header[:4] == b"LSMT"
    return header[56:92].decode(), header[93:129].decode()


@requires_shared
def test_chain_ids_and_uuids_match_reference_layers() -> None:
    diff_ids = json.loads(EDGE3_SOURCE_CONFIG.read_bytes())["rootfs"]["diff_ids"]
    ids = chain_ids(diff_ids)
    assert ids[0] == diff_ids[0]
    parent = "00000000-0000-0000-0000-000000000000"
    for chain_id, layer in zip(ids, EDGE3_OVERLAYBD_LAYERS, strict=True):
        uuid, parent_uuid = _lsmt_uuids(layer)
        assert chain_id_to_uuid(chain_id).upper() == uuid
        assert parent_uuid == parent
        parent = uuid


def test_chain_id_formula() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    expected = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert chain_ids([a, b]) == [a, expected]
    assert chain_ids([]) == []


@requires_shared
def test_uuid_example_from_spec_and_hello_world() -> None:
    diff_id = "sha256:01bb4fce3eb1b56b05adf99504dafd31907a5aadac736e36b27595c8b92f07f1"
    assert chain_id_to_uuid(diff_id) == "01bb4fce-3eb1-b56b-05ad-f99504dafd31"
    converted = HELLO_BLOBS / "022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
    assert _lsmt_uuids(converted)[0] == "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31"


def test_sha256_digest() -> None:
    assert sha256_digest(b"") == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("bad", ["", "sha256", "sha256:", "sha256:abc", "sha256:" + "A" * 64, "sha256:" + "g" * 64,
                                 ":abc", "sha256 :" + "a" * 64, "SHA256:" + "a" * 64])
def test_malformed_digests(bad: str) -> None:
    with pytest.raises(BadInputError, match="digest"):
        validate_sha256(bad)


def test_digest_parsing() -> None:
    assert parse_digest("sha512:" + "0" * 128) == ("sha512", "0" * 128)
    assert parse_digest("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8")[0] == "multihash+base58"
    with pytest.raises(BadInputError, match="only sha256"):
        validate_sha256("sha512:" + "0" * 128)
    with pytest.raises(BadInputError):
        chain_ids(["sha256:nothex"])
