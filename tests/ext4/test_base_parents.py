"""The overlaybd base layer (`--mkfs=false`) as the parents of a metadata pass: its 512 MiB journal
is neither read by the pass nor written when the stack is flattened."""

from __future__ import annotations

import uuid
from pathlib import Path

from obdconv.ext4 import Ext4Builder
from obdconv.ext4.filedata import regular_file_data
from obdconv.formats.blob import open_layer_blob
from obdconv.formats.lsmt import LSMTStack
from obdconv.pipeline.parents import ParentDevice
from tests.pipeline.base_fixture import base_layer_path

JOURNAL = (8421376 * 4096, 131072 * 4096)  # debugfs "stat <8>" of the fixture: one 512 MiB run


class CountingDevice(ParentDevice):
    def __init__(self, stack: LSMTStack) -> None:
        super().__init__(stack)
        self.read = 0

    def pread(self, offset: int, length: int) -> bytes:
        self.read += length
        return super().pread(offset, length)


def test_journal_is_left_out_of_the_metadata_image(tmp_path: Path) -> None:
    device = CountingDevice(LSMTStack([open_layer_blob(str(base_layer_path()))]))
    assert regular_file_data(device) == [JOURNAL]  # no regular files; the journal's blocks
    builder = Ext4Builder(tmp_path / "m.img", 64 << 30, uuid.uuid4())
    device.read = 0
    builder.load_parents(device)
    assert device.read < 64 << 20  # was the whole 517 MiB mapped (journal included)
    assert (tmp_path / "m.img").stat().st_blocks * 512 < 32 << 20


def test_flatten_leaves_zeros_as_holes(tmp_path: Path) -> None:
    image = tmp_path / "flat.img"
    stack = LSMTStack([open_layer_blob(str(base_layer_path()))])
    stack.flatten_to(image)
    assert image.stat().st_size == 64 << 30
    assert image.stat().st_blocks * 512 < 64 << 20  # was 517 MiB, the journal's zeros written out
    with open(image, "rb") as f:
        f.seek(1024 + 0x38)
        assert f.read(2) == b"\x53\xef"  # the superblock is there
        for offset in (0, 1024, 8 << 20, JOURNAL[0], JOURNAL[0] + JOURNAL[1] - 4096):
            f.seek(offset)
            assert f.read(4096) == stack.pread(offset, 4096)
