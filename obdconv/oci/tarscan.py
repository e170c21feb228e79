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
from zlib import adler32

from obdconv.entries import EntryType, LayerEntry
from obdconv.errors import FormatError, UnsafePathError, UnsupportedError
from obdconv.faithful import is_socket
from obdconv.native import load_extension

log = logging.getLogger(__name__)

BLOCK_SIZE = 512
DATA_ALIGNMENT = 4096
# PAX headers and GNU long names are held in memory; anything bigger is not a real header.
MAX_META_SIZE = 64 << 20
MAX_TIME_DIGITS = 30  # digits of seconds a PAX time may have

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"

ROOT_PATH = "."

# typeflags (POSIX ustar, GNU, PAX)
REGTYPE = b"0"
AREGTYPE = b"\x00"
LNKTYPE = b"1"
SYMTYPE = b"2"
CHRTYPE = b"3"
BLKTYPE = b"4"
DIRTYPE = b"5"
FIFOTYPE = b"6"
CONTTYPE = b"7"
GNUTYPE_LONGNAME = b"L"
GNUTYPE_LONGLINK = b"K"
GNUTYPE_SPARSE = b"S"
XHDTYPE = b"x"  # PAX extended header for the next entry
XGLTYPE = b"g"  # PAX global header
SOLARIS_XHDTYPE = b"X"  # old Solaris/star spelling of 'x'

REGULAR_TYPES = (REGTYPE, AREGTYPE, CONTTYPE)
POSIX_MAGIC = b"ustar\x00"

_SIMPLE_TYPES = {
    DIRTYPE: EntryType.DIR,
    SYMTYPE: EntryType.SYMLINK,
    LNKTYPE: EntryType.HARDLINK,
    CHRTYPE: EntryType.CHAR,
    BLKTYPE: EntryType.BLOCK,
    FIFOTYPE: EntryType.FIFO,
}

_ZERO_BLOCK = bytes(BLOCK_SIZE)
# A memoryview, so sinks get the same flat byte view for padding as for file content.
_ZERO_PAD = memoryview(bytes(DATA_ALIGNMENT))
_SIGNED_HEADER = struct.Struct("148b8x356b")
# name mode uid gid size mtime chksum typeflag linkname magic version uname gname devmajor devminor prefix
_HEADER_FIELDS = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_CHKSUM_SPACES = 8 * 0x20
_META_TYPES = frozenset({GNUTYPE_LONGNAME, GNUTYPE_LONGLINK, XHDTYPE, SOLARIS_XHDTYPE, XGLTYPE})

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


def clean_path(name: str, what: str) -> str:
    """Lexically clean `name` relative to the root; "" means the root itself.

    Raises UnsafePathError if it resolves above the root (`what` names the entry in the message).
    """
    if not name.startswith((".", "/")) and "/." not in name and "//" not in name:
        return name.rstrip("/")  # nothing to clean but a trailing slash
    parts: list[str] = []
    for part in name.split("/"):
        if part == "" or part == ".":
            continue
        if part == "..":
            if not parts:
                raise UnsafePathError(f"tar entry {what!r}: path {name!r} escapes the root")
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def _cstr(field: bytes) -> bytes:
    nul = field.find(b"\x00")
    return field if nul < 0 else field[:nul]


def _decode(raw: bytes) -> str:
    # Names are bytes on Linux; surrogateescape keeps non-UTF-8 names round-trippable (os.fsencode).
    return raw.decode("utf-8", "surrogateescape")


def parse_number(field: bytes, what: str, entry: str | bytes) -> int:
    """A numeric header field: octal (NUL/space padded) or GNU base-256 (first byte & 0x80)."""
    text = field.partition(b"\x00")[0].strip(b" ")
    if text.isdigit():  # ASCII digits only: no sign, underscore or prefix that int() would accept
        try:
            return int(text, 8)
        except ValueError:  # an 8 or a 9
            pass
    elif not text:
        return 0
    elif field[0] & 0x80:
        if field[0] & 0x40:  # negative, two's complement over the whole field (Go's encoding)
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(field, "big") - (1 << (8 * len(field) - 1))
    label = _decode(entry) if isinstance(entry, bytes) else entry
    raise FormatError(f"tar entry {label!r}: bad {what} field {field!r}")


