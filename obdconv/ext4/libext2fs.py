"""ctypes binding to the system libext2fs (e2fsprogs 1.47.x): only the calls the ext4 engine uses.

Why ctypes: the library is the distribution's `libext2fs.so.2` (Debian `libext2fs2`), so a ctypes
binding needs no compiler or build step on a fresh worker (cffi in API mode would have to compile
against the -dev headers at install time). The price is that struct layouts and constants are
copied from the headers by hand; they are checked here at import (offsets documented in
/usr/include/ext2fs/ext2_fs.h and ext2fs.h) and against the real headers by a test that compiles
`offsetof` probes with the C compiler.

Write capture uses libext2fs's own `test_io_manager` (a pass-through io manager over unix_io with
callbacks after every block write), so no io_manager struct has to be defined in Python.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char_p,
    c_int,
    c_long,
    c_uint,
    c_uint16,
    c_uint32,
    c_uint64,
    c_ulong,
    c_ulonglong,
    c_void_p,
    sizeof,
)

from obdconv.errors import ObdconvError

# --- constants (ext2fs.h, ext2_fs.h, ext2_err.h of e2fsprogs 1.47.0) ---
EXT2_FLAG_RW = 0x01
EXT2_FLAG_DIRTY = 0x04
EXT2_FLAG_64BITS = 0x20000
EXT2_FLAG_SKIP_MMP = 0x100000
EXT2_ROOT_INO = 2
EXT2_GOOD_OLD_INODE_SIZE = 128
EXT2_INODE_SIZE = 256  # what mkfs uses (-I 256); ext2_inode_large is padded to this

EXT4_EXTENTS_FL = 0x00080000
EXT2_INDEX_FL = 0x00001000
EXT4_INLINE_DATA_FL = 0x10000000
EXT3_EXT_MAGIC = 0xF30A

EXT2_FT_UNKNOWN = 0
EXT2_FT_REG_FILE = 1
EXT2_FT_DIR = 2
EXT2_FT_CHRDEV = 3
EXT2_FT_BLKDEV = 4
EXT2_FT_FIFO = 5
EXT2_FT_SOCK = 6
EXT2_FT_SYMLINK = 7

LINUX_S_IFMT = 0o170000
LINUX_S_IFREG = 0o100000
LINUX_S_IFDIR = 0o040000
LINUX_S_IFLNK = 0o120000
LINUX_S_IFCHR = 0o020000
LINUX_S_IFBLK = 0o060000
LINUX_S_IFIFO = 0o010000
LINUX_S_IFSOCK = 0o140000

EXT2_FALLOCATE_FORCE_INIT = 0x2

EXT2_EXTENT_ROOT = 0x0001
EXT2_EXTENT_NEXT = 0x0009  # every node in order (index nodes too; we keep the leaves)
EXT2_EXTENT_FLAGS_LEAF = 0x0001
EXT2_EXTENT_FLAGS_UNINIT = 0x0002

DIRENT_FLAG_INCLUDE_EMPTY = 1
DIRENT_ABORT = 2

EXT2_FILE_WRITE = 0x0001

# ext2_err.h (base 2133571328)
EXT2_ET_DIR_NO_SPACE = 2133571366
EXT2_ET_EXTENT_NO_NEXT = 2133571452
EXT2_ET_EA_NO_SPACE = 2133571491
EXT2_ET_FILE_NOT_FOUND = 2133571404

errcode_t = c_long
ext2_ino_t = c_uint32
blk64_t = c_ulonglong


class Ext2InodeLarge(Structure):
    """`struct ext2_inode_large` (ext2_fs.h), padded to the 256-byte on-disk inode size.

    The Linux `osd1`/`osd2` unions are flattened to their linux members.
    """

    _pack_ = 1
    _fields_ = [
        ("i_mode", c_uint16),
        ("i_uid", c_uint16),
        ("i_size", c_uint32),
        ("i_atime", c_uint32),
        ("i_ctime", c_uint32),
        ("i_mtime", c_uint32),
        ("i_dtime", c_uint32),
        ("i_gid", c_uint16),
        ("i_links_count", c_uint16),
        ("i_blocks", c_uint32),
        ("i_flags", c_uint32),
        ("l_i_version", c_uint32),
        ("i_block", c_uint32 * 15),
        ("i_generation", c_uint32),
        ("i_file_acl", c_uint32),
        ("i_size_high", c_uint32),
        ("i_faddr", c_uint32),
        ("l_i_blocks_hi", c_uint16),
        ("l_i_file_acl_high", c_uint16),
        ("l_i_uid_high", c_uint16),
        ("l_i_gid_high", c_uint16),
        ("l_i_checksum_lo", c_uint16),
        ("l_i_reserved", c_uint16),
        ("i_extra_isize", c_uint16),
        ("i_checksum_hi", c_uint16),
        ("i_ctime_extra", c_uint32),
        ("i_mtime_extra", c_uint32),
        ("i_atime_extra", c_uint32),
        ("i_crtime", c_uint32),
        ("i_crtime_extra", c_uint32),
        ("i_version_hi", c_uint32),
        ("i_projid", c_uint32),
        ("_pad", ctypes.c_uint8 * (EXT2_INODE_SIZE - 0xA0)),
    ]


# The extra fields we fill in after the 128-byte base inode (i_extra_isize counts them).
EXT2_INODE_EXTRA_ISIZE = 0xA0 - EXT2_GOOD_OLD_INODE_SIZE


class Ext2fsExtent(Structure):
    """`struct ext2fs_extent` (ext2fs.h)."""

    _fields_ = [("e_pblk", blk64_t), ("e_lblk", blk64_t), ("e_len", c_uint32), ("e_flags", c_uint32)]


class Ext2Filsys(Structure):
    """Leading fields of `struct struct_ext2_filsys` (ext2fs.h): only what we read."""

    _fields_ = [
        ("magic", errcode_t),
        ("io", c_void_p),
        ("flags", c_int),
        ("device_name", c_char_p),
        ("super", c_void_p),
        ("blocksize", c_uint),
        ("fragsize", c_int),
        ("group_desc_count", c_uint32),
        ("desc_blocks", c_ulong),
        ("group_desc", c_void_p),
        ("inode_blocks_per_group", c_uint),
        ("inode_map", c_void_p),
        ("block_map", c_void_p),
        ("get_blocks", c_void_p),
        ("check_directory", c_void_p),
        ("write_bitmaps", c_void_p),
        ("read_inode", c_void_p),
        ("write_inode", c_void_p),
        ("badblocks", c_void_p),
        ("dblist", c_void_p),
        ("stride", c_uint32),
        ("orig_super", c_void_p),
        ("image_header", c_void_p),
        ("umask", c_uint32),
        ("now", c_long),  # time_t: the clock libext2fs stamps (s_wtime, new inodes) when non-zero
    ]


class Ext2DirEntry(Structure):
    """`struct ext2_dir_entry` header (ext2_fs.h); name_len's low byte is the length, high byte the type."""

    _fields_ = [("inode", c_uint32), ("rec_len", c_uint16), ("name_len", c_uint16)]


