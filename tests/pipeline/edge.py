"""A 4-layer image exercising the ext4 edge cases (built with tarfile; see test_e2e.py)."""

from __future__ import annotations

import random
import tarfile

from tests.pipeline.images import (
    Layer,
    Member,
    device,
    directory,
    fifo,
    file,
    hardlink,
    layer,
    opaque,
    symlink,
    whiteout,
)

PRE_1970 = -86400 * 400  # mtimes before the epoch
POST_2038 = (1 << 32) + 12345  # beyond the 32-bit epoch
LONG = "d" * 90 + "/" + "n" * 200  # > 100 chars: PAX path, 200-char name


def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def base() -> list[Member]:
    return [
        directory("bin"),
        file("bin/sh", _random(20000, 1), mode=0o755),
        symlink("bin/link", "sh"),
        symlink("abs", "/etc/passwd"),
        directory("etc"),
        file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        directory("usr"),
        directory("usr/bin"),
        file("usr/bin/su", b"setuid", mode=0o4755),
        file("usr/bin/sg", b"setgid", mode=0o2711),
        directory("tmp", mode=0o1777),
        directory("dev"),
        device("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666),
        device("dev/sda", tarfile.BLKTYPE, 8, 0, mode=0o660, gid=6),
        fifo("dev/fifo", mode=0o600),
        file("xattr.txt", b"x", xattrs={"user.test": "value", "user.other": "2"}),
        directory("xdir", xattrs={"user.dir": "d"}),
        file("old.txt", b"old", mtime=PRE_1970),
        file("future.txt", b"future", mtime=POST_2038),
        file("bigid.txt", b"id", uid=70000, gid=70001),
        directory(LONG.split("/")[0]),
        file(LONG, b"long name"),
        file("empty", b""),
        file("random.bin", _random(300 * 1024, 2)),
        file("zeros.bin", bytes((1 << 20) + 1)),
        file("lowerfile", b"shared inode"),
        directory("olddir"),
        file("olddir/gone", b"hidden by opaque"),
        directory("olddir/sub"),
        file("willbedir", b"file first"),
        directory("dirbecomesfile"),
        file("dirbecomesfile/x", b"x"),
    ]


def upper() -> list[Member]:
    return [
        whiteout("etc/passwd"),
        opaque("olddir"),
        file("olddir/new", b"new"),
        hardlink("hl_to_lower", "lowerfile"),
        directory("willbedir"),
        file("willbedir/child", b"child"),
        file("bin/sh", _random(9000, 3), mode=0o755),
        file("dirbecomesfile", b"now a file"),
        file("a", b"linked twice" * 100),
        hardlink("a_link", "a"),
        file("xattr.txt", b"y", xattrs={"user.test": "changed"}),
    ]


def top() -> list[Member]:
    return [
        whiteout("bin/link"),
        whiteout("tmp"),
        symlink("etc/passwd", "../abs"),
        file("tmp", b"tmp is a file now"),
        directory("n1/n2/n3"),
        file("n1/n2/n3/deep", b"deep"),
        # > 8 MiB: its extents need more than one index entry (16383-sector limit)
        file("big.bin", bytes(range(256)) * (9 * 4096) + b"tail"),
    ]


def edge_layers(kinds: tuple[str, str, str, str], docker: bool) -> list[Layer]:
    """Base, upper, top and an empty layer, compressed as `kinds`."""
    parts = [base(), upper(), top(), []]
    return [layer(m, kind, docker) for m, kind in zip(parts, kinds, strict=True)]
