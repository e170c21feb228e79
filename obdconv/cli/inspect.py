"""`obdconv inspect FILE [--json]`: describe an overlaybd layer blob, ZFile, LSMT file, turboOCI
layer (`turboOCIv1.tar.gz`) or `gzip.meta`. Malformed input raises FormatError (exit 65)."""

from __future__ import annotations

import argparse
import collections
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from obdconv.errors import FormatError, NotFoundError
from obdconv.formats import gzindex, lsmt
from obdconv.formats.blob import open_payload
from obdconv.formats.source import BytesSource, RandomAccess

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
    info = inspect_bytes(path.read_bytes(), path.name)
    print(json.dumps(info, indent=2) if args.json else "\n".join(_text(info)))
    return 0


def inspect_bytes(data: bytes, name: str = "") -> Info:
    """A JSON-able description of `data` (dispatching on its magic)."""
    if data[:8] == gzindex.MAGIC:
        return {"file": name, "type": "gzip.meta", "gzip_meta": _gzip_meta(data)}
    if data[:2] == b"\x1f\x8b":
        return {"file": name, "type": "turboOCI layer (tar.gz)", "members": _turbo_members(data)}
    return {"file": name, "type": "overlaybd layer", **inspect_layer(BytesSource(data))}


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
    head = lsmt.LSMTHeader.unpack(payload.source.pread(0, lsmt.HT_SPACE))
    trailer = lsmt.LSMTHeader.unpack(payload.source.pread(payload.size - lsmt.HT_SPACE, lsmt.HT_SPACE),
                                     "LSMT trailer")
    raw_index = payload.source.pread(trailer.index_offset, trailer.index_size * lsmt.SegmentMapping.SIZE)
    tags = collections.Counter(m.tag for m in lsmt.unpack_index(raw_index) if not m.is_invalid)
    f = lsmt.LSMTFile.open(payload.source, size=payload.size, warp=bool(set(tags) - {0}))
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


def _gzip_meta(data: bytes) -> Info:
    idx = gzindex.GzipIndex.parse(data)
    h = idx.header
    return {"version": f"{h.major}.{h.minor}", "span": h.span, "access_points": h.index_num,
            "gzip_file_size": h.gzip_file_size, "uncompressed_size": h.uncompress_file_size,
            "dict_compress_algo": h.dict_compress_algo, "index_file_size": h.index_file_size}


def _turbo_members(data: bytes) -> list[Info]:
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
        members: list[Info] = []
        with tf:
            for m in tf.getmembers():
                entry: Info = {"name": m.name, "size": m.size}
                if m.isfile() and m.name.lstrip("./") in ("ext4.fs.meta", "erofs.fs.meta", "gzip.meta"):
                    fobj = tf.extractfile(m)
                    assert fobj is not None
                    entry["content"] = inspect_bytes(fobj.read(), m.name)
                members.append(entry)
        return members
    except (tarfile.TarError, EOFError, OSError) as e:
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
