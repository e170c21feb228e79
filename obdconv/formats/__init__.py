"""overlaybd byte formats: pure readers/writers over buffers and random-access sources (no I/O policy).

* `crc`      rawCRC32C (spec §0)
* `lsmt`     LSMT index entries, header/trailer, committed-file writer, readers, stacks (§1)
* `zfile`    ZFile block compression: compressor, header/tail pieces, writer, CRC-checked reader (§2)
* `tarwrap`  the tar wrapper around a layer blob (§2.6)
* `gzindex/` turboOCI gzip random-access index `gzip.meta` (§5): layout, inflate (zlib/zlib-ng via ctypes), builder, reader
* `blob`     open a layer blob: tar wrapper -> ZFile -> LSMT, auto-detected
* `source`   the `pread(offset, length)` sources everything above reads from
"""