# Offsets copied from the comments in ext2_fs.h; a mismatch means the struct above is wrong.
assert Ext2InodeLarge.i_block.offset == 0x28
assert Ext2InodeLarge.i_generation.offset == 0x64
assert Ext2InodeLarge.i_faddr.offset == 0x70
assert Ext2InodeLarge.l_i_uid_high.offset == 0x78
assert Ext2InodeLarge.i_extra_isize.offset == 0x80
assert Ext2InodeLarge.i_crtime.offset == 0x90
assert Ext2InodeLarge.i_projid.offset == 0x9C
assert sizeof(Ext2InodeLarge) == EXT2_INODE_SIZE
assert sizeof(Ext2fsExtent) == 24
assert Ext2Filsys.super.offset == 32 and Ext2Filsys.blocksize.offset == 40
assert Ext2Filsys.now.offset == 184

# Superblock field offsets (struct ext2_super_block, ext2_fs.h).
SUPERBLOCK_OFFSET = 1024  # bytes into the device
SB_INODES_COUNT = 0x00
SB_BLOCKS_COUNT_LO = 0x04
SB_FREE_INODES_COUNT = 0x10
SB_FIRST_DATA_BLOCK = 0x14
SB_LOG_BLOCK_SIZE = 0x18
SB_INODES_PER_GROUP = 0x28
SB_MAGIC = 0x38
SB_FIRST_INO = 0x54
SB_INODE_SIZE = 0x58
SB_FEATURE_COMPAT = 0x5C
SB_FEATURE_INCOMPAT = 0x60
SB_FEATURE_RO_COMPAT = 0x64
SB_JOURNAL_INUM = 0xE0
SB_DESC_SIZE = 0xFE
SB_BLOCKS_COUNT_HI = 0x150
SB_KBYTES_WRITTEN = 0x178  # __u64 s_kbytes_written; 0 = "not tracked"
EXT2_SUPER_MAGIC = 0xEF53
EXT4_FEATURE_INCOMPAT_META_BG = 0x0010
EXT3_FEATURE_COMPAT_HAS_JOURNAL = 0x0004
EXT4_FEATURE_INCOMPAT_64BIT = 0x0080
EXT4_FEATURE_RO_COMPAT_GDT_CSUM = 0x0010
EXT4_FEATURE_RO_COMPAT_METADATA_CSUM = 0x0400

