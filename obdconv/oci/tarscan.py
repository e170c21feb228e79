"""Streaming, incremental tar scanner: uncompressed layer tar bytes in, `LayerEntry` list (and data area) out.

`TarScanner.feed(chunk)` accepts chunks of any size (the caller decompresses and hashes); file
contents pass straight through to `data_sink.write()` as memoryview slices of the caller's chunks,
so the data path costs about one memcpy. Headers cost a few microseconds each.

Formats: ustar, GNU (typeflags 'L'/'K' long names, base-256 numbers) and PAX ('x' records:
`path`, `linkpath`, `size`, `uid`, `gid`, `mtime` with sub-second precision, `SCHILY.xattr.*`
with raw byte values; 'g' global headers are skipped).

Semantics, compared with the reference untar (overlaybd `libtar.cpp`, spec overlaybd-format §4):

* Same: header checksum verified (unsigned or signed sum); two zero blocks end the archive; GNU
  long names; PAX `path`/`linkpath`/`size`/`SCHILY.xattr.*`; ustar `prefix` only with the POSIX
  magic `ustar\\0`; `'\\0'`-typed names ending in "/" are directories; whiteouts.
* Fixed: GNU base-256 numbers are decoded (the reference reads them as 0); PAX `uid`, `gid` and
  `mtime` are honoured, mtime to the nanosecond (also negative); GNU sparse members ('S' or PAX
  `GNU.sparse.*`) raise `UnsupportedError` naming the entry (the reference writes raw sparse maps).
* Paths are cleaned lexically (Plan-9 style: collapse "//", drop ".", resolve ".."); absolute names
  become relative. A name that resolves ABOVE the root ("../x") raises `UnsafePathError` naming the
  entry — the reference silently clamps it to the root; we refuse such layers. Hardlink targets are
  cleaned the same way (escape -> error). Symlink targets are kept verbatim (they are not followed;
  the reference cleans them, which changes what e.g. "a/../b" or "./x" point to).
* An entry resolving to the root itself ("./", "/") is reported ONLY if it is a directory, as a
  DIR entry with path "." (its mode/owner/times apply to the root inode; the reference skips it).
  Any other type resolving to the root raises `UnsafePathError`.
* Whiteouts: "dir/.wh.NAME" -> WHITEOUT with path "dir/NAME"; "dir/.wh..wh..opq" -> OPAQUE with
  path "dir" ("." for the root); other ".wh..wh.*" names (aufs metadata, e.g. ".wh..wh.plnk") and
  everything below them are skipped.
* Sockets (a regular typeflag whose mode carries S_IFSOCK) are skipped with a logging warning.
* Unknown typeflags raise `UnsafePathError` naming the entry.
* Data after the end-of-archive marker is ignored (the caller still hashes it). An archive that
  ends at a header boundary without the marker is accepted (as Go's archive/tar and Python's
  tarfile do); ending anywhere else raises `FormatError`. A lone zero block followed by a
  non-zero header raises `FormatError` (as Go's archive/tar does).
* Only regular files consume data blocks; the size field of other entry types is ignored (as
  Python's tarfile does; hardlinks, symlinks, dirs and devices written by real tools have size 0).

Speed: the ordinary member groups of each chunk (a header, optionally after one PAX header with
path/linkpath/size/uid/gid/mtime) are parsed by the C fast path `obdconv.oci._tarscanfast` (built
by cffi at install, see _build_tarscan.py) in one call per chunk; it hands anything else -- errors,
long names, xattrs, whiteouts, the end marker, groups split across chunks -- back to the Python
code here, which stays the reference. Set OBDCONV_TARSCAN_NO_FAST=1 to parse everything in Python
(same results; tests compare the two).

Offsets: `tar_offset` (regular files, also empty ones) is the offset of the content in the
uncompressed tar stream. The *data area* is every regular file's content, each file starting on a
4 KiB boundary with zero padding between, the whole area padded to 4 KiB; `data_offset` is a
file's offset there (-1 for empty files). The layout is computed whether or not a `data_sink` is
given (it is a pure function of the tar), so `data_offset` and `data_area_size` are always set.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Protocol

from obdconv.entries import EntryType, LayerEntry
from obdconv.errors import FormatError, UnsafePathError, UnsupportedError
from obdconv.faithful import is_socket
from obdconv.native import load_extension
from obdconv.oci.tarheader import (
    AREGTYPE,
    BLKTYPE,
    BLOCK_SIZE,
    CHRTYPE,
    DIRTYPE,
    GNUTYPE_LONGLINK,
    GNUTYPE_LONGNAME,
    GNUTYPE_SPARSE,
    HEADER_FIELDS,
    LNKTYPE,
    MAX_META_SIZE,
    META_TYPES,
    POSIX_MAGIC,
    REGULAR_TYPES,
    ROOT_PATH,
    SIMPLE_TYPES,
    SOLARIS_XHDTYPE,
    SYMTYPE,
    WHITEOUT_META_PREFIX,
    WHITEOUT_OPAQUE,
    WHITEOUT_PREFIX,
    XHDTYPE,
    ZERO_BLOCK,
    clean_path,
    cstr,
    decode_name,
    parse_number,
    parse_pax_records,
    parse_pax_time,
    verify_checksum,
)

log = logging.getLogger(__name__)

DATA_ALIGNMENT = 4096
# A memoryview, so sinks get the same flat byte view for padding as for file content.
_ZERO_PAD = memoryview(bytes(DATA_ALIGNMENT))

# parser states
_HEADER = 0
_DATA = 1  # regular file content -> sink
_SKIP = 2  # padding / ignored content
_META = 3  # PAX / GNU long name body being collected
_END = 4


# The C fast path's record (struct obd_tar_rec in _tarscan_fast_impl.c): mode uid gid mtime_ns size
# devmajor devminor tar_offset data_offset content_pos, path_off path_len link_off link_len, type tail_pad.
_FAST_RECORD = struct.Struct("=10q4I2i")
_FAST_MAX_RECORDS = 2048
_FAST_ARENA_SIZE = 1 << 20  # cleaned paths and link targets of one call's records
_FAST_STOP_FULL = 2
_FAST_STOP_DATA = 3
_FAST_TYPES = {ord(t.value): t for t in EntryType}


def _load_fast() -> ModuleType | None:
    module = load_extension("obdconv.oci._tarscanfast", "OBDCONV_TARSCAN_NO_FAST", log,
                            "parsing headers in Python (slower). Reinstall with gcc present to build it.")
    if module is not None and module.ffi.sizeof("struct obd_tar_rec") != _FAST_RECORD.size:
        log.warning("tar scanner C fast path has a different record layout; not used")
        return None
    return module


FAST: ModuleType | None = _load_fast()


class DataSink(Protocol):
    def write(self, data: bytes | memoryview, /) -> object: ...


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


class _Pending:
    """Overrides collected from GNU 'L'/'K' and PAX 'x' headers for the next real entry."""

    __slots__ = ("gid", "linkname", "mtime_ns", "name", "size", "sparse", "uid", "xattrs")

    def __init__(self) -> None:
        self.name: bytes | None = None
        self.linkname: bytes | None = None
        self.size: int | None = None
        self.uid: int | None = None
        self.gid: int | None = None
        self.mtime_ns: int | None = None
        self.xattrs: list[tuple[str, bytes]] = []
        self.sparse = False  # PAX GNU.sparse.* seen: rejected once the entry's own header names it


_NO_PENDING = _Pending()  # read-only stand-in when no PAX/GNU header preceded an entry


class TarScanner:
    """Incremental tar parser. `feed()` chunks, then `finish()` for the entries (see module doc).

    `data_sink.write()` receives memoryview slices of the chunks given to `feed()` (no copy): it
    must consume them before returning (a file's `write` does), as the caller may reuse its buffer.
    """

    def __init__(self, data_sink: DataSink | None = None) -> None:
        self._sink = data_sink
        self._entries: list[LayerEntry] = []
        self._taken = 0  # entries already handed out by pop_entries()
        self._state = _HEADER
        self._remaining = 0  # bytes left in the current _DATA/_SKIP/_META span
        self._after_data_skip = 0  # block padding after the current file content
        self._header_buf = bytearray()
        self._meta_buf = bytearray()
        self._meta_kind = b""
        self._meta_entry = ""
        self._pending: _Pending | None = None
        self._offset = 0  # bytes of tar consumed so far
        self._zero_blocks = 0
        self._data_pos = 0  # current end of the data area
        self._finished = False
        self._fast = FAST
        if self._fast is not None:
            ffi = self._fast.ffi
            self._fast_cursor: Any = ffi.new("struct obd_tar_cursor *")
            self._fast_records: Any = ffi.new("struct obd_tar_rec[]", _FAST_MAX_RECORDS)
            self._fast_arena: Any = ffi.new("unsigned char[]", _FAST_ARENA_SIZE)

    # -- public API -------------------------------------------------------------------------

    @property
    def entries(self) -> list[LayerEntry]:
        """Entries found so far, in tar order."""
        return self._entries

    def __iter__(self) -> Iterator[LayerEntry]:
        return iter(self._entries)

    def pop_entries(self) -> list[LayerEntry]:
        """Entries found since the previous call (for consumers that stream)."""
        new = self._entries[self._taken :]
        self._taken = len(self._entries)
        return new

    @property
    def data_area_size(self) -> int:
        """Size of the data area (a multiple of 4 KiB)."""
        return self._data_pos

    @property
    def tar_size(self) -> int:
        """Bytes fed so far (including any data after the end-of-archive marker)."""
        return self._offset

    @property
    def at_end(self) -> bool:
        """True once the end-of-archive marker has been read."""
        return self._state == _END

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._finished:
            raise RuntimeError("TarScanner.feed() after finish()")
        mv = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        pos = 0
        n = len(mv)
        fast = self._fast if mv.c_contiguous else None  # the C code needs a plain pointer
        while pos < n:
            state = self._state
            if (state == _HEADER and fast is not None and n - pos >= BLOCK_SIZE and not self._header_buf
                    and self._pending is None and not self._zero_blocks):
                pos = self._fast_scan(mv, pos, n)
                if pos >= n:
                    break
                # The C code stopped at a group it leaves to the code below (or inside file data).
                state = self._state
            if state == _DATA:
                take = min(self._remaining, n - pos)
                if self._sink is not None:
                    self._sink.write(mv[pos : pos + take])
                pos += take
                self._offset += take
                self._remaining -= take
                if self._remaining == 0:
                    self._end_file_data()
            elif state == _SKIP:
                take = min(self._remaining, n - pos)
                pos += take
                self._offset += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _HEADER
            elif state == _HEADER:
                if not self._header_buf and n - pos >= BLOCK_SIZE:
                    block = mv[pos : pos + BLOCK_SIZE].tobytes()
                    pos += BLOCK_SIZE
                else:
                    take = min(BLOCK_SIZE - len(self._header_buf), n - pos)
                    self._header_buf += mv[pos : pos + take]
                    pos += take
                    if len(self._header_buf) < BLOCK_SIZE:
                        self._offset += take
                        continue
                    block = bytes(self._header_buf)
                    self._header_buf.clear()
                    self._offset += take - BLOCK_SIZE  # _on_header counts the whole block
                self._on_header(block)
            elif state == _META:
                take = min(self._remaining, n - pos)
                self._meta_buf += mv[pos : pos + take]
                pos += take
                self._offset += take
                self._remaining -= take
                if self._remaining == 0:
                    self._on_meta_body()
            else:  # _END: trailing bytes are ignored
                self._offset += n - pos
                pos = n

    def _fast_scan(self, mv: memoryview, pos: int, n: int) -> int:
        """Let the C fast path parse member groups from `pos`; returns where the Python code goes on."""
        fast = self._fast
        assert fast is not None
        cursor = self._fast_cursor
        base = self._offset - pos  # tar offset of mv[0]
        # The C view of the chunk lives for this call only and is released even when an exception
        # leaves: kept in a frame, a traceback cycle could have the garbage collector clear the
        # memoryview first, which CPython refuses while cffi still holds its buffer -- and then
        # segfaults (found by tests/fuzz).
        with fast.ffi.from_buffer("unsigned char[]", mv) as c_chunk:
            while True:
                cursor.pos = pos
                cursor.base = base
                cursor.data_pos = self._data_pos
                count = fast.lib.obd_tar_scan(c_chunk, n, cursor, self._fast_records, _FAST_MAX_RECORDS,
                                              self._fast_arena, _FAST_ARENA_SIZE)
                if count:
                    self._fast_entries(mv, count, cursor.arena_used)
                pos = cursor.pos
                self._data_pos = cursor.data_pos
                self._offset = base + pos
                if cursor.stop != _FAST_STOP_FULL:
                    break
        if cursor.stop == _FAST_STOP_DATA:
            # The last file's content runs past this chunk: stream it as _on_header would have.
            last = self._fast_records[count - 1]
            self._remaining = last.size
            self._after_data_skip = last.tail_pad
            self._state = _DATA
        return pos

    def _fast_entries(self, mv: memoryview, count: int, arena_used: int) -> None:
        """LayerEntry objects for the C records; file contents wholly in the chunk go to the sink."""
        ffi = self._fast.ffi  # type: ignore[union-attr]
        arena = ffi.buffer(self._fast_arena, arena_used)[:]
        types = _FAST_TYPES
        append = self._entries.append
        sink = self._sink
        for (mode, uid, gid, mtime_ns, size, devmajor, devminor, tar_offset, data_offset, content_pos,
             path_off, path_len, link_off, link_len, type_code, _tail_pad) in _FAST_RECORD.iter_unpack(
                ffi.buffer(self._fast_records, count * _FAST_RECORD.size)):
            path = arena[path_off : path_off + path_len].decode("utf-8", "surrogateescape")
            link = arena[link_off : link_off + link_len].decode("utf-8", "surrogateescape") if link_len else ""
            append(LayerEntry(path, types[type_code], mode, uid, gid, mtime_ns, size, link, devmajor, devminor,
                              [], tar_offset, data_offset))
            if content_pos >= 0 and sink is not None:
                sink.write(mv[content_pos : content_pos + size])
                if size % DATA_ALIGNMENT:
                    sink.write(_ZERO_PAD[: -size % DATA_ALIGNMENT])

    def finish(self) -> list[LayerEntry]:
        """Check the archive ended cleanly; return all entries."""
        if not self._finished:
            self._finished = True
            if self._state != _END:
                if self._header_buf:
                    raise FormatError(
                        f"truncated tar: archive ends inside a header at byte {self._offset}"
                    )
                if self._state in (_DATA, _META):
                    what = self._meta_entry if self._state == _META else self._entries[-1].path
                    raise FormatError(
                        f"truncated tar: entry {what!r} is missing {self._remaining} bytes of content"
                    )
                if self._state == _SKIP and self._remaining:
                    # Only the block padding (or content of a skipped entry) is missing.
                    raise FormatError(f"truncated tar: archive ends at byte {self._offset} inside padding")
                if self._pending is not None:
                    raise FormatError(
                        f"truncated tar: archive ends after a {self._meta_kind!r} header for "
                        f"{self._meta_entry!r} without its entry"
                    )
                # At a header boundary without an end marker: accepted (see module doc).
            self._pad_data_area()
        return self._entries

    # -- internals --------------------------------------------------------------------------

    def _pad_data_area(self) -> None:
        aligned = _align(self._data_pos, DATA_ALIGNMENT)
        if aligned != self._data_pos:
            if self._sink is not None:
                self._sink.write(_ZERO_PAD[: aligned - self._data_pos])
            self._data_pos = aligned

    def _end_file_data(self) -> None:
        self._pad_data_area()
        self._remaining = self._after_data_skip
        self._state = _SKIP if self._remaining else _HEADER

    def _skip(self, nbytes: int) -> None:
        self._remaining = nbytes
        self._state = _SKIP if nbytes else _HEADER

    def _on_header(self, block: bytes) -> None:
        header_offset = self._offset
        self._offset += BLOCK_SIZE
        if block == ZERO_BLOCK:
            self._zero_blocks += 1
            if self._zero_blocks >= 2:
                self._state = _END
            return
        if self._zero_blocks:
            raise FormatError(f"tar: a zero block followed by a non-zero header at byte {header_offset}")

        (raw_name, mode_f, uid_f, gid_f, size_f, mtime_f, chksum_f, typeflag, raw_link, magic, _version,
         _uname, _gname, devmajor_f, devminor_f, prefix) = HEADER_FIELDS.unpack(block)
        raw_name = raw_name.partition(b"\x00")[0]
        if magic == POSIX_MAGIC:
            prefix = prefix.partition(b"\x00")[0]
            if prefix:
                raw_name = prefix + b"/" + raw_name
        pending = self._pending
        if pending is not None and pending.name is not None:
            raw_name = pending.name
        verify_checksum(block, chksum_f, raw_name, header_offset)

        size = parse_number(size_f, "size", raw_name)
        if size < 0:
            raise FormatError(f"tar entry {decode_name(raw_name)!r}: negative size {size}")
        padded = (size + BLOCK_SIZE - 1) & ~(BLOCK_SIZE - 1)

        if typeflag in META_TYPES:
            entry_label = decode_name(raw_name)
            if size > MAX_META_SIZE:
                raise FormatError(f"tar entry {entry_label!r}: {typeflag!r} header of {size} bytes is too big")
            self._meta_kind = typeflag
            self._meta_entry = entry_label
            self._meta_buf.clear()
            self._after_data_skip = padded - size
            self._remaining = size
            self._state = _META
            if size == 0:
                self._on_meta_body()
            return

        self._pending = None
        if pending is None:
            pending = _NO_PENDING
        name = decode_name(raw_name)
        if pending.size is not None:
            size = pending.size
            padded = (size + BLOCK_SIZE - 1) & ~(BLOCK_SIZE - 1)
        if typeflag == GNUTYPE_SPARSE or pending.sparse:
            raise UnsupportedError(f"tar entry {name!r}: GNU sparse files are not supported")

        mode_field = parse_number(mode_f, "mode", name)
        is_regular = typeflag in REGULAR_TYPES
        if typeflag == AREGTYPE and name.endswith("/"):
            is_regular = False
            typeflag = DIRTYPE
        if is_regular and is_socket(mode_field):  # a documented difference (faithful.SOCKET_SKIPPED)
            log.warning("tar entry %r is a socket; skipped", name)
            self._skip(padded)
            return
        if not is_regular and typeflag not in SIMPLE_TYPES:
            raise UnsafePathError(f"tar entry {name!r}: unsupported tar entry type {typeflag!r}")

        path = clean_path(name, name)
        if self._in_aufs_meta(path):
            self._skip(padded if is_regular else 0)
            return
        uid = pending.uid if pending.uid is not None else parse_number(uid_f, "uid", name)
        gid = pending.gid if pending.gid is not None else parse_number(gid_f, "gid", name)
        if pending.mtime_ns is not None:
            mtime_ns = pending.mtime_ns
        else:
            mtime_ns = parse_number(mtime_f, "mtime", name) * 1_000_000_000
        mode = mode_field & 0o7777

        base = path.rpartition("/")[2]
        if base.startswith(WHITEOUT_PREFIX):
            self._on_whiteout(path, base, name)
            self._skip(padded if is_regular else 0)
            return

        if path == "":
            if typeflag != DIRTYPE:
                raise UnsafePathError(f"tar entry {name!r}: a non-directory resolves to the root")
            path = ROOT_PATH

        entry = LayerEntry(path, EntryType.FILE, mode, uid, gid, mtime_ns, xattrs=list(pending.xattrs))
        if is_regular:
            entry.size = size
            entry.tar_offset = self._offset
            self._entries.append(entry)
            if size == 0:
                self._state = _HEADER
                return
            entry.data_offset = self._data_pos
            self._data_pos += size
            self._remaining = size
            self._after_data_skip = padded - size
            self._state = _DATA
            return

        entry.type = SIMPLE_TYPES[typeflag]
        if typeflag in (SYMTYPE, LNKTYPE):
            if pending.linkname is not None:
                raw_link = pending.linkname
            else:
                raw_link = raw_link.partition(b"\x00")[0]
            target = decode_name(raw_link)
            if typeflag == LNKTYPE:
                target = clean_path(target, name)
                if target == "":
                    raise UnsafePathError(f"tar entry {name!r}: hard link to the root directory")
            entry.link_target = target
        elif typeflag in (CHRTYPE, BLKTYPE):
            entry.devmajor = parse_number(devmajor_f, "devmajor", name)
            entry.devminor = parse_number(devminor_f, "devminor", name)
        self._entries.append(entry)
        self._state = _HEADER

    def _in_aufs_meta(self, path: str) -> bool:
        if not path.startswith(WHITEOUT_META_PREFIX):
            return False
        first = path.partition("/")[0]
        return first.startswith(WHITEOUT_META_PREFIX) and first != WHITEOUT_OPAQUE and "/" in path

    def _on_whiteout(self, path: str, base: str, name: str) -> None:
        parent = path.rpartition("/")[0]
        if base == WHITEOUT_OPAQUE:
            self._entries.append(LayerEntry(parent or ROOT_PATH, EntryType.OPAQUE))
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return  # aufs metadata (.wh..wh.plnk, .wh..wh.aufs, ...)
        hidden = base[len(WHITEOUT_PREFIX) :]
        if hidden in ("", ".", ".."):
            raise UnsafePathError(f"tar entry {name!r}: whiteout of {hidden!r} is invalid")
        self._entries.append(LayerEntry(f"{parent}/{hidden}" if parent else hidden, EntryType.WHITEOUT))

    def _pending_for_write(self) -> _Pending:
        if self._pending is None:
            self._pending = _Pending()
        return self._pending

    def _on_meta_body(self) -> None:
        body = bytes(self._meta_buf)
        self._meta_buf.clear()
        kind = self._meta_kind
        entry = self._meta_entry
        if kind == GNUTYPE_LONGNAME:
            self._pending_for_write().name = cstr(body)
        elif kind == GNUTYPE_LONGLINK:
            self._pending_for_write().linkname = cstr(body)
        elif kind in (XHDTYPE, SOLARIS_XHDTYPE):
            self._apply_pax(parse_pax_records(body, entry), entry)
        # XGLTYPE: global headers are skipped (as the reference does).
        self._skip(self._after_data_skip)

    def _apply_pax(self, records: list[tuple[bytes, bytes]], entry: str) -> None:
        pending = self._pending_for_write()
        for key, value in records:
            if key == b"path":
                pending.name = value
            elif key == b"linkpath":
                pending.linkname = value
            elif key == b"size":
                pending.size = self._pax_int(key, value, entry)
                if pending.size < 0:
                    raise FormatError(f"tar entry {entry!r}: negative PAX size")
            elif key == b"uid":
                pending.uid = self._pax_int(key, value, entry)
            elif key == b"gid":
                pending.gid = self._pax_int(key, value, entry)
            elif key == b"mtime":
                pending.mtime_ns = parse_pax_time(value, entry)
            elif key.startswith(b"SCHILY.xattr."):
                pending.xattrs.append((decode_name(key[len(b"SCHILY.xattr.") :]), value))
            elif key.startswith(b"GNU.sparse."):
                pending.sparse = True

    @staticmethod
    def _pax_int(key: bytes, value: bytes, entry: str) -> int:
        try:
            return int(value)
        except ValueError:
            raise FormatError(f"tar entry {entry!r}: bad PAX {key.decode()!r} value {value!r}") from None


def scan_tar(stream: object, data_sink: DataSink | None = None, chunk_size: int = 1 << 20) -> TarScanner:
    """Scan a whole uncompressed tar from a binary file object; returns the finished scanner."""
    scanner = TarScanner(data_sink)
    read = stream.readinto if hasattr(stream, "readinto") else None  # type: ignore[attr-defined]
    if read is not None:
        buf = bytearray(chunk_size)
        view = memoryview(buf)
        while True:
            n = read(view)
            if not n:
                break
            scanner.feed(view[:n])
    else:
        while chunk := stream.read(chunk_size):  # type: ignore[attr-defined]
            scanner.feed(chunk)
    scanner.finish()
    return scanner
