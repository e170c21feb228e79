"""TurboOCI: the unused tail of a file's last 4 KiB block must read as zeros, even when that block
belonged to a lower-layer file that a later layer deleted (turboOCI-apply leaves the tail
unmapped, so the deleted file's bytes would show through)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from obdconv.pipeline.runner import RunnerOptions, convert
from obdconv.request import ConversionRequest
from tests.conftest import requires_root
from tests.pipeline.images import Layout, directory, file, layer, whiteout
from tests.pipeline.readback import check_tree, e2fsck, flatten, source_layer_paths, tag_digest

FS_BLOCK = 4096
STALE = 0xA5
LOWER_BLOCKS = 64  # the deleted file is big, so the allocator has its blocks to hand back
SHORT = b"short file\n" * 9  # 99 bytes: one sector of data, 7.8 sectors of tail


def file_blocks(image: Path, path: str) -> list[int]:
    """Physical blocks of `path` in the ext4 image, from debugfs (e2fsprogs, independent of obdconv)."""
    out = subprocess.run(["debugfs", "-R", f"blocks {path}", str(image)], capture_output=True, text=True,
                         check=True).stdout
    return [int(x) for x in out.split()]


@requires_root
def test_short_file_in_a_freed_block_has_a_zero_tail(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "src")
    lower = layer([directory("d"), file("d/stale.bin", bytes([STALE]) * (FS_BLOCK * LOWER_BLOCKS))])
    upper = layer([whiteout("d/stale.bin"), file("d/new.txt", SHORT)])
    lay.image([lower], tag="lower")
    lay.image([lower, upper], tag="both")
    request = ConversionRequest(repository=f"oci:{lay.root}", input_tag="both", turbo_tag="turbo",
                                overlaybd_tag="", workdir=str(tmp_path / "work"))
    out = convert(request, options=RunnerOptions(workers=1)).output("turbo")

    # The lower layer alone: where the stale bytes live.
    lower_request = ConversionRequest(repository=f"oci:{lay.root}", input_tag="lower", turbo_tag="turbo-lower",
                                      overlaybd_tag="", workdir=str(tmp_path / "work-lower"))
    lower_out = convert(lower_request, options=RunnerOptions(workers=1)).output("turbo")
    lower_image = tmp_path / "lower.img"
    flatten(lay.root, lower_out.root_digest, lower_image)
    stale_blocks = set(file_blocks(lower_image, "/d/stale.bin"))
    assert len(stale_blocks) == LOWER_BLOCKS

    image = tmp_path / "both.img"
    flatten(lay.root, out.root_digest, image)
    assert e2fsck(image) == ""
    assert check_tree(image, source_layer_paths(lay.root, tag_digest(lay.root, "both"))) == []
    [block] = file_blocks(image, "/d/new.txt")
    # The scenario under test: the short file reuses a block of the deleted one.
    assert block in stale_blocks
    with open(image, "rb") as f:
        f.seek(block * FS_BLOCK)
        data = f.read(FS_BLOCK)
    assert data[:len(SHORT)] == SHORT
    assert data[len(SHORT):] == bytes(FS_BLOCK - len(SHORT))
