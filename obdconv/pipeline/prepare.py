"""Stage 1, prepare: one streaming pass over one source layer blob (DESIGN §2).

    open_blob (sha256 verified at EOF) -> sniff compression by magic -> decompress
    -> sha256 of the tar = diff_id -> TarScanner (entries; file bytes into the data area)
    -> native: data area compressed into ZFile blocks as it streams

For turbo + gzip the `GzipIndexBuilder` is the decompressor, so `gzip.meta` is built in the same
pass. Memory is bounded by the read-ahead, the queues between the threads and the compression
window; no layer is held whole.

The pass uses every core its process may run on (`prepare_threads()`): the blob is read and
hashed in one thread, inflated in this one, the tar hashed and scanned in two more (`Fanout`: the
inflated pieces are shared), the data area compressed on a pool and written in order
(`BlockStream`). The entry rows are encoded part by part as the scan finds them, and with
`entry_stream` also appended to that file, so a metadata pass can follow the layer (entrystream.py).
Output bytes do not depend on the number of threads.

Output goes to a spool directory keyed by the source digest, algorithm and block size, written
under a temporary name and renamed into place only after the blob's digest verified (a corrupt
blob leaves nothing behind). A spool that already holds what is asked for is reused, so any
image sharing the layer skips the download -- after `check_prepared` found every file as prepare
wrote it (`spoolcheck`); a spool that fails is discarded with a warning and prepared again.

Spool files:
    prepared.json       the `PreparedLayer` (without `spool`), sealed with its own sha256; `files`
                        lists the small files below with size and sha256
    entries.json.zst    [LayerEntry.to_list(), ...] (zstd-compressed JSON)
    blocks.bin          native: the compressed ZFile blocks of the data area, each + its CRC32C,
                        from byte `blocks_offset` (room for the output blob's head: inplace.py)
    lengths.u32         native: little-endian u32 length of each block in blocks.bin
    gzip.meta           turbo + gzip source: the gzip random-access index
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from obdconv.entries import LayerEntry
from obdconv.errors import BadInputError, IntegrityError, UnsupportedError
from obdconv.formats.gzindex import GzipIndexBuilder, MultiMemberGzip
from obdconv.formats.rawbytes import byte_view
from obdconv.formats.zfile import BlockStream
from obdconv.gcpause import gc_paused
from obdconv.leftovers import hold, release
from obdconv.oci.decompress import Decompressor, sniff
from obdconv.oci.tarscan import TarScanner
from obdconv.pipeline import spoolcheck
from obdconv.pipeline.entrystream import EntryRows, EntryStreamWriter, decode_rows
from obdconv.pipeline.fanout import Fanout, ReadAhead
from obdconv.pipeline.writeback import WritebackFile

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
SNIFF_BYTES = 512
COMPRESS_BATCH = 1 << 20  # data-area bytes handed to the block compressor at once
STREAM_PART = 2048  # entries per part of the entry list encoded (and streamed) while scanning
GZIP_INDEX_SPAN = 1 << 20  # the access-point spacing turboOCI-apply uses (spec §5)
# zlib level of the 32 KiB windows in gzip.meta: level 1 compresses them ~2.7x faster than the
# reference's 6 for ~6% bigger windows (the header records the level; readers only inflate).
GZIP_INDEX_LEVEL = 1
# Bump when the spool layout or a spooled file's bytes change, so old spools are not misread or
# reused into different output (2: gzip.meta windows at GZIP_INDEX_LEVEL 1 instead of 6; 3:
# prepared.json sealed and listing the files' sizes and hashes, checked before reuse; 4: blocks.bin
# may start with room for the output blob's head, `blocks_offset`).
SPOOL_FORMAT = 4
PREP_PREFIX = ".prep-"  # a spool being written (flock'ed by its writer)
OLD_PREFIX = ".old-"  # a replaced spool being removed

ProgressFn = Callable[[int, int], None]  # (bytes read, total bytes)


@dataclass(slots=True)
class PreparedLayer:
    """What prepare learned about one source layer, and where its spool is (JSON-serialisable)."""

    source_digest: str
    source_size: int
    source_media_type: str
    compression: str  # "gzip" | "zstd" | "none", sniffed from the bytes
    diff_id: str  # sha256 of the uncompressed tar
    tar_size: int
    entry_count: int
    native: bool  # data area blocks present
    turbo: bool  # gzip.meta present when compression == "gzip"
    algorithm: str
    block_size: int
    data_area_size: int  # padded to block_size
    block_count: int
    compressed_size: int  # bytes of blocks in blocks.bin
    spool: str = ""
    spool_format: int = SPOOL_FORMAT
    blocks_offset: int = 0  # where the blocks start in blocks.bin (the room left in front: inplace.py)
    files: dict[str, list[Any]] = field(default_factory=dict)  # spool file -> [size, sha256] (not blocks.bin)

    @property
    def path(self) -> Path:
        return Path(self.spool)

    @property
    def entries_path(self) -> Path:
        return self.path / "entries.json.zst"

    @property
    def blocks_path(self) -> Path:
        return self.path / "blocks.bin"

    @property
    def lengths_path(self) -> Path:
        return self.path / "lengths.u32"

    @property
    def gzip_meta_path(self) -> Path | None:
        return self.path / "gzip.meta" if self.turbo and self.compression == "gzip" else None

    def load_entries(self) -> list[LayerEntry]:
        return load_entries(self.entries_path)

    def block_lengths(self) -> list[int]:
        return spoolcheck.read_lengths(self.lengths_path, self.block_count)

    def covers(self, *, native: bool, turbo: bool) -> bool:
        return (self.native or not native) and (self.turbo or not turbo)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreparedLayer:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def load_entries(path: Path) -> list[LayerEntry]:
    return decode_rows(zstandard.ZstdDecompressor().decompress(path.read_bytes()))


def spool_key(source_digest: str, algorithm: str, block_size: int) -> str:
    algo, _, hexpart = source_digest.partition(":")
    return f"{algo}-{hexpart}.{algorithm}-{block_size}"


def save_prepared(spool: Path, prepared: PreparedLayer) -> None:
    (spool / "prepared.json").write_text(json.dumps(spoolcheck.seal(prepared.to_dict())))


def load_prepared(spool_dir: Path, source_digest: str, algorithm: str, block_size: int) -> PreparedLayer | None:
    """The spool for this layer if a complete one of this format exists (its files unchecked: see
    `reuse_prepared`). A prepared.json that is not what prepare wrote counts as none, with a warning."""
    final = Path(spool_dir) / spool_key(source_digest, algorithm, block_size)
    try:
        raw = (final / "prepared.json").read_bytes()
    except OSError:
        return None
    try:
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise ValueError("not an object")
    except (ValueError, RecursionError):
        log.warning("prepared layer %s: prepared.json is not JSON; preparing the layer again", final)
        return None
    if d.get("spool_format") != SPOOL_FORMAT:
        return None
    problem = spoolcheck.unseal(d)
    if problem is not None:
        log.warning("prepared layer %s: %s; preparing the layer again", final, problem)
        return None
    prepared = PreparedLayer.from_dict(d)
    prepared.spool = str(final)
    return prepared


def check_prepared(prepared: PreparedLayer) -> str | None:
    """None when the spool's files are what prepare wrote (sizes, hashes, every block's CRC)."""
    problem = spoolcheck.check_files(prepared.path, prepared.files)
    if problem is None and prepared.native:
        try:
            lengths = prepared.block_lengths()
        except (OSError, EOFError) as e:
            return f"lengths.u32: {e}"
        problem = spoolcheck.check_blocks(prepared.blocks_path, lengths, prepared.compressed_size,
                                          prepared.blocks_offset)
    return problem


def reuse_prepared(spool_dir: Path, source_digest: str, algorithm: str, block_size: int) -> PreparedLayer | None:
    """`load_prepared`, then `check_prepared`: a spool that fails is discarded (with a warning naming
    what is wrong) and None returned, so the layer is prepared again and never published corrupt."""
    prepared = load_prepared(spool_dir, source_digest, algorithm, block_size)
    if prepared is None:
        return None
    problem = check_prepared(prepared)
    if problem is None:
        return prepared
    log.warning("prepared layer %s is corrupt (%s): discarding it and preparing the layer again",
                prepared.spool, problem)
    discard_spool(prepared.path)
    return None


def discard_spool(path: Path) -> None:
    """Remove a spool directory; renamed first, so no reader sees it half deleted (to the name the
    fleet's spool eviction uses, so it cleans up after a crash here too)."""
    doomed = path.with_name(f".evict-{path.name}-{os.getpid()}")
    try:
        os.rename(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


class DataAreaBlocks:
    """The TarScanner's data sink for native layers: the data area, compressed into ZFile blocks of
    `block_size` as it streams (on `threads` threads, see `BlockStream`) and appended to `out`."""

    def __init__(self, out: BinaryIO, algorithm: str, block_size: int, threads: int = 1) -> None:
        self.stream = BlockStream(out, algorithm, block_size, threads)
        self.block_size = block_size
        self.batch = max(COMPRESS_BATCH // block_size, 1) * block_size
        # Batch buffers, filled by slice assignment (most files are small, so most bytes pass
        # through one) and recycled once their batch is compressed: a fresh bytearray per batch
        # cost reallocs and page faults.
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self.buffer = bytearray(self.batch)
        self.view = memoryview(self.buffer)
        self.fill = 0

    @property
    def lengths(self) -> list[int]:
        return self.stream.lengths

    @property
    def compressed_size(self) -> int:
        return self.stream.compressed_size

    def write(self, data: bytes | memoryview) -> None:
        # Whole batches are compressed straight from the caller's buffer when it cannot change
        # (tar members arrive as slices of large decompressed bytes); only the bytes that do not
        # fill a batch are copied.
        fill = self.fill
        n = len(data)
        if fill + n < self.batch and type(data) is memoryview and data.format == "B" and data.ndim == 1:
            # The common case (a small file, or the zero padding after one): one copy, no batch ends.
            self.view[fill : fill + n] = data
            self.fill = fill + n
            return
        mv = byte_view(data)
        n = len(mv)
        batch = self.batch
        if fill:
            take = min(batch - fill, n)
            self.view[fill:fill + take] = mv[:take]
            fill += take
            if fill < batch:
                self.fill = fill
                return
            self._submit_buffer(batch)
            mv = mv[take:]
            n -= take
        whole = n - n % batch
        if whole and isinstance(mv.obj, bytes):
            self.stream.submit(mv[:whole])  # the view keeps the (immutable) bytes alive
        else:
            for o in range(0, whole, batch):  # a mutable buffer the caller may reuse: copy it
                self.view[:] = mv[o:o + batch]
                self._submit_buffer(batch)
        rest = n - whole
        if rest:
            self.view[:rest] = mv[whole:]
        self.fill = rest

    def _submit_buffer(self, size: int) -> None:
        """Hand the filled batch buffer to the stream and continue in another one."""
        buffer = self.buffer
        self.stream.submit(self.view[:size], partial(self._free.put, buffer))
        try:
            self.buffer = self._free.get_nowait()
        except queue.Empty:
            self.buffer = bytearray(self.batch)
        self.view = memoryview(self.buffer)
        self.fill = 0

    def finish(self) -> int:
        """Pad the area to a block_size multiple (so every block is full), wait until every block
        is written; returns the area's size."""
        if self.fill:
            end = self.fill + (-self.fill % self.block_size)
            self.view[self.fill:end] = bytes(end - self.fill)
            self._submit_buffer(end)
        self.stream.close()
        return self.stream.raw_size

    def abort(self) -> None:
        self.stream.abort()

    def write_lengths(self, path: Path) -> None:
        lengths = array.array("I", self.lengths)
        if sys.byteorder != "little":
            lengths.byteswap()
        with open(path, "wb") as f:
            lengths.tofile(f)


def _inflater(kind: str, gzip_index: GzipIndexBuilder | None
              ) -> tuple[Callable[[bytes], Iterable[bytes | memoryview]], Callable[[], bytes]]:
    """(feed, finish) of the decompressor for `kind`: the gzip index builder when it is making
    gzip.meta (it inflates as it indexes; its pieces are views of its buffers), otherwise the oci module's streaming Decompressor
    (`feed_iter` yields bounded pieces, so a highly compressible chunk cannot blow up memory)."""
    if gzip_index is not None:
        return gzip_index.feed_pieces, (lambda: b"")
    dec = Decompressor(kind)
    return dec.feed_iter, dec.finish


def prepare_layer(
    repo: Any,
    layer_descriptor: dict[str, Any],
    spool_dir: str | os.PathLike[str],
    *,
    native: bool,
    turbo: bool,
    algorithm: str = "lz4",
    block_size: int = 4096,
    progress: ProgressFn | None = None,
    entry_stream: str | os.PathLike[str] | None = None,
    head_room: int = 0,
    early_writeback: bool = False,
) -> PreparedLayer:
    """Prepare one layer (or reuse its spool). Raises IntegrityError on a digest mismatch (nothing
    is left in the spool), UnsupportedError for a zstd layer asked for turbo. With `entry_stream`
    the entries also go to that file as the scan finds them (see entrystream.py; nothing is
    written there when the spool is reused). `head_room` > 0 (native): the blocks start that far
    into blocks.bin, leaving room for the output blob's head, so that the blob can be finished in
    place and stored without a copy (inplace.py). `early_writeback` (with `head_room`): the blocks
    go to disk as they are written (writeback.py), for a caller that stores the blob right after
    this prepare, so that its fsync finds little left to write."""
    digest = layer_descriptor["digest"]
    spool_dir = Path(spool_dir)
    existing = reuse_prepared(spool_dir, digest, algorithm, block_size)
    if existing is not None:
        if existing.covers(native=native, turbo=turbo):
            if turbo and existing.compression == "zstd":
                raise turbo_zstd_error(digest)
            return existing
        native, turbo = native or existing.native, turbo or existing.turbo
    spool_dir.mkdir(parents=True, exist_ok=True)
    final = spool_dir / spool_key(digest, algorithm, block_size)
    tmp = Path(tempfile.mkdtemp(prefix=PREP_PREFIX, dir=spool_dir))
    lock = hold(tmp)  # marks it as being written: a later run removes it only once this process is gone
    try:
        prepared = _stream(repo, layer_descriptor, tmp, native=native, turbo=turbo, algorithm=algorithm,
                           block_size=block_size, progress=progress, entry_stream=entry_stream,
                           head_room=head_room if native else 0, early_writeback=early_writeback)
        save_prepared(tmp, prepared)
        _install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        release(lock)
    prepared.spool = str(final)
    return prepared


def _check_descriptor_size(desc: dict[str, Any], size: int) -> None:
    """The blob is what its digest says; a descriptor giving another size is a broken manifest
    (registries and runtimes check it: the converted image would carry it on)."""
    if "size" in desc and desc["size"] != size:
        raise BadInputError(f"layer {desc['digest']}: the manifest's descriptor says {desc['size']} bytes, "
                            f"the blob has {size}")


def turbo_zstd_error(digest: str) -> UnsupportedError:
    return UnsupportedError(f"layer {digest} is zstd-compressed: turboOCI needs gzip or uncompressed "
                            "layers (the runtime reads file data from the original blob)")


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished spool into place; replace an older (smaller) one atomically enough:
    readers only ever see a complete directory or none."""
    try:
        os.rename(tmp, final)
        return
    except OSError:
        pass
    old = final.with_name(f"{OLD_PREFIX}{final.name}-{os.getpid()}")
    with contextlib.suppress(OSError):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _raise_if_corrupt(read: Callable[[], bytes], error: Exception) -> None:
    """A blob that does not decompress or parse may simply be corrupt: read it to the end so the
    digest check runs, and report the IntegrityError (the real cause) instead."""
    try:
        while read():
            pass
    except IntegrityError as integrity:
        raise integrity from error


def prepare_threads() -> int:
    """Threads one prepare uses: $OBDCONV_PREPARE_THREADS, else every core this process may run
    on (its CPU affinity, so a worker pinned to some cores, or a container's cpuset, is honoured).
    1 runs the whole pass in the calling thread."""
    try:
        return max(1, int(os.environ["OBDCONV_PREPARE_THREADS"]))
    except (KeyError, ValueError):
        pass
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _stream(repo: Any, desc: dict[str, Any], tmp: Path, *, native: bool, turbo: bool, algorithm: str,
            block_size: int, progress: ProgressFn | None,
            entry_stream: str | os.PathLike[str] | None = None, head_room: int = 0,
            early_writeback: bool = False) -> PreparedLayer:
    """The pass over one blob. With more than one thread: this thread reads and inflates; the
    tar's sha256 and the tar scan each run in a thread of their own (`Fanout`: the inflated bytes
    are shared, not copied) and the scan's data area is compressed on a pool (`BlockStream`).
    The scan encodes the entry rows part by part as it finds entries (and streams them)."""
    stream = EntryStreamWriter(entry_stream) if entry_stream else None
    try:
        with gc_paused():  # the entries: many objects, no cycles (gcpause.py)
            prepared, rows = _pass(repo, desc, tmp, native=native, turbo=turbo, algorithm=algorithm,
                                   block_size=block_size, progress=progress, stream=stream, head_room=head_room,
                                   early_writeback=early_writeback)
    except BaseException:
        if stream is not None:
            stream.discard()
        raise
    rows.save(tmp / "entries.json.zst")
    prepared.files = {name: spoolcheck.file_record(tmp / name) for name in ("entries.json.zst", "lengths.u32",
                                                                              "gzip.meta") if (tmp / name).exists()}
    if stream is not None:
        stream.end()
    return prepared


def _pass(repo: Any, desc: dict[str, Any], tmp: Path, *, native: bool, turbo: bool, algorithm: str,
          block_size: int, progress: ProgressFn | None,
          stream: EntryStreamWriter | None, head_room: int = 0,
          early_writeback: bool = False) -> tuple[PreparedLayer, EntryRows]:
    digest = desc["digest"]
    total = int(desc.get("size") or 0)
    tar_hash = hashlib.sha256()
    source_size = 0
    threads = prepare_threads()
    with open(tmp / "blocks.bin", "wb") as blocks_file, repo.open_blob(digest) as blob, \
            contextlib.ExitStack() as stack:
        blocks_out: BinaryIO = blocks_file
        if head_room:
            blocks_file.truncate(head_room)  # a hole, also when no block follows (an empty layer)
            blocks_file.seek(head_room)
            if early_writeback:
                blocks_out = WritebackFile(blocks_file)
        head = blob.read(READ_CHUNK)
        # The blob's reads (and the digest check they include) run beside the inflate.
        read = stack.enter_context(ReadAhead(blob, READ_CHUNK)).read if threads > 1 \
            else partial(blob.read, READ_CHUNK)
        kind = sniff(head[:SNIFF_BYTES]) if head else "none"
        if turbo and kind == "zstd":
            raise turbo_zstd_error(digest)
        gzip_index = GzipIndexBuilder(span=GZIP_INDEX_SPAN, level=GZIP_INDEX_LEVEL) if turbo and kind == "gzip" else None
        feed, flush = _inflater(kind, gzip_index)
        sink = DataAreaBlocks(blocks_out, algorithm, block_size, threads) if native else None
        scanner = TarScanner(data_sink=sink)
        rows = EntryRows()
        next_part = STREAM_PART

        def take_entries() -> None:
            new = scanner.pop_entries()
            if new:
                raw = rows.add(new)
                if stream is not None:
                    stream.write(raw)

        def scan(piece: bytes | memoryview) -> None:
            nonlocal next_part
            scanner.feed(piece)
            if len(scanner.entries) >= next_part:
                take_entries()
                next_part = len(scanner.entries) + STREAM_PART

        fanout: Fanout[bytes | memoryview] = Fanout([tar_hash.update, scan], threaded=threads > 1, name="prepare")

        def consume(tar_bytes: bytes | memoryview) -> None:
            if tar_bytes:
                fanout.put(tar_bytes)

        chunk = head
        try:
            try:
                while chunk:
                    source_size += len(chunk)
                    for piece in feed(chunk):
                        consume(piece)
                    if progress is not None:
                        progress(source_size, total)
                    chunk = read()
                # EOF reached: the verifying reader has checked the digest by now.
                _check_descriptor_size(desc, source_size)
                consume(flush())
                fanout.close()
                # The gzip index finishes first: a truncated gzip blob is then reported as such, not as
                # the truncated tar it decompresses to (the Decompressor's flush above does the same).
                gzip_meta = gzip_index.finish(source_size) if gzip_index is not None else None
                entries = scanner.finish()
                if len(entries) > rows.count:
                    take_entries()
            except BadInputError as e:
                if isinstance(e, IntegrityError):
                    raise
                fanout.abort()
                _raise_if_corrupt(read, e)
                if isinstance(e, MultiMemberGzip):
                    raise UnsupportedError(f"layer {digest} cannot be converted to turboOCI: {e}") from e
                raise
            data_area = sink.finish() if sink is not None else 0
        except BaseException:
            fanout.abort()
            if sink is not None:
                sink.abort()
            raise
    if sink is not None:
        if data_area != -(-scanner.data_area_size // block_size) * block_size:
            raise BadInputError(f"layer {digest}: data area is {data_area} bytes, tar scan says "
                                f"{scanner.data_area_size}")
        sink.write_lengths(tmp / "lengths.u32")
    else:
        (tmp / "lengths.u32").write_bytes(b"")
    if gzip_meta is not None:
        (tmp / "gzip.meta").write_bytes(gzip_meta)
    return PreparedLayer(
        source_digest=digest,
        source_size=source_size,
        source_media_type=desc.get("mediaType", ""),
        compression=kind,
        diff_id="sha256:" + tar_hash.hexdigest(),
        tar_size=scanner.tar_size,
        entry_count=len(entries),
        native=native,
        turbo=turbo,
        algorithm=algorithm,
        block_size=block_size,
        data_area_size=data_area,
        block_count=len(sink.lengths) if sink is not None else 0,
        compressed_size=sink.compressed_size if sink is not None else 0,
        blocks_offset=head_room,
    ), rows
