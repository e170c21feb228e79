"""Encoding and decoding of inode fields: times with extra bits, 32-bit owners, device numbers."""

from __future__ import annotations

from obdconv.ext4.libext2fs import Ext2InodeLarge
from obdconv.faithful import MAX_SECONDS, MIN_SECONDS, NS  # ext4's time range: a documented difference

EXTRA_TIME_MIN_ISIZE = 0x8C - 0x80  # i_extra_isize that covers i_mtime_extra


def encode_time(mtime_ns: int) -> tuple[int, int]:
    """(low 32 bits, extra word) for a time in ns; clamped to ext4's range like the kernel does."""
    sec, nsec = divmod(mtime_ns, NS)
    if sec < MIN_SECONDS:
        sec, nsec = MIN_SECONDS, 0
    elif sec > MAX_SECONDS:
        sec, nsec = MAX_SECONDS, NS - 1
    lo = sec & 0xFFFFFFFF
    lo_signed = lo - (1 << 32) if lo & 0x80000000 else lo
    epoch = ((sec - lo_signed) >> 32) & 3
    return lo, (nsec << 2) | epoch


def decode_time(lo: int, extra: int | None) -> int:
    sec = lo - (1 << 32) if lo & 0x80000000 else lo
    if extra is None:
        return sec * NS
    return (sec + ((extra & 3) << 32)) * NS + (extra >> 2)


def set_times(inode: Ext2InodeLarge, mtime_ns: int) -> None:
    """atime = ctime = mtime = crtime = the entry's mtime (tar carries only one time we honour)."""
    lo, extra = encode_time(mtime_ns)
    inode.i_atime = inode.i_ctime = inode.i_mtime = inode.i_crtime = lo
    inode.i_atime_extra = inode.i_ctime_extra = inode.i_mtime_extra = inode.i_crtime_extra = extra


def mtime_ns_of(inode: Ext2InodeLarge) -> int:
    extra = inode.i_mtime_extra if inode.i_extra_isize >= EXTRA_TIME_MIN_ISIZE else None
    return decode_time(inode.i_mtime, extra)


def set_owner(inode: Ext2InodeLarge, uid: int, gid: int) -> None:
    inode.i_uid, inode.l_i_uid_high = uid & 0xFFFF, uid >> 16
    inode.i_gid, inode.l_i_gid_high = gid & 0xFFFF, gid >> 16


def owner_of(inode: Ext2InodeLarge) -> tuple[int, int]:
    return inode.i_uid | (inode.l_i_uid_high << 16), inode.i_gid | (inode.l_i_gid_high << 16)


def set_rdev(inode: Ext2InodeLarge, major: int, minor: int) -> None:
    """Old encoding in i_block[0] when both fit in a byte, else the new one in i_block[1] (as the kernel)."""
    if major < 256 and minor < 256:
        inode.i_block[0] = (major << 8) | minor
        inode.i_block[1] = 0
    else:
        inode.i_block[0] = 0
        inode.i_block[1] = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    inode.i_block[2] = 0


def rdev_of(inode: Ext2InodeLarge) -> tuple[int, int]:
    old = inode.i_block[0]
    if old:
        return (old >> 8) & 0xFF, old & 0xFF
    new = inode.i_block[1]
    return (new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00)


def set_size(inode: Ext2InodeLarge, size: int) -> None:
    inode.i_size, inode.i_size_high = size & 0xFFFFFFFF, size >> 32


def size_of(inode: Ext2InodeLarge) -> int:
    return inode.i_size | (inode.i_size_high << 32)
