"""What a faithful conversion is: the ONE list of deliberate differences between a source image's
filesystem (its layers applied in order) and the ext4 filesystem obdconv writes.

The converter imports the rules to decide (the tar scan skips sockets, the ext4 engine drops
xattrs and clamps times), and `obdconv verify` imports the same rules to expect exactly those
differences and to report each one as a documented difference, never as a failure. A difference
not listed here is a defect of the conversion.

Each `Rule` says what differs and why. `Difference` is one occurrence (rule, layer, path, detail);
`summarize` groups occurrences for a report.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Rule:
    key: str
    what: str
    reason: str


SOCKET_SKIPPED = Rule(
    "socket-skipped", "sockets in a layer are not written",
    "a socket is the endpoint of a running process: one from an image serves nothing, a program "
    "binds its own (docs/ARCHITECTURE.md Decisions; a warning is logged at conversion)")
XATTR_NAMESPACE_DROPPED = Rule(
    "xattr-namespace-dropped", "xattrs outside user., trusted., security. and the POSIX ACLs are not written",
    "ext4 stores only these (gnu.*, other system.* names and unknown namespaces are refused with "
    "ENOTSUP); the reference untar skips refused names the same way")
XATTR_USER_ON_SPECIAL = Rule(
    "user-xattr-on-special-file", "user.* xattrs on anything but regular files and directories are not written",
    "the kernel refuses user.* xattrs on symlinks, devices and FIFOs (EPERM); the reference skips them")
MTIME_CLAMPED = Rule(
    "mtime-clamped", "times outside ext4's range are clamped to its nearest end",
    "ext4 stores seconds in 34 bits (1901-12-13T20:45:52Z .. 2446-05-10T22:38:55Z); the kernel "
    "clamps the same way (a warning is logged at conversion, once per layer)")
LOST_FOUND_ADDED = Rule(
    "lost-found-added", "/lost+found exists although the source has none",
    "mkfs creates /lost+found in layer 0; e2fsck and the kernel expect it in every ext4 filesystem")

RULES: tuple[Rule, ...] = (SOCKET_SKIPPED, XATTR_NAMESPACE_DROPPED, XATTR_USER_ON_SPECIAL, MTIME_CLAMPED,
                           LOST_FOUND_ADDED)

LOST_FOUND = "lost+found"

# --- xattrs ---------------------------------------------------------------------------------------

XATTR_PREFIXES = ("user.", "trusted.", "security.")
XATTR_SYSTEM_NAMES = ("system.posix_acl_access", "system.posix_acl_default")


def xattr_supported(name: str) -> bool:
    """An xattr name ext4 stores from a tar (on some inode)."""
    return name.startswith(XATTR_PREFIXES) or name in XATTR_SYSTEM_NAMES


def xattr_dropped_by(name: str, file_or_dir: bool) -> Rule | None:
    """The rule that keeps xattr `name` out of an inode (`file_or_dir`: a regular file or a
    directory), or None when it is written."""
    if not xattr_supported(name):
        return XATTR_NAMESPACE_DROPPED
    if not file_or_dir and name.startswith("user."):
        return XATTR_USER_ON_SPECIAL
    return None


# --- sockets --------------------------------------------------------------------------------------


def is_socket(mode_field: int) -> bool:
    """A regular-typed tar member whose mode field carries S_IFSOCK: skipped. Plain integer
    arithmetic: a tar's mode field can be any (base-256: negative or huge) number, which
    `stat.S_IFMT` refuses with OverflowError (found by tests/fuzz)."""
    return mode_field & _S_IFMT == stat.S_IFSOCK


_S_IFMT = 0o170000


# --- times ----------------------------------------------------------------------------------------

NS = 1_000_000_000
# ext4 seconds: a signed 32-bit low word plus 2 epoch bits in the extra field.
MIN_SECONDS = -(1 << 31)
MAX_SECONDS = (1 << 34) - (1 << 31) - 1
MIN_TIME_NS = MIN_SECONDS * NS
MAX_TIME_NS = MAX_SECONDS * NS + NS - 1


def clamp_time_ns(ns: int) -> int:
    """The time ext4 stores for `ns` nanoseconds since the epoch."""
    if ns < MIN_TIME_NS:
        return MIN_TIME_NS
    if ns > MAX_TIME_NS:
        return MAX_TIME_NS
    return ns


class _Timed(Protocol):
    path: str
    mtime_ns: int


def out_of_range_times(entries: Iterable[_Timed]) -> tuple[int, str]:
    """(how many entries have a time ext4 must clamp, the path of the first) for a layer's warning."""
    count, first = 0, ""
    lo, hi = MIN_TIME_NS, MAX_TIME_NS
    for e in entries:
        if not lo <= e.mtime_ns <= hi:
            if not count:
                first = e.path
            count += 1
    return count, first


# --- occurrences ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Difference:
    """One documented difference: `rule` applied to `path` (of source layer `layer`; -1: none)."""
    rule: Rule
    path: str
    detail: str = ""
    layer: int = -1

    def __str__(self) -> str:
        where = f"layer {self.layer}: " if self.layer >= 0 else ""
        return f"{where}{self.path}" + (f" ({self.detail})" if self.detail else "")


@dataclass(slots=True)
class DifferenceGroup:
    """All occurrences of one rule, for a report: count and the first few, with the reason."""
    rule: str
    what: str
    reason: str
    count: int
    examples: list[str] = field(default_factory=list)


def summarize(differences: Sequence[Difference], examples: int = 5) -> list[DifferenceGroup]:
    """Occurrences grouped by rule, in `RULES` order."""
    groups: dict[str, DifferenceGroup] = {}
    for d in differences:
        g = groups.get(d.rule.key)
        if g is None:
            g = groups[d.rule.key] = DifferenceGroup(d.rule.key, d.rule.what, d.rule.reason, 0)
        g.count += 1
        if len(g.examples) < examples:
            g.examples.append(str(d))
    return [groups[r.key] for r in RULES if r.key in groups]
