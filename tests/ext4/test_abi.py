"""The ctypes structs of obdconv.ext4.libext2fs against the real libext2fs-dev headers (offsetof probes)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from obdconv.ext4 import libext2fs as L

PROBES = {
    "struct ext2_inode_large": (L.Ext2InodeLarge, [
        "i_mode", "i_uid", "i_size", "i_mtime", "i_links_count", "i_flags", "i_block", "i_file_acl",
        "i_size_high", "i_extra_isize", "i_ctime_extra", "i_mtime_extra", "i_crtime", "i_crtime_extra", "i_projid",
    ]),
    "struct ext2fs_extent": (L.Ext2fsExtent, ["e_pblk", "e_lblk", "e_len", "e_flags"]),
    "struct struct_ext2_filsys": (L.Ext2Filsys, ["super", "blocksize", "group_desc_count", "umask", "now"]),
}
# Linux members of the osd2 union, flattened in our struct.
OSD2 = {"l_i_uid_high": "osd2.linux2.l_i_uid_high", "l_i_gid_high": "osd2.linux2.l_i_gid_high",
        "l_i_file_acl_high": "osd2.linux2.l_i_file_acl_high"}


@pytest.mark.skipif(shutil.which("cc") is None or not Path("/usr/include/ext2fs/ext2fs.h").exists(),
                    reason="needs a C compiler and libext2fs-dev headers")
def test_struct_offsets_match_headers(tmp_path: Path) -> None:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <ext2fs/ext2fs.h>", "int main(void) {"]
    expected = []
    for ctype, (struct, names) in PROBES.items():
        for name in names:
            lines.append(f'printf("%zu\\n", offsetof({ctype}, {name}));')
            expected.append(getattr(struct, name).offset)
    for ours, theirs in OSD2.items():
        lines.append(f'printf("%zu\\n", offsetof(struct ext2_inode_large, {theirs}));')
        expected.append(getattr(L.Ext2InodeLarge, ours).offset)
    lines.append('printf("%zu\\n", sizeof(struct ext2fs_extent));')
    expected.append(24)
    lines.append("return 0; }")
    src = tmp_path / "probe.c"
    src.write_text("\n".join(lines))
    subprocess.run(["cc", "-o", str(tmp_path / "probe"), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "probe")], check=True, capture_output=True, text=True).stdout.split()
    assert [int(x) for x in out] == expected


def test_error_messages_come_from_com_err() -> None:
    assert "No free space in the directory" in L.error_message(L.EXT2_ET_DIR_NO_SPACE)
    assert "No 'next' extent" in L.error_message(L.EXT2_ET_EXTENT_NO_NEXT)


@pytest.mark.skipif(not Path("/usr/include/ext2fs/ext2_err.h").exists(), reason="needs libext2fs-dev headers")
def test_error_codes_match_header() -> None:
    header = Path("/usr/include/ext2fs/ext2_err.h").read_text()
    codes = {n: getattr(L, n) for n in dir(L) if n.startswith("EXT2_ET_")}
    assert len(codes) >= 4
    for name, value in codes.items():
        assert f"#define {name}" in header
        line = next(x for x in header.splitlines() if x.startswith(f"#define {name} "))
        assert int(line.split("(")[1].rstrip(")L")) == value, name


CONSTANTS = [
    "EXT2_FLAG_RW", "EXT2_FLAG_64BITS", "EXT2_FLAG_SKIP_MMP", "EXT2_EXTENT_ROOT", "EXT2_EXTENT_NEXT",
    "EXT2_EXTENT_FLAGS_LEAF", "EXT2_EXTENT_FLAGS_UNINIT", "DIRENT_FLAG_INCLUDE_EMPTY", "DIRENT_ABORT",
    "EXT2_FILE_WRITE", "EXT4_EXTENTS_FL", "EXT2_INDEX_FL", "EXT4_INLINE_DATA_FL", "EXT3_EXT_MAGIC",
    "EXT2_FALLOCATE_FORCE_INIT", "EXT2_ROOT_INO", "EXT2_FT_REG_FILE", "EXT2_FT_DIR", "EXT2_FT_CHRDEV",
    "EXT2_FT_BLKDEV", "EXT2_FT_FIFO", "EXT2_FT_SYMLINK", "EXT2_GOOD_OLD_INODE_SIZE",
]


@pytest.mark.skipif(shutil.which("cc") is None or not Path("/usr/include/ext2fs/ext2fs.h").exists(),
                    reason="needs a C compiler and libext2fs-dev headers")
def test_constants_match_headers(tmp_path: Path) -> None:
    lines = ["#include <stdio.h>", "#include <ext2fs/ext2fs.h>", "#include <ext2fs/ext3_extents.h>", "int main(void) {"]
    lines += [f'printf("%lld\\n", (long long)({name}));' for name in CONSTANTS]
    lines.append("return 0; }")
    src = tmp_path / "consts.c"
    src.write_text("\n".join(lines))
    subprocess.run(["cc", "-o", str(tmp_path / "consts"), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "consts")], check=True, capture_output=True, text=True).stdout.split()
    assert dict(zip(CONSTANTS, map(int, out), strict=True)) == {n: getattr(L, n) for n in CONSTANTS}
