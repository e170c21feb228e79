"""`validate_entries` checks whole lists at once (`_bulk_check`) and falls back to the per-entry
loop (`_validate_each`, the reference): for any entry list both must accept the same lists and
reject the same ones with the same error (class and message, naming the same first bad entry)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obdconv.entries import EntryType, LayerEntry
from obdconv.errors import ObdconvError
from obdconv.ext4.validate import MAX_NAME, _bulk_check, _validate_each, validate_entries

E, T = LayerEntry, EntryType

# Path pieces chosen to hit every check: bad components, absolute paths, NUL, non-ASCII (a
# name's byte length), long names (limit and one past it, in ASCII and in 2-byte UTF-8).
_COMPONENTS = st.sampled_from([
    "a", "usr", "lib", ".", "..", "", "...", ".hidden", "x\0y", "é", "名前", "a" * MAX_NAME,
    "a" * (MAX_NAME + 1), "é" * 127, "é" * 128, "\udcff",
])
_PATHS = st.one_of(
    st.lists(_COMPONENTS, min_size=1, max_size=4).map("/".join),
    st.sampled_from([".", "", "/", "/etc", "a/", "a//b", "./a", "a/./b", "a/.."]),
)
_TYPES = st.sampled_from(list(EntryType))
_INTS = st.sampled_from([0, 1, 1000, 0o7777, 0o10000, (1 << 32) - 1, 1 << 32, -1])


@st.composite
def entries(draw: st.DrawFn) -> LayerEntry:
    xattrs = draw(st.sampled_from([[], [], [], [("user.a", b"v")], [("user." + "n" * 300, b"")],
                                   [("user.big", b"x" * 5000)], [("other.ns", b"v")]]))
    return E(draw(_PATHS), draw(_TYPES), mode=draw(_INTS), uid=draw(_INTS), gid=draw(_INTS),
             size=draw(st.sampled_from([0, 10, -1])), link_target=draw(st.sampled_from(["", "t", "a/b", "/abs", "x\0"])),
             devmajor=draw(st.sampled_from([0, 1 << 12])), devminor=draw(st.sampled_from([0, 1 << 20])),
             xattrs=xattrs)


def outcome(check, entry_list: list[LayerEntry]) -> tuple[type, str] | None:  # type: ignore[no-untyped-def]
    try:
        check(entry_list)
    except ObdconvError as exc:
        return type(exc), str(exc)
    return None


# Lists mostly of good plain files and directories (the common case the bulk check takes),
# with a few arbitrary entries mixed in.
_GOOD = st.builds(lambda p, t: E(p, t, mode=0o644, uid=1, gid=2, size=3),
                  st.lists(st.sampled_from(["usr", "lib", "bin", "a.b", "x-y"]), min_size=1, max_size=3).map("/".join),
                  st.sampled_from([T.FILE, T.DIR]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_GOOD, _GOOD, _GOOD, entries()), max_size=12))
def test_bulk_check_agrees_with_per_entry_checks(entry_list: list[LayerEntry]) -> None:
    assert outcome(validate_entries, entry_list) == outcome(_validate_each, entry_list)


def test_common_lists_take_the_bulk_path_and_route_only_the_odd_entries() -> None:
    good = [E("usr", T.DIR), E("usr/bin", T.DIR), E("usr/bin/ls", T.FILE, size=5, uid=7, mode=0o755)]
    assert _bulk_check(good) == []
    odd = [*good, E(".", T.DIR), E("usr/l", T.SYMLINK, link_target="ls"), E("usr/é", T.FILE),
           E("usr/x", T.FILE, xattrs=[("user.a", b"1")]), E("usr/" + "n/" * 200 + "f", T.FILE)]
    assert _bulk_check(odd) == [3, 4, 5, 6, 7]  # the 409-character path too: its names are checked one by one
    validate_entries(odd)  # all of them fine
    with pytest.raises(ObdconvError, match=r"entry 8 .*longer than 255 bytes"):
        validate_entries([*odd, E("b" * 256, T.FILE), E("c" * 256, T.FILE)])


@pytest.mark.parametrize("bad, needle", [
    (E("a//b", T.FILE), "not clean"), (E("/abs", T.DIR), "relative"), (E("a/..", T.FILE), "not clean"),
    (E("a\0b", T.FILE), "without NUL"), (E("u", T.FILE, uid=1 << 32), "uid/gid"), (E("m", T.DIR, mode=0o10000), "mode"),
    (E("s", T.FILE, size=-1), "negative size"), (E("", T.FILE), "non-empty"),
])
def test_bulk_failures_name_the_first_bad_entry(bad: LayerEntry, needle: str) -> None:
    entry_list = [E(f"f{i}", T.FILE) for i in range(50)]
    entry_list.insert(20, bad)
    entry_list.insert(30, E("z/./z", T.FILE))  # a second bad entry after it: not the one named
    assert _bulk_check(entry_list) is None
    with pytest.raises(ObdconvError) as err:
        validate_entries(entry_list)
    assert needle in str(err.value) and str(err.value).startswith(f"entry 20 {bad.path!r}")


def test_fields_of_unexpected_types_fall_back_to_the_per_entry_checks() -> None:
    entry_list = [E("a", T.FILE), E("b", "f")]  # type: ignore[arg-type]  # a type that is no EntryType
    assert outcome(validate_entries, entry_list) == outcome(_validate_each, entry_list)
    with pytest.raises(ObdconvError, match="unsupported entry type"):
        validate_entries(entry_list)
    with pytest.raises(TypeError):  # a path that is no str: as the per-entry loop always did
        validate_entries([E(b"bytes", T.FILE)])  # type: ignore[arg-type]
