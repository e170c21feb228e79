"""ZFile: overlaybd's seekable block compression (spec §2).

Layout: header (512) | blocks, each compressed independently + 4-byte CRC | jump table (u32 stored
length per block) | trailer (512).

One module per idea: `header` (the byte layout: constants, `ZFileHeader`, `zfile_parts`), `codec`
(the block codecs and their batch loops), `compress` (`BlockCompressor`), `writer` (`ZFileWriter`,
`compress_zfile`), `reader` (`ZFileReader`). The names other code uses are imported here.
`BlockCompressor.compress_packed` and `ZFileReader.preadinto` are the copy-free entry points.
"""

from obdconv.formats.zfile.codec import decompress_block, default_threads
from obdconv.formats.zfile.compress import BlockCompressor, BlockStream
from obdconv.formats.zfile.header import (
    ALGO_LZ4,
    ALGO_ZSTD,
    ALGORITHM_NAMES,
    ALGORITHMS,
    CRC_SIZE,
    DEFAULT_BLOCK_SIZE,
    HEADER_SPACE,
    INITIAL_HEADER_FLAGS,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    OVERWRITE_HEADER_FLAGS,
    TRAILER_FLAGS,
    ZFileHeader,
    algorithm_id,
    check_block_size,
    is_zfile,
    zfile_parts,
)
from obdconv.formats.zfile.reader import ZFileReader
from obdconv.formats.zfile.writer import ZFileWriter, compress_zfile

__all__ = [
    "ALGORITHMS",
    "ALGORITHM_NAMES",
    "ALGO_LZ4",
    "ALGO_ZSTD",
    "CRC_SIZE",
    "DEFAULT_BLOCK_SIZE",
    "HEADER_SPACE",
    "INITIAL_HEADER_FLAGS",
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "OVERWRITE_HEADER_FLAGS",
    "TRAILER_FLAGS",
    "BlockCompressor",
    "BlockStream",
    "ZFileHeader",
    "ZFileReader",
    "ZFileWriter",
    "algorithm_id",
    "check_block_size",
    "compress_zfile",
    "decompress_block",
    "default_threads",
    "is_zfile",
    "zfile_parts",
]