# Group descriptor field offsets (struct ext4_group_desc; the _HI halves only in 64-byte ones).
BG_INODE_BITMAP_LO = 0x04
BG_INODE_TABLE_LO = 0x08
BG_FLAGS = 0x12
BG_ITABLE_UNUSED_LO = 0x1C
BG_INODE_BITMAP_HI = 0x24
BG_INODE_TABLE_HI = 0x28
BG_ITABLE_UNUSED_HI = 0x32
EXT4_BG_INODE_UNINIT = 0x0001

# Extent tree nodes (ext3_extents.h), as stored in i_block and in index/leaf blocks.
EXT_HEADER = struct.Struct("<HHHHI")  # ext3_extent_header: magic, entries, max, depth, generation
EXT_LEAF = struct.Struct("<IHHI")  # ext3_extent: ee_block, ee_len, ee_start_hi, ee_start_lo
EXT_INDEX = struct.Struct("<IIHH")  # ext3_extent_idx: ei_block, ei_leaf_lo, ei_leaf_hi, ei_unused
EXT_INIT_MAX_LEN = 1 << 15  # ee_len above this marks an uninitialised extent

DirIterateFunc = CFUNCTYPE(c_int, ext2_ino_t, c_int, POINTER(Ext2DirEntry), c_int, c_int, c_void_p, c_void_p)
XattrIterateFunc = CFUNCTYPE(c_int, c_void_p, c_void_p, ctypes.c_size_t, c_void_p)
WriteBlk64Callback = CFUNCTYPE(None, c_ulonglong, c_int, errcode_t)
WriteBlkCallback = CFUNCTYPE(None, c_ulong, c_int, errcode_t)
SetBlksizeCallback = CFUNCTYPE(None, c_int, errcode_t)


class Ext2fsError(ObdconvError):
    """A libext2fs call failed; `code` is the errcode_t."""

    def __init__(self, call: str, code: int, what: str = "") -> None:
        self.call = call
        self.code = code
        msg = f"{call} failed: {error_message(code)} ({code})"
        super().__init__(f"{what}: {msg}" if what else msg)


