"""The tar wrapper around a layer blob (spec §2.6): `overlaybd-commit -t` / `overlaybd-zfile -t`.

Layout: PAX header 'x' (`overlaybd.pax`) | PAX record "<len> size=<n>\\n" | ustar header '0'
(`overlaybd.commit`, size field 0) | payload | zero padding to 512 | two zero blocks.
Numeric fields are written the way the tool's libtar writes them: right-aligned octal padded with
spaces, then a space (and a NUL in 8-byte fields); unused numeric fields of the PAX header are NUL.

`go_wrap_prefix` is the other form readers accept: the one ustar header Go's `archive/tar` writes,
which the reference convertor wraps the `--mkfs=false` base layer in (spec reference-convertor.md §3.9).
"""

from __future__ import annotations

import os
from typing import BinaryIO

from obdconv.errors import FormatError
from obdconv.formats.source import RandomAccess, as_source

BLOCK = 512
PAX_NAME = b"overlaybd.pax"
ENTRY_NAME = b"overlaybd.commit"
USTAR_MAGIC = b"ustar\x00"
USTAR_VERSION = b"00"
DEFAULT_MODE = 0o100644  # st_mode of the committed file as the tool sees it
PREFIX_SIZE = 3 * BLOCK

# Field offsets and widths of a ustar header block.
_NAME, _MODE, _UID, _GID, _SIZE, _MTIME, _CHKSUM, _TYPE = (0, 100), (100, 8), (108, 8), (116, 8), \
    (124, 12), (136, 12), (148, 8), (156, 1)
_MAGIC, _VERSION, _UNAME, _GNAME = (257, 6), (263, 2), (265, 32), (297, 32)
_DEVMAJOR, _DEVMINOR = (329, 8), (337, 8)


def _octal(value: int, width: int) -> bytes:
    """libtar style: octal right-aligned in width-2 (8-byte fields) or width-1 chars + ' ' (+ NUL)."""
    digits = width - 2 if width == 8 else width - 1
    text = f"{value:o}".rjust(digits).encode("ascii")
    if len(text) > digits:
        raise FormatError(f"value {value} does not fit a {width}-byte tar field")
    return text + (b" \x00" if width == 8 else b" ")


def _put(block: bytearray, field: tuple[int, int], value: bytes) -> None:
    off, width = field
    if len(value) > width:
        raise FormatError(f"tar field too long: {value!r}")
    block[off : off + len(value)] = value


def _checksum(block: bytes | bytearray) -> tuple[int, int]:
    """(unsigned, signed) sums with the checksum field counted as spaces."""
    b = bytearray(block[:BLOCK])
    b[148:156] = b" " * 8
    unsigned = sum(b)
    signed = sum(x - 256 if x > 127 else x for x in b)
    return unsigned, signed


def _finish(block: bytearray) -> bytes:
    unsigned, _ = _checksum(block)
    _put(block, _CHKSUM, f"{unsigned:o}".rjust(6).encode("ascii") + b" \x00")
    return bytes(block)


def pax_record(key: str, value: str) -> bytes:
    """One PAX record "<len> key=value\\n" whose length counts itself."""
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode("ascii") + body


def wrap_prefix(payload_size: int, mode: int = DEFAULT_MODE) -> bytes:
    """The 1536 bytes before the payload."""
    record = pax_record("size", str(payload_size))
    pax = bytearray(BLOCK)
    _put(pax, _NAME, PAX_NAME)
    _put(pax, _SIZE, _octal(len(record), 12))
    _put(pax, _TYPE, b"x")
    _put(pax, _MAGIC, USTAR_MAGIC)
    _put(pax, _VERSION, USTAR_VERSION)
    entry = bytearray(BLOCK)
    _put(entry, _NAME, ENTRY_NAME)
    _put(entry, _MODE, _octal(mode, 8))
    _put(entry, _UID, _octal(0, 8))
    _put(entry, _GID, _octal(0, 8))
    _put(entry, _SIZE, _octal(0, 12))  # the real size is in the PAX record
    _put(entry, _MTIME, _octal(0, 12))
    _put(entry, _TYPE, b"0")
    _put(entry, _MAGIC, USTAR_MAGIC)
    _put(entry, _VERSION, USTAR_VERSION)
    _put(entry, _UNAME, b"root")
    _put(entry, _GNAME, b"root")
    return _finish(pax) + record.ljust(BLOCK, b"\x00") + _finish(entry)


def _go_octal(value: int, width: int) -> bytes:
    """Go archive/tar's formatOctal: zero-padded octal filling the field but its last byte, a NUL."""
    text = f"{value:o}".rjust(width - 1, "0").encode("ascii")
    if len(text) > width - 1:
        raise FormatError(f"value {value} does not fit a {width}-byte tar field")
    return text + b"\x00"


