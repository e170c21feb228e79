"""LSMT: overlaybd's layer block format (spec §1): index entries, header/trailer, writers, readers.

Units: `SegmentMapping` fields are in 512-byte sectors (as on disk); every other API here takes bytes.

Writers:
  * `commit_header` / `commit_tail`: the pieces of a committed file, for callers that stream the
    data area themselves (header, data from offset 4096, then index + trailer).
  * `LSMTWriter` / `commit()`: record writes and zeroed ranges like an RW layer, then produce a
    committed file exactly as `overlaybd-commit` does (§1.6). `commit_rw_pair` commits a real RW pair.
Readers:
  * `LSMTFile.open(f, target=None)`: committed, sealed and warp (turboOCI) files, enforcing §1.5.
  * `LSMTFile.open_rw(data_f, index_f)`: an RW pair (normal or sparse).
  * `LSMTStack(layers)`: the merged view of a stack (§1.7) and `flatten_to` a sparse raw image.
"""


from __future__ import annotations

from obdconv.formats.lsmt.layout import (  # noqa: F401 - the package's public names
    COMMIT_HEADER_FLAGS,
    COMMIT_TRAILER_FLAGS,
    COMPACT_CHUNK_SECTORS,
    DEFAULT_VSIZE,
    FLAG_HEADER,
    FLAG_SEALED,
    FLAG_SHIFT_HEADER,
    FLAG_SHIFT_SEALED,
    FLAG_SHIFT_TYPE,
    FLAG_SPARSE,
    FLAG_SPARSE_RW,
    FLAG_TYPE_DATA,
    HT_SECTORS,
    HT_SPACE,
    HT_STRUCT_SIZE,
    INDEX_PAD_ENTRIES,
    INVALID_ENTRY_BYTES,
    INVALID_MAPPING,
    INVALID_OFFSET,
    LSMT_SUB_V1,
    LSMT_V1,
    MAGIC0,
    MAGIC1,
    MAX_LENGTH,
    MAX_LSMT_RO_INDEX_SIZE,
    MAX_MOFFSET,
    MAX_RW_INDEX_SIZE,
    RW_DATA_FLAGS,
    RW_INDEX_FLAGS,
    RW_MAX_IO_SECTORS,
    SECTOR,
    USER_TAG_SIZE,
    UUID_FIELD_SIZE,
    ZERO_UUID,
    LSMTHeader,
    MappingLike,
    SegmentMapping,
    commit_header,
    commit_tail,
    normalize_uuid,
    pack_index,
    split_long,
    unpack_index,
)
from obdconv.formats.lsmt.reader import (  # noqa: F401 - the package's public names
    LSMTFile,
)
from obdconv.formats.lsmt.segments import SegmentIndex  # noqa: F401
from obdconv.formats.lsmt.stack import (  # noqa: F401 - the package's public names
    LSMTStack,
    StackExtent,
)
from obdconv.formats.lsmt.writer import (  # noqa: F401 - the package's public names
    LSMTWriter,
    commit,
    commit_rw_pair,
    compact_mappings,
    merge_adjacent,
    write_committed,
)
