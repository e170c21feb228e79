"""`obdconv inspect FILE [--json]`: describe an overlaybd layer blob, ZFile, LSMT file, turboOCI
layer (`turboOCIv1.tar.gz`) or `gzip.meta`. Malformed input raises FormatError (exit 65).

Only what is described is read: headers, trailers and indexes (of a gzip.meta, the header), never
a whole file or archive member, so a blob of gigabytes (or a small tar.gz whose members inflate to
gigabytes) costs a few megabytes of memory.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import tarfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from obdconv.errors import FormatError, NotFoundError
from obdconv.formats import gzindex, lsmt
from obdconv.formats.blob import open_payload
from obdconv.formats.source import FileSource, RandomAccess, source_size

Info = dict[str, Any]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("inspect", help="describe an overlaybd/turboOCI blob, ZFile, LSMT or gzip.meta",
                              description=__doc__)
    p.add_argument("file", help="the file to describe")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise NotFoundError(f"not a regular file: {path}" if path.exists() else f"no such file: {path}")
    with path.open("rb") as f:
        info = inspect_file(f, path.name)
    print(json.dumps(info, indent=2) if args.json else "\n".join(_text(info)))
    return 0


def inspect_bytes(data: bytes, name: str = "") -> Info:
    """`inspect_file` of a blob held in memory."""
    return inspect_file(io.BytesIO(data), name)


def inspect_file(f: BinaryIO, name: str = "", *, use_fd: bool = True) -> Info:
    """A JSON-able description of the seekable file `f` (dispatching on its magic). `use_fd=False`
    for a tar member's file object, whose `fileno()` is the archive's (see FileSource)."""
    src = FileSource(f, use_fd=use_fd)
    magic = src.pread(0, len(gzindex.MAGIC))
    if magic == gzindex.MAGIC:
        return {"file": name, "type": "gzip.meta", "gzip_meta": _gzip_meta(src)}
    if magic[:2] == b"\x1f\x8b":
        return {"file": name, "type": "turboOCI layer (tar.gz)", "members": _turbo_members(f)}
    return {"file": name, "type": "overlaybd layer", **inspect_layer(src)}


def inspect_layer(src: RandomAccess) -> Info:
    payload = open_payload(src)
    info: Info = {}
    if payload.tar is not None:
        info["tar_wrapper"] = {"payload_offset": payload.tar[0], "payload_size": payload.tar[1]}
    if payload.zfile is not None:
        z = payload.zfile
        info["zfile"] = {
            "header_flags": hex(z.header.flags),
            "trailer_flags": hex(z.trailer.flags) if z.trailer else None,
            "algorithm": z.info.algorithm,
            "block_size": z.block_size,
            "block_count": z.block_count,
            "original_size": z.size,
            "compressed_block_bytes": sum(z.lengths),
            "index_offset": z.info.index_offset,
            "verify": z.verify_crc,
        }
    # Header and trailer first, so that something other than LSMT is named by its magic (a file
    # smaller than one header block has no trailer to read: LSMTFile.open says it is too small).
    head = lsmt.LSMTHeader.unpack(payload.source.pread(0, lsmt.HT_SPACE))
    if payload.size >= lsmt.HT_SPACE:
        lsmt.LSMTHeader.unpack(payload.source.pread(payload.size - lsmt.HT_SPACE, lsmt.HT_SPACE), "LSMT trailer")
    # Opened as a warp file so the tags stay as written (a plain layer has only tag 0, and then the
    # two openings check the same things), and the index is read once, after its size is checked.
    f = lsmt.LSMTFile.open(payload.source, size=payload.size, warp=True)
    trailer = f.trailer
    assert trailer is not None  # LSMTFile.open requires a sealed trailer
    tags = collections.Counter(m.tag for m in f.mappings)
    zeroed = [m for m in f.mappings if m.zeroed]
    info["lsmt"] = {
        "size": payload.size,
        "header_flags": hex(head.flags),
        "trailer_flags": hex(trailer.flags),
        "uuid": f.uuid,
        "parent_uuid": f.parent_uuid,
        "virtual_size": f.virtual_size,
        "version": f"{head.version}.{head.sub_version}",
        "user_tag": f.user_tag.decode("utf-8", "replace"),
        "index_offset": trailer.index_offset,
        "index": {
            "entries": len(f.mappings),
            "padding": f.index_padding,
            "zeroed": len(zeroed),
            "tags": {str(k): v for k, v in sorted(tags.items())},
            "mapped_bytes": sum(m.length for m in f.mappings if not m.zeroed) * lsmt.SECTOR,
            "zeroed_bytes": sum(m.length for m in zeroed) * lsmt.SECTOR,
        },
    }
    return info


def _gzip_meta(src: RandomAccess) -> Info:
    h = gzindex.GzipIndexHeader.read(src, source_size(src))
    return {"version": f"{h.major}.{h.minor}", "span": h.span, "access_points": h.index_num,
            "gzip_file_size": h.gzip_file_size, "uncompressed_size": h.uncompress_file_size,
            "dict_compress_algo": h.dict_compress_algo, "index_file_size": h.index_file_size}


def _turbo_members(f: BinaryIO) -> list[Info]:
    # "r:gz" (not the stream mode "r|gz") so a member's file object can seek: gzip decodes forward
    # from the start again for a backward seek, a few passes at most, in bounded memory.
    try:
        f.seek(0)
        tf = tarfile.open(fileobj=f, mode="r:gz")
        members: list[Info] = []
        with tf:
            for m in tf:
                entry: Info = {"name": m.name, "size": m.size}
                if m.isfile() and m.name.lstrip("./") in ("ext4.fs.meta", "erofs.fs.meta", "gzip.meta"):
                    fobj = tf.extractfile(m)
                    assert fobj is not None
                    entry["content"] = inspect_file(fobj, m.name, use_fd=False)
                members.append(entry)
        return members
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise FormatError(f"not a readable tar.gz: {e}") from e


def _text(info: Info, indent: str = "") -> list[str]:
    out: list[str] = []
    for key, value in info.items():
        if isinstance(value, dict):
            out.append(f"{indent}{key}:")
            out += _text(value, indent + "  ")
        elif isinstance(value, list):
            out.append(f"{indent}{key}:")
            for item in value:
                out += _text(item, indent + "  - ") if isinstance(item, dict) else [f"{indent}  - {item}"]
        else:
            out.append(f"{indent}{key}: {value}")
    return out