def go_wrap_prefix(payload_size: int, mode: int = 0o444) -> bytes:
    """The 512-byte header Go's `archive/tar` writes for `Header{Name: "overlaybd.commit", Mode:
    mode, Size: payload_size, Typeflag: TypeReg}` (USTAR, zero times and ids, empty names; the
    checksum is six octal digits, a NUL and a space). With `wrap_suffix` after the payload this is
    the reference convertor's `ext4_64.tar` byte for byte."""
    entry = bytearray(BLOCK)
    _put(entry, _NAME, ENTRY_NAME)
    _put(entry, _MODE, _go_octal(mode, 8))
    _put(entry, _UID, _go_octal(0, 8))
    _put(entry, _GID, _go_octal(0, 8))
    _put(entry, _SIZE, _go_octal(payload_size, 12))
    _put(entry, _MTIME, _go_octal(0, 12))
    _put(entry, _TYPE, b"0")
    _put(entry, _MAGIC, USTAR_MAGIC)
    _put(entry, _VERSION, USTAR_VERSION)
    _put(entry, _DEVMAJOR, _go_octal(0, 8))
    _put(entry, _DEVMINOR, _go_octal(0, 8))
    unsigned, _ = _checksum(entry)
    _put(entry, _CHKSUM, _go_octal(unsigned, 7) + b" ")
    return bytes(entry)


def wrap_suffix(payload_size: int) -> bytes:
    """Padding of the payload to 512 plus the two zero blocks that end the archive."""
    return bytes(-payload_size % BLOCK + 2 * BLOCK)


def _parse_number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 (Go's archive/tar uses it for large sizes)
        value = int.from_bytes(field, "big") & ~(0x80 << 8 * (len(field) - 1))
        return value
    text = field.split(b"\x00", 1)[0].strip(b" ")
    # Octal digits only: int() would also take a sign, "_" or inner spaces (a negative size, found
    # by tests/fuzz).
    if text.strip(b"01234567"):
        raise FormatError(f"bad octal number in tar header: {field!r}")
    return int(text, 8) if text else 0


def is_tar_header(block: bytes) -> bool:
    """`is_tar_file`: ustar magic, version "00" and a valid (unsigned or signed) checksum."""
    if len(block) < BLOCK or block[257:263] != USTAR_MAGIC or block[263:265] != USTAR_VERSION:
        return False
    try:
        stored = _parse_number(block[148:156])
    except FormatError:
        return False
    return stored in _checksum(block)


def unwrap(f: RandomAccess | BinaryIO | bytes | str | os.PathLike[str]) -> tuple[int, int] | None:
    """(payload offset, payload size) if `f` is a tar-wrapped blob, else None.

    Accepts both the tool's PAX form (payload at 1536, size from PAX) and the Go archive/tar form
    (one plain header, payload at 512).
    """
    src = as_source(f)
    first = src.pread(0, BLOCK)
    if not is_tar_header(first):
        return None
    typeflag = first[156:157]
    if typeflag == b"x":
        pax_len = _parse_number(first[124:136])
        data = src.pread(BLOCK, pax_len)
        if len(data) != pax_len:
            raise FormatError("tar wrapper: PAX record truncated")
        size = _pax_size(data)
        header_off = BLOCK + -(-pax_len // BLOCK) * BLOCK
        second = src.pread(header_off, BLOCK)
        if len(second) != BLOCK:
            raise FormatError("tar wrapper: entry header truncated")
        if size is None:
            size = _parse_number(second[124:136])
        return header_off + BLOCK, size
    if typeflag in (b"0", b"\x00", b"7"):
        return BLOCK, _parse_number(first[124:136])
    raise FormatError(f"tar wrapper: unexpected first entry type {typeflag!r}")


def _pax_size(data: bytes) -> int | None:
    pos = 0
    size: int | None = None
    while pos < len(data) and data[pos] != 0:
        sp = data.find(b" ", pos)
        if sp < 0:
            raise FormatError("tar wrapper: malformed PAX record")
        if not data[pos:sp].isdigit():
            raise FormatError("tar wrapper: malformed PAX record length")
        n = int(data[pos:sp])
        if n <= 0 or pos + n > len(data):
            raise FormatError("tar wrapper: PAX record length out of range")
        key, _, value = data[sp + 1 : pos + n - 1].partition(b"=")
        if key == b"size":
            if not value.isdigit():  # int() would take "-70" (a negative size, found by tests/fuzz)
                raise FormatError(f"tar wrapper: bad PAX size {value!r}")
            size = int(value)
        pos += n
    return size
