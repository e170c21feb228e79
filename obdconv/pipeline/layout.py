"""Where things sit inside a converted layer's LSMT file (the "data-area alignment trick").

A native layer's LSMT is laid out so that the ZFile blocks compressed while the source layer was
streamed (prepare) can be reused verbatim in the final ZFile (assemble), never recompressed:

    [0, H)                  LSMT commit header (4096 B) + zeros up to H = max(4096, block_size)
    [H, H + D)              the prepared data area, D padded to a block_size multiple
    [H + D, I)              the layer's ext4 metadata blocks, 4096 B each, sorted by device block
    [I, end)                index (padded to 256 entries) + trailer

ZFile block k covers LSMT bytes [k*bs, (k+1)*bs), so because H and D are multiples of bs the
prepared blocks are exactly ZFile blocks H/bs .. (H+D)/bs - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

SECTOR = 512
FS_BLOCK = 4096
LSMT_HEADER_SIZE = 4096


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def data_area_start(block_size: int) -> int:
    """File offset of the data area: the header region padded to one ZFile block (>= 4096)."""
    return max(LSMT_HEADER_SIZE, block_size)


@dataclass(frozen=True, slots=True)
class NativeLayout:
    """Byte offsets of the parts of a native layer's LSMT file."""

    block_size: int
    data_area_size: int  # padded, a multiple of block_size
    metadata_block_count: int

    @property
    def data_start(self) -> int:
        return data_area_start(self.block_size)

    @property
    def metadata_start(self) -> int:
        return self.data_start + self.data_area_size

    @property
    def index_offset(self) -> int:
        return self.metadata_start + FS_BLOCK * self.metadata_block_count
