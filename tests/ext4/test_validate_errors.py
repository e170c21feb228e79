"""`validate_entries` on lists that mix plain entries with odd ones: the odd entries get every
check, and a bad one is named (the first one, by index and path) before anything is written."""

from __future__ import annotations

import pytest

from obdconv.entries import EntryType, LayerEntry
from obdconv.errors import ObdconvError
from obdconv.ext4.validate import validate_entries

E, T = LayerEntry, EntryType


def test_odd_entries_among_plain_ones_get_every_check() -> None:
    good = [E("usr", T.DIR), E("usr/bin", T.DIR), E("usr/bin/ls", T.FILE, size=5, uid=7, mode=0o755)]
    validate_entries(good)
    odd = [*good, E(".", T.DIR), E("usr/l", T.SYMLINK, link_target="ls"), E("usr/é", T.FILE),
           E("usr/x", T.FILE, xattrs=[("user.a", b"1")]), E("usr/" + "n/" * 200 + "f", T.FILE)]
    validate_entries(odd)  # all of them fine
    with pytest.raises(ObdconvError, match=r"entry 8 .*longer than 255 bytes"):
        validate_entries([*odd, E("b" * 256, T.FILE), E("c" * 256, T.FILE)])


@pytest.mark.parametrize("bad, needle", [
    (E("a//b", T.FILE), "not clean"), (E("/abs", T.DIR), "relative"), (E("a/..", T.FILE), "not clean"),
    (E("a\0b", T.FILE), "without NUL"), (E("u", T.FILE, uid=1 << 32), "uid/gid"), (E("m", T.DIR, mode=0o10000), "mode"),
    (E("s", T.FILE, size=-1), "negative size"), (E("", T.FILE), "non-empty"),
])
def test_failures_name_the_first_bad_entry(bad: LayerEntry, needle: str) -> None:
    entry_list = [E(f"f{i}", T.FILE) for i in range(50)]
    entry_list.insert(20, bad)
    entry_list.insert(30, E("z/./z", T.FILE))  # a second bad entry after it: not the one named
    with pytest.raises(ObdconvError) as err:
        validate_entries(entry_list)
    assert needle in str(err.value) and str(err.value).startswith(f"entry 20 {bad.path!r}")


def test_fields_of_unexpected_types() -> None:
    entry_list = [E("a", T.FILE), E("b", "f")]  # type: ignore[arg-type]  # a type that is no EntryType
    with pytest.raises(ObdconvError, match="unsupported entry type"):
        validate_entries(entry_list)
    with pytest.raises(TypeError):  # a path that is no str
        validate_entries([E(b"bytes", T.FILE)])  # type: ignore[arg-type]
