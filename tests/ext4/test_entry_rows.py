"""`LayerEntry.to_list`/`from_list`, the spool's JSON row form, after from_list's speed-up."""

from __future__ import annotations

import json

import pytest

from obdconv.entries import EntryType, LayerEntry

E, T = LayerEntry, EntryType


@pytest.mark.parametrize("entry_type", list(EntryType))
def test_rows_round_trip_through_json(entry_type: EntryType) -> None:
    entry = E("usr/lib/x", entry_type, 0o4755, uid=1 << 31, gid=7, mtime_ns=-(1 << 40) - 3, size=12345,
              link_target="../t", devmajor=4, devminor=64, xattrs=[("user.a", b"\0\xff"), ("security.x", b"")],
              tar_offset=512, data_offset=8192)
    row = json.loads(json.dumps(entry.to_list()))
    assert row[1] == entry_type.value  # the row format itself: the type's one-letter value
    back = LayerEntry.from_list(row)
    assert back == entry and back.type is entry_type
    assert back.xattrs == [("user.a", b"\0\xff"), ("security.x", b"")]


def test_empty_xattrs_are_a_fresh_list() -> None:
    row = E("a", T.FILE).to_list()
    one, two = LayerEntry.from_list(row), LayerEntry.from_list(row)
    one.xattrs.append(("user.a", b"1"))
    assert two.xattrs == [] and row[10] == []


@pytest.mark.parametrize("value", ["z", "", None, ["f"]])
def test_unknown_type_is_a_value_error_naming_it(value: object) -> None:
    row = E("a", T.FILE).to_list()
    row[1] = value
    with pytest.raises(ValueError, match="is not a valid EntryType"):
        LayerEntry.from_list(row)