def parse_pax_time(value: bytes, entry: str) -> int:
    """PAX time "[-]SECONDS[.FRACTION]" -> nanoseconds, exactly (no float rounding)."""
    text = value.strip()
    negative = text.startswith(b"-")
    if negative:
        text = text[1:]
    whole, _, frac = text.partition(b".")
    # At most MAX_TIME_DIGITS of seconds: far past any real time, and far below the 4300 digits
    # int() refuses with ValueError (found while writing tests/fuzz).
    if not whole.isdigit() or (frac and not frac.isdigit()) or len(whole) > MAX_TIME_DIGITS:
        raise FormatError(f"tar entry {entry!r}: bad PAX mtime {value[:64]!r}")
    ns = int(whole) * 1_000_000_000 + int((frac[:9] or b"0").ljust(9, b"0"))
    return -ns if negative else ns


def parse_pax_records(body: bytes, entry: str) -> list[tuple[bytes, bytes]]:
    """PAX records "LEN KEY=VALUE\\n", all as raw bytes (values may be binary, e.g. capabilities)."""
    records: list[tuple[bytes, bytes]] = []
    pos = 0
    end = len(body)
    while pos < end:
        if body[pos] == 0:  # NUL padding after the last record
            break
        space = body.find(b" ", pos, min(end, pos + 24))
        if space < 0:
            raise FormatError(f"tar entry {entry!r}: malformed PAX header at byte {pos}")
        try:
            length = int(body[pos:space])
        except ValueError:
            raise FormatError(f"tar entry {entry!r}: malformed PAX record length at byte {pos}") from None
        record_end = pos + length
        if length <= space - pos + 1 or record_end > end or body[record_end - 1] != 0x0A:
            raise FormatError(f"tar entry {entry!r}: malformed PAX record at byte {pos}")
        key, eq, value = body[space + 1 : record_end - 1].partition(b"=")
        if not eq:
            raise FormatError(f"tar entry {entry!r}: PAX record without '=' at byte {pos}")
        records.append((key, value))
        pos = record_end
    return records


def _verify_checksum(block: bytes, field: bytes, raw_name: bytes, header_offset: int) -> None:
    """Header checksum: the unsigned or the signed byte sum, the field itself counted as spaces."""
    text = field.partition(b"\x00")[0].strip(b" ")
    try:
        stored = int(text, 8) if text else -1
    except ValueError:
        stored = -1
    # Exact byte sums via adler32 (C speed): its low half is 1 + sum mod 65521, and a 256-byte
    # half-block sums to at most 65280, so nothing wraps.
    total = (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2
    unsigned = total - sum(field) + _CHKSUM_SPACES
    if stored == unsigned:
        return
    signed = sum(_SIGNED_HEADER.unpack(block)) + _CHKSUM_SPACES
    if stored != signed:
        raise FormatError(
            f"tar entry {_decode(raw_name)!r}: bad header checksum at byte {header_offset} "
            f"(stored {field!r}, computed {unsigned})"
        )


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
        if block == _ZERO_BLOCK:
            self._zero_blocks += 1
            if self._zero_blocks >= 2:
                self._state = _END
            return
        if self._zero_blocks:
            raise FormatError(f"tar: a zero block followed by a non-zero header at byte {header_offset}")

        (raw_name, mode_f, uid_f, gid_f, size_f, mtime_f, chksum_f, typeflag, raw_link, magic, _version,
         _uname, _gname, devmajor_f, devminor_f, prefix) = _HEADER_FIELDS.unpack(block)
        raw_name = raw_name.partition(b"\x00")[0]
        if magic == POSIX_MAGIC:
            prefix = prefix.partition(b"\x00")[0]
            if prefix:
                raw_name = prefix + b"/" + raw_name
        pending = self._pending
        if pending is not None and pending.name is not None:
            raw_name = pending.name
        _verify_checksum(block, chksum_f, raw_name, header_offset)

        size = parse_number(size_f, "size", raw_name)
        if size < 0:
            raise FormatError(f"tar entry {_decode(raw_name)!r}: negative size {size}")
        padded = (size + BLOCK_SIZE - 1) & ~(BLOCK_SIZE - 1)

        if typeflag in _META_TYPES:
            entry_label = _decode(raw_name)
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
        name = _decode(raw_name)
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
        if not is_regular and typeflag not in _SIMPLE_TYPES:
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

        entry.type = _SIMPLE_TYPES[typeflag]
        if typeflag in (SYMTYPE, LNKTYPE):
            if pending.linkname is not None:
                raw_link = pending.linkname
            else:
                raw_link = raw_link.partition(b"\x00")[0]
            target = _decode(raw_link)
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
            self._pending_for_write().name = _cstr(body)
        elif kind == GNUTYPE_LONGLINK:
            self._pending_for_write().linkname = _cstr(body)
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
                pending.xattrs.append((_decode(key[len(b"SCHILY.xattr.") :]), value))
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
