"""Tar headers, field by field: the typeflags and block layout of ustar, GNU and PAX, and the
parsers of their fields (numbers in octal or GNU base-256, PAX records and times, header checksums,
lexically cleaned paths). The streaming scanner (tarscan.py) and its C fast path build on these; the
Python here stays the reference for every unusual member and every error."""

from __future__ import annotations

import struct
from zlib import adler32

from obdconv.entries import EntryType
from obdconv.errors import FormatError, UnsafePathError

BLOCK_SIZE = 512
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

SIMPLE_TYPES = {
    DIRTYPE: EntryType.DIR,
    SYMTYPE: EntryType.SYMLINK,
    LNKTYPE: EntryType.HARDLINK,
    CHRTYPE: EntryType.CHAR,
    BLKTYPE: EntryType.BLOCK,
    FIFOTYPE: EntryType.FIFO,
}

ZERO_BLOCK = bytes(BLOCK_SIZE)
SIGNED_HEADER = struct.Struct("148b8x356b")
# name mode uid gid size mtime chksum typeflag linkname magic version uname gname devmajor devminor prefix
HEADER_FIELDS = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
CHKSUM_SPACES = 8 * 0x20
META_TYPES = frozenset({GNUTYPE_LONGNAME, GNUTYPE_LONGLINK, XHDTYPE, SOLARIS_XHDTYPE, XGLTYPE})


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


def cstr(field: bytes) -> bytes:
    nul = field.find(b"\x00")
    return field if nul < 0 else field[:nul]


def decode_name(raw: bytes) -> str:
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
    label = decode_name(entry) if isinstance(entry, bytes) else entry
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


def verify_checksum(block: bytes, field: bytes, raw_name: bytes, header_offset: int) -> None:
    """Header checksum: the unsigned or the signed byte sum, the field itself counted as spaces."""
    text = field.partition(b"\x00")[0].strip(b" ")
    try:
        stored = int(text, 8) if text else -1
    except ValueError:
        stored = -1
    # Exact byte sums via adler32 (C speed): its low half is 1 + sum mod 65521, and a 256-byte
    # half-block sums to at most 65280, so nothing wraps.
    total = (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2
    unsigned = total - sum(field) + CHKSUM_SPACES
    if stored == unsigned:
        return
    signed = sum(SIGNED_HEADER.unpack(block)) + CHKSUM_SPACES
    if stored != signed:
        raise FormatError(
            f"tar entry {decode_name(raw_name)!r}: bad header checksum at byte {header_offset} "
            f"(stored {field!r}, computed {unsigned})"
        )