def _load() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    name = ctypes.util.find_library("ext2fs") or "libext2fs.so.2"
    try:
        lib = ctypes.CDLL(name)
        com_err = ctypes.CDLL(ctypes.util.find_library("com_err") or "libcom_err.so.2")
    except OSError as exc:  # pragma: no cover - depends on the host
        raise ObdconvError(f"libext2fs not found ({exc}); install Debian package libext2fs2") from exc
    return lib, com_err


lib, com_err = _load()
com_err.error_message.restype = c_char_p
com_err.error_message.argtypes = [c_long]
lib.initialize_ext2_error_table()


def error_message(code: int) -> str:
    return (com_err.error_message(code) or b"?").decode(errors="replace")


def _fn(name: str, argtypes: list, restype: object = errcode_t) -> None:
    f = getattr(lib, name)
    f.argtypes = argtypes
    f.restype = restype


P = c_void_p  # opaque handles (ext2_filsys, xattr handle, extent handle, file)
_fn("ext2fs_open2", [c_char_p, c_char_p, c_int, c_int, c_uint, P, POINTER(P)])
_fn("ext2fs_close2", [P, c_int])
_fn("ext2fs_free", [P], None)
_fn("ext2fs_flush2", [P, c_int])
_fn("ext2fs_write_bitmaps", [P])
_fn("io_channel_set_options", [P, c_char_p])
_fn("ext2fs_read_bitmaps", [P])
_fn("ext2fs_read_block_bitmap", [P])
_fn("ext2fs_find_first_set_block_bitmap2", [P, blk64_t, blk64_t, POINTER(blk64_t)])
_fn("ext2fs_find_first_zero_block_bitmap2", [P, blk64_t, blk64_t, POINTER(blk64_t)])
_fn("ext2fs_new_inode", [P, ext2_ino_t, c_int, P, POINTER(ext2_ino_t)])
_fn("ext2fs_inode_alloc_stats2", [P, ext2_ino_t, c_int, c_int], None)
_fn("ext2fs_read_inode_full", [P, ext2_ino_t, POINTER(Ext2InodeLarge), c_int])
_fn("ext2fs_write_inode_full", [P, ext2_ino_t, POINTER(Ext2InodeLarge), c_int])
_fn("ext2fs_fallocate", [P, c_int, ext2_ino_t, POINTER(Ext2InodeLarge), blk64_t, blk64_t, blk64_t])
_fn("ext2fs_extent_open2", [P, ext2_ino_t, POINTER(Ext2InodeLarge), POINTER(P)])
_fn("ext2fs_extent_get", [P, c_int, POINTER(Ext2fsExtent)])
_fn("ext2fs_extent_free", [P], None)
_fn("ext2fs_mkdir", [P, ext2_ino_t, ext2_ino_t, c_char_p])
_fn("ext2fs_symlink", [P, ext2_ino_t, ext2_ino_t, c_char_p, c_char_p])
_fn("ext2fs_link", [P, ext2_ino_t, c_char_p, ext2_ino_t, c_int])
_fn("ext2fs_unlink", [P, ext2_ino_t, c_char_p, ext2_ino_t, c_int])
_fn("ext2fs_expand_dir", [P, ext2_ino_t])
_fn("ext2fs_bmap2", [P, ext2_ino_t, POINTER(Ext2InodeLarge), c_char_p, c_int, blk64_t, POINTER(c_int), POINTER(blk64_t)])
_fn("ext2fs_read_dir_block4", [P, blk64_t, c_void_p, c_int, ext2_ino_t])
_fn("ext2fs_write_dir_block4", [P, blk64_t, c_void_p, c_int, ext2_ino_t])
_fn("ext2fs_dir_iterate2", [P, ext2_ino_t, c_int, c_char_p, DirIterateFunc, c_void_p])
_fn("ext2fs_punch", [P, ext2_ino_t, POINTER(Ext2InodeLarge), c_char_p, blk64_t, blk64_t])
_fn("ext2fs_free_ext_attr", [P, ext2_ino_t, POINTER(Ext2InodeLarge)])
_fn("ext2fs_xattrs_open", [P, ext2_ino_t, POINTER(P)])
_fn("ext2fs_xattrs_read", [P])
_fn("ext2fs_xattrs_close", [POINTER(P)])
_fn("ext2fs_xattr_set", [P, c_char_p, c_char_p, ctypes.c_size_t])
_fn("ext2fs_xattr_remove", [P, c_char_p])
_fn("ext2fs_xattrs_iterate", [P, XattrIterateFunc, c_void_p])
_fn("ext2fs_xattr_get", [P, c_char_p, POINTER(c_void_p), POINTER(ctypes.c_size_t)])
# ext2fs_free_mem is an inline wrapper around free(); buffers from ext2fs_xattr_get go back to libc.
libc = ctypes.CDLL(None)
libc.free.argtypes = [c_void_p]
libc.free.restype = None
_fn("ext2fs_file_open2", [P, ext2_ino_t, POINTER(Ext2InodeLarge), c_int, POINTER(P)])
_fn("ext2fs_file_read", [P, c_void_p, c_uint, POINTER(c_uint)])
_fn("ext2fs_file_close", [P])
_fn("ext2fs_blocks_count", [P], c_uint64)
_fn("ext2fs_free_blocks_count", [P], c_uint64)
_fn("ext2fs_is_fast_symlink", [POINTER(Ext2InodeLarge)], c_int)
_fn("ext2fs_inode_has_valid_blocks2", [P, POINTER(Ext2InodeLarge)], c_int)


