"""gzip random-access index: the turboOCI `gzip.meta` file (spec §5), its builder and a reader.

Why ctypes over a zlib C API: building the index needs `inflate(Z_BLOCK)` and the stream's
`data_type` (to stop at deflate block boundaries and learn the bit offset), and reading needs
`inflatePrime` (to restart mid-byte). Python's `zlib` module exposes none of these, and no maintained
package does either, so the few calls are made directly: on zlib-ng's native API from the `zlib-ng`
package when it is installed (twice as fast, see `bundled_zlib_ng`), else on the system zlib
(`OBDCONV_GZINDEX_SYSTEM_ZLIB=1` forces it). `INFLATE_LIBRARY` says which.

One gzip member only: a blob whose later members hold data (concatenated gzip streams, valid per
RFC 1952 and written by some parallel compressors) makes `GzipIndexBuilder` raise `MultiMemberGzip`.
Why refuse instead of indexing every member (docs/ARCHITECTURE.md, Decisions): the overlaybd
runtime's reader (`GzFile::extract`, gzfile.cpp) inflates raw deflate (`inflateInit2(-15)`) from an
access point and stops at the member's end (`Z_STREAM_END`) with a short read, which the LSMT warp
file treats as an I/O error, and its `fstat` size is `uncompress_file_size`, which the reference
index builder (`create_gz_index`, `inflateInit2(47)`) sets to the first member's size. Access points
inside later members would serve reads that stay within one member, but any read crossing a member
boundary (a file's data, or a gzip cache page) would still fail on the runtime. Later members that
inflate to nothing (empty members) and zero padding after the last member are accepted.
`GzipRandomReader.pread` still continues across members (for reading indexes made elsewhere).

Difference from the reference tool, on purpose: a block boundary reported twice by zlib (when an
input chunk ends exactly on it) is recorded once, so the index does not depend on how the input was
chunked.
"""

from obdconv.formats.gzindex.builder import OUTPUT_ROOM, GzipIndexBuilder
from obdconv.formats.gzindex.inflate import (
    INFLATE_LIBRARY,
    InflateLibrary,
    MultiMemberGzip,
    bundled_zlib_ng,
    system_zlib,
)
from obdconv.formats.gzindex.layout import (
    _CRC_COVERS,
    DEFAULT_LEVEL,
    DEFAULT_SPAN,
    DICT_COMPRESS_ALGO_NONE,
    DICT_COMPRESS_ALGO_ZLIB,
    ENTRY_SIZE,
    HEADER_SIZE,
    MAGIC,
    MIN_SPAN,
    WINSIZE,
    GzipIndex,
    GzipIndexHeader,
    IndexEntry,
)
from obdconv.formats.gzindex.reader import GzipRandomReader

__all__ = [
    "DEFAULT_LEVEL", "DEFAULT_SPAN", "DICT_COMPRESS_ALGO_NONE", "DICT_COMPRESS_ALGO_ZLIB", "ENTRY_SIZE", "HEADER_SIZE",
    "INFLATE_LIBRARY", "MAGIC", "MIN_SPAN", "OUTPUT_ROOM", "WINSIZE", "_CRC_COVERS", "GzipIndex", "GzipIndexBuilder",
    "GzipIndexHeader", "GzipRandomReader", "IndexEntry", "InflateLibrary", "MultiMemberGzip", "bundled_zlib_ng",
    "system_zlib",
]
