"""Write the seed corpus (tests/fuzz/corpus/<target>/) from obdconv's own writers and tarfile:
`python -m tests.fuzz.make_corpus`. Deterministic; every seed is a small valid (or nearly valid)
input that reaches deep into its parser, which is where mutations find defects."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

from obdconv.formats import tarwrap
from obdconv.formats.gzindex import MIN_SPAN, GzipIndexBuilder
from obdconv.formats.lsmt import SegmentMapping, commit, commit_header, commit_tail
from obdconv.formats.zfile import compress_zfile
from tests.fuzz.targets import CHUNKINGS, GZIP_BLOB

CORPUS = Path(__file__).resolve().parent / "corpus"
UUID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


def _tar(fmt: int, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue().rstrip(b"\0")
    return raw + bytes(-len(raw) % 512 + 1024)  # the end marker, without tarfile's 10 KiB record padding


def _info(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, **kw: object) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = 1_700_000_000
    info.mode = 0o644
    for k, v in kw.items():
        setattr(info, k, v)
    if data is not None:
        info.size = len(data)
    return info, data


def _raw_header(name: bytes, mode: int, typeflag: bytes = b"0") -> bytes:
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"%07o\x00" % mode
    block[108:116] = block[116:124] = b"%07o\x00" % 0
    block[124:136] = b"%011o\x00" % 0
    block[136:148] = b"%011o\x00" % 1_700_000_000
    block[156:157] = typeflag
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def tar_seeds() -> dict[str, bytes]:
    pax = _tar(tarfile.PAX_FORMAT, [
        _info("dir", tarfile.DIRTYPE, mode=0o755),
        _info("dir/file", data=bytes(range(256)) * 12),
        _info("dir/" + "long-name-" * 12, data=b"long"),
        _info("dir/sym", tarfile.SYMTYPE, linkname="file"),
        _info("dir/hard", tarfile.LNKTYPE, linkname="dir/file"),
        _info("dev", tarfile.CHRTYPE, devmajor=1, devminor=3),
        _info("fifo", tarfile.FIFOTYPE),
        _info("x", data=b"x", pax_headers={"SCHILY.xattr.user.a": "1", "mtime": "1700000000.123456789"}),
        _info("./a/../b", data=b""),
    ])
    gnu = _tar(tarfile.GNU_FORMAT, [_info("g/" + "n" * 150, data=b"gnu long name", uid=1 << 30),
                                    _info("g/link-" + "l" * 120, tarfile.SYMTYPE, linkname="t" * 130)])
    whiteouts = _tar(tarfile.USTAR_FORMAT, [
        _info("d/.wh..wh..opq", data=b""), _info("d/.wh.gone", data=b""), _info(".wh..wh.plnk/x", data=b"")])
    socket = _raw_header(b"app.sock", 0o140755) + _tar(tarfile.USTAR_FORMAT, [_info("after", data=b"a")])
    prefix = _tar(tarfile.USTAR_FORMAT, [_info("p" * 120 + "/" + "f" * 80, data=b"prefixed")])
    seeds = {"pax": pax, "gnu": gnu, "whiteouts": whiteouts, "socket": socket, "prefix": prefix,
             "empty": bytes(1024), "truncated": pax[:700]}
    # The first byte picks how the target cuts the tar into chunks (and, high bit, whether it fixes
    # header checksums up): each seed twice.
    out = {}
    for i, (name, tar) in enumerate(seeds.items()):
        for fix, k in ((0, i % len(CHUNKINGS)), (0x80, (i + 3) % len(CHUNKINGS))):
            out[f"{name}-chunk{CHUNKINGS[k]}{'-fixed' if fix else ''}"] = bytes([k | fix]) + tar
    return out


def lsmt_file() -> bytes:
    buf = io.BytesIO()
    commit({0: b"a" * 4096, 8192: b"b" * 512}, buf, zeroed=[(16384, 4096)], virtual_size=1 << 20, uuid=UUID)
    return buf.getvalue()


def warp_file() -> bytes:
    """A turboOCI fs.meta-like file: one tag-0 and one tag-1 (target) mapping."""
    data = b"m" * 512
    mappings = [SegmentMapping(0, 1, 8, tag=0), SegmentMapping(8, 2, 0, tag=1)]
    head = commit_header(1 << 20, UUID, None)
    return head + data + commit_tail(mappings, len(head) + len(data), 1 << 20, UUID, None, pad_index=False)


def gzip_meta() -> bytes:
    b = GzipIndexBuilder(span=MIN_SPAN, level=9)
    b.feed(GZIP_BLOB)
    return b.finish(len(GZIP_BLOB))


def blob(payload: bytes) -> bytes:
    return tarwrap.wrap_prefix(len(payload)) + payload + tarwrap.wrap_suffix(len(payload))


def main() -> None:
    lsmt = lsmt_file()
    zf_lsmt = compress_zfile(lsmt, "lz4", 4096)
    meta = gzip_meta()
    turbo = io.BytesIO()
    with tarfile.open(fileobj=turbo, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in (("ext4.fs.meta", compress_zfile(warp_file(), "lz4", 4096)), (".turbo.ociv1", b""),
                           ("gzip.meta", meta)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    corpus = {
        "tar_scanner": tar_seeds(),
        "lsmt": {"committed": lsmt, "warp": warp_file()},
        "zfile": {"lz4": compress_zfile(b"hello zfile " * 900, "lz4", 4096),
                  "zstd": compress_zfile(bytes(range(256)) * 40, "zstd", 4096), "empty": compress_zfile(b"", "lz4")},
        "tar_wrapper": {"pax": blob(b"p" * 700), "go": _tar(tarfile.USTAR_FORMAT, [_info("overlaybd.commit",
                                                                                         data=b"g" * 600)])},
        "gzip_index": {"meta": meta},
        "layer_blob": {"wrapped": blob(zf_lsmt), "zfile": zf_lsmt, "bare": lsmt},
        "inspect": {"blob": blob(zf_lsmt), "gzip-meta": meta,
                    "turbo": gzip.compress(turbo.getvalue(), mtime=0)},
    }
    for target, seeds in corpus.items():
        d = CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            if not old.name.startswith("regress-"):  # inputs of defects found are kept (README)
                old.unlink()
        for name, data in seeds.items():
            (d / name).write_bytes(data)


if __name__ == "__main__":
    main()