def check(rc: int, call: str, what: str = "") -> None:
    """Raise `Ext2fsError` for a non-zero errcode_t."""
    if rc:
        raise Ext2fsError(call, rc, what)


def manager(name: str) -> int:
    """Address of an exported `io_manager` (e.g. "unix_io_manager", "test_io_manager")."""
    return c_void_p.in_dll(lib, name).value or 0


def filsys(fs: int) -> Ext2Filsys:
    return Ext2Filsys.from_address(fs)


def super_u32(fs: int, offset: int) -> int:
    return c_uint32.from_address(filsys(fs).super + offset).value


def set_super_u64(fs: int, offset: int, value: int) -> None:
    ctypes.c_uint64.from_address(filsys(fs).super + offset).value = value


def open_fs(path: str, *, rw: bool, io_manager: str = "unix_io_manager") -> int:
    """ext2fs_open2 + read_bitmaps (bitmaps only when writing); returns the ext2_filsys handle."""
    fs = P()
    flags = EXT2_FLAG_64BITS | EXT2_FLAG_SKIP_MMP | (EXT2_FLAG_RW if rw else 0)
    check(lib.ext2fs_open2(path.encode(), None, flags, 0, 0, manager(io_manager), ctypes.byref(fs)),
          "ext2fs_open2", path)
    assert fs.value
    if rw:
        rc = lib.ext2fs_read_bitmaps(fs.value)
        if rc:
            lib.ext2fs_free(fs.value)
            check(rc, "ext2fs_read_bitmaps", path)
    return fs.value


def iterate_dir(fs: int, dir_ino: int) -> list[tuple[bytes, int, int]]:
    """(name, inode, file type) of every live entry of a directory, except "." and "..", in disk order."""
    out: list[tuple[bytes, int, int]] = []
    append = out.append
    string_at = ctypes.string_at
    addressof = ctypes.addressof

    def on_entry(_dir: int, _entry: int, dirent: object, _offset: int, _bs: int, _buf: int, _priv: int) -> int:
        d = dirent.contents  # type: ignore[attr-defined]
        ino = d.inode
        if ino:
            name_len = d.name_len & 0xFF
            name = string_at(addressof(d) + 8, name_len)
            if name != b"." and name != b"..":
                append((name, ino, d.name_len >> 8))
        return 0

    cb = DirIterateFunc(on_entry)
    check(lib.ext2fs_dir_iterate2(fs, dir_ino, 0, None, cb, None), "ext2fs_dir_iterate2", f"inode {dir_ino}")
    return out
