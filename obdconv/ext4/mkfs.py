"""mkfs: create the layer-0 ext4 filesystem on a sparse metadata image with `mke2fs`, deterministically.

Choices (see /work/shared/spec/libext2fs-notes.md §1):
- 4 KiB blocks, 256-byte inodes, one inode per 16 KiB, no journal, no resize_inode, no orphan_file
  (a private MKE2FS_CONFIG pins the defaults, and `-O none,...` lists every feature explicitly).
- uninit_bg with lazy_itable_init=1: opening/closing a 64 GiB filesystem touches only ~160 blocks
  (inode tables are never zero-filled). uninit_bg rather than metadata_csum: mounts on any kernel
  >= 4.19 either way, but metadata_csum makes every inode and directory block write checksum and
  adds a tail to directory blocks that our fast directory-append path would have to maintain.
- assume_storage_prezeroed=1: marks every group ITABLE_ZEROED without writing the inode tables.
  True on our devices (unwritten LSMT ranges and the sparse metadata image read as zeros), and it
  stops the kernel's ext4lazyinit thread from zero-filling ~1 GiB of inode tables (64 GiB fs) into
  the container's writable layer after a read-write mount.
- `-m 0`: the reference reserves 5 %, but this filesystem is an image's root filesystem; reserving
  blocks for root only hides space from unprivileged containers. It changes no file's content.
- fixed UUID (caller derives it from layer 0's chain id), hash seed derived from it, root 0:0,
  E2FSPROGS_FAKE_TIME fixed: two runs give byte-identical images.
- lost+found: mke2fs creates it without the index flag (the reference's defect is in its own mkfs).
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import tempfile
import uuid
from pathlib import Path

from obdconv.errors import BadInputError, ObdconvError

BLOCK_SIZE = 4096
INODE_SIZE = 256
INODE_RATIO = 16384
# The clock every write is stamped with (s_mkfs_time, s_wtime, root and lost+found times).
# Non-zero because libext2fs treats 0 as "use the real time".
FAKE_TIME = 1
FEATURES = (
    "none,ext_attr,dir_index,filetype,sparse_super,large_file,huge_file,dir_nlink,extra_isize,"
    "extent,64bit,flex_bg,uninit_bg"
)
# Only what is needed for mke2fs to not fall back to its built-in defaults or warn.
MKE2FS_CONF = """[defaults]
\tbase_features = none
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
\treserved_ratio = 0
\tlazy_itable_init = 1
\tlazy_journal_init = 1

[fs_types]
\text4 = {
\t\tfeatures = none
\t}
"""
MIN_VSIZE = 16 << 20


def hash_seed_for(fs_uuid: uuid.UUID) -> uuid.UUID:
    """The directory-hash seed: derived from the filesystem UUID so that it is fixed too."""
    return uuid.UUID(bytes=hashlib.sha256(b"obdconv ext4 hash seed\0" + fs_uuid.bytes).digest()[:16])


def mkfs_command(image_path: Path, fs_uuid: uuid.UUID) -> list[str]:
    return [
        "mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK_SIZE), "-I", str(INODE_SIZE),
        "-i", str(INODE_RATIO), "-m", "0", "-O", FEATURES, "-U", str(fs_uuid), "-L", "",
        "-E", f"hash_seed={hash_seed_for(fs_uuid)},lazy_itable_init=1,assume_storage_prezeroed=1,"
        "nodiscard,root_owner=0:0",
        str(image_path),
    ]


def mkfs(image_path: Path, vsize_bytes: int, fs_uuid: uuid.UUID) -> None:
    """Create a sparse `vsize_bytes` file at `image_path` holding a fresh ext4 filesystem."""
    if vsize_bytes < MIN_VSIZE or vsize_bytes % BLOCK_SIZE:
        raise BadInputError(f"vsize {vsize_bytes} must be a multiple of 4096 and at least {MIN_VSIZE}")
    with open(image_path, "wb") as f:
        f.truncate(vsize_bytes)
    with tempfile.NamedTemporaryFile("w", prefix="obdconv-mke2fs-", suffix=".conf") as conf:
        conf.write(MKE2FS_CONF)
        conf.flush()
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "MKE2FS_CONFIG": conf.name,
            "E2FSPROGS_FAKE_TIME": str(FAKE_TIME),
            "MKE2FS_SYNC": "0",
            "LC_ALL": "C",
        }
        proc = subprocess.run(mkfs_command(image_path, fs_uuid), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        if "short write" in detail:  # how mke2fs reports a full disk: say so, and where
            raise OSError(errno.ENOSPC, f"No space left on device (mke2fs: {detail})", str(image_path.parent))
        raise ObdconvError(f"mke2fs failed ({proc.returncode}): {detail}")


def data_blocks(image_path: Path, block_size: int = BLOCK_SIZE) -> list[int]:
    """Block numbers of the file's allocated (non-hole) ranges, via SEEK_DATA/SEEK_HOLE."""
    blocks: list[int] = []
    fd = os.open(image_path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no more data
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            blocks.extend(range(start // block_size, (stop + block_size - 1) // block_size))
            pos = stop
    finally:
        os.close(fd)
    return blocks
