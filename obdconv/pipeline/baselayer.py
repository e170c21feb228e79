"""The overlaybd base layer of `--mkfs=false` (spec reference-convertor.md §3.9).

Without mkfs the image's filesystem is not made in layer 0: every layer stacks on the empty ext4
filesystem the overlaybd package installs at `/opt/overlaybd/baselayers/ext4_64` (a sealed, ZFile'd
LSMT of a 64 GiB device), and the output carries that file as its first layer:

* native: tar-wrapped the way the reference's Go code wraps it (one ustar header, mode 0444), so
  the blob is byte for byte the reference's `ext4_64.tar` (a file that is tar-wrapped already is
  used as it is: the runtime unwraps one tar, not two);
* turboOCI: the raw file, under the descriptor the reference hard-codes (`TURBO_BASE_DIGEST`,
  `TURBO_BASE_SIZE`). Only the file with that digest can back it: another one would make the
  descriptor lie, so turboOCI is then refused (see `turbo_base_problem`).

The metadata pass continues from the base layer exactly as it continues from converted parents
(`Ext4Builder.load_parents`: its ext4 metadata only, never a file's bytes, nor its journal's), and
no byte of a converted layer is written into it: the base stays the file it is.

A conversion pins the file's digest when it starts (`resolve_base_layer`); each machine taking part
checks that its own file at the same path has that digest (`load_base_layer(expected_digest=...)`),
so a worker holding another file fails naming both digests instead of making other bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from obdconv.errors import BadInputError, FormatError, IntegrityError, NotFoundError, ObdconvError
from obdconv.ext4 import libext2fs as L
from obdconv.formats.blob import open_layer_blob
from obdconv.formats.lsmt import LSMTFile, LSMTStack
from obdconv.formats.tarwrap import go_wrap_prefix, unwrap, wrap_suffix
from obdconv.pipeline.annotations import layer_annotations, layer_media_type
from obdconv.pipeline.assemble import ConvertedLayer
from obdconv.pipeline.parents import ParentDevice
from obdconv.request import ConversionRequest

log = logging.getLogger(__name__)

DEFAULT_BASE_LAYER = "/opt/overlaybd/baselayers/ext4_64"
# The turboOCI engine's hard-coded base layer descriptor (spec reference-convertor.md §3.9).
TURBO_BASE_DIGEST = "sha256:c3a417552a6cf9ffa959b541850bab7d7f08f4255425bf8b48c85f7b36b378d9"
TURBO_BASE_SIZE = 4737695
GIB = 1 << 30
READ_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class BaseLayer:
    """A base layer file, checked and hashed: the raw file and its tar-wrapped (native) form."""

    path: str
    digest: str  # sha256 of the file as installed (= its turbo blob)
    size: int
    native_digest: str  # sha256 of the tar-wrapped file (= its native blob and diff_id)
    native_size: int
    virtual_size: int  # bytes of the block device it holds
    wrapped: bool = False  # the file is tar-wrapped already: its native blob is the file itself

    @property
    def vsize_gb(self) -> int:
        return self.virtual_size // GIB

    def open(self) -> LSMTFile:
        """The base layer as an LSMT file (reads the file on demand; the handle closes with it)."""
        return open_layer_blob(self.path)

    def device(self) -> ParentDevice:
        """The base layer alone as the device a metadata pass starts from."""
        return ParentDevice(LSMTStack([self.open()]))

    def converted(self, fmt: str, oci: bool) -> ConvertedLayer:
        """The output's first layer for format `fmt` ("native" or "turbo")."""
        if fmt == "native":
            digest, size = self.native_digest, self.native_size
        else:
            digest, size = TURBO_BASE_DIGEST, TURBO_BASE_SIZE
        # Both are uncompressed-tar typed and annotated as native layers (spec §4.1, §4.2), the
        # turbo one too; the blob's digest is its diff_id (it is not compressed).
        return ConvertedLayer(digest, size, layer_media_type("native", oci), digest,
                              layer_annotations("native", digest, size))

    def chunks(self, fmt: str) -> Iterator[bytes]:
        """The blob of format `fmt`: the file tar-wrapped (native) or as it is (turbo)."""
        wrap = fmt == "native" and not self.wrapped
        if wrap:
            yield go_wrap_prefix(self.size)
        with open(self.path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                yield chunk
        if wrap:
            yield wrap_suffix(self.size)


_cache: dict[tuple[str, int, int, int, int], BaseLayer] = {}
_cache_lock = threading.Lock()


def load_base_layer(path: str, expected_digest: str = "", where: str = "this machine") -> BaseLayer:
    """Check and hash the base layer at `path` (once per file version in a process). Raises
    NotFoundError when it is missing, FormatError when it is not an overlaybd layer holding an
    ext4 filesystem, IntegrityError when `expected_digest` is given and the file differs."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFoundError(f"base layer {path}: no such file (--mkfs=false stacks the image on the base layer "
                            "the overlaybd package installs; install it there or give --base-layer PATH)") from None
    except OSError as e:
        raise BadInputError(f"base layer {path}: {e.strerror or e}") from None
    if not os.path.isfile(path):
        raise BadInputError(f"base layer {path}: not a regular file")
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _cache_lock:
        base = _cache.get(key)
    if base is None:
        base = _load(path, st.st_size)
        with _cache_lock:
            _cache[key] = base
    if expected_digest and base.digest != expected_digest:
        raise IntegrityError(f"base layer {path} on {where} has digest {base.digest}, but the conversion "
                             f"uses {expected_digest}: every machine converting it must hold the same file there")
    return base


def _load(path: str, size: int) -> BaseLayer:
    try:
        layer = open_layer_blob(path)
    except (ObdconvError, OSError, ValueError) as e:
        raise FormatError(f"base layer {path} is not an overlaybd layer: {e}") from None
    try:
        superblock = layer.pread(L.SUPERBLOCK_OFFSET, 1024)
    except (ObdconvError, OSError) as e:
        raise FormatError(f"base layer {path} is not an overlaybd layer: {e}") from None
    if len(superblock) < 1024 or int.from_bytes(superblock[L.SB_MAGIC:L.SB_MAGIC + 2], "little") != L.EXT2_SUPER_MAGIC:
        raise FormatError(f"base layer {path} is an overlaybd layer without an ext4 filesystem")
    if layer.virtual_size % GIB:
        raise FormatError(f"base layer {path}: virtual size {layer.virtual_size} is not a whole number of GiB")
    try:
        is_wrapped = unwrap(path) is not None
    except (ObdconvError, OSError) as e:
        raise FormatError(f"base layer {path} is not an overlaybd layer: {e}") from None
    raw, wrapped = hashlib.sha256(), hashlib.sha256()
    prefix, suffix = (b"", b"") if is_wrapped else (go_wrap_prefix(size), wrap_suffix(size))
    wrapped.update(prefix)
    seen = 0
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            raw.update(chunk)
            wrapped.update(chunk)
            seen += len(chunk)
    if seen != size:
        raise BadInputError(f"base layer {path} changed while it was read ({seen} bytes, expected {size})")
    wrapped.update(suffix)
    return BaseLayer(path, "sha256:" + raw.hexdigest(), size, "sha256:" + wrapped.hexdigest(),
                     len(prefix) + size + len(suffix), layer.virtual_size, is_wrapped)


def resolve_base_layer(request: ConversionRequest, where: str = "this machine"
                       ) -> tuple[ConversionRequest, BaseLayer | None]:
    """The request with its base layer pinned (path, digest) and its vsize set to the base layer's
    (as the reference, which ignores --vsize without mkfs), and the base layer; unchanged and None
    with mkfs."""
    if request.mkfs:
        return request, None
    path = request.base_layer or DEFAULT_BASE_LAYER
    base = load_base_layer(path, request.base_layer_digest, where)
    if request.vsize_gb != base.vsize_gb:
        log.warning("--vsize %d has no effect with --mkfs=false: the base layer's filesystem is %d GB",
                    request.vsize_gb, base.vsize_gb)
    return replace(request, base_layer=path, base_layer_digest=base.digest, vsize_gb=base.vsize_gb), base


def base_layer_of(request: ConversionRequest, where: str = "this machine") -> BaseLayer | None:
    """On a machine taking part in a conversion whose base layer is pinned: this machine's file,
    checked against the pinned digest (None with mkfs). `where` names the machine in errors."""
    if request.mkfs:
        return None
    return load_base_layer(request.base_layer or DEFAULT_BASE_LAYER, request.base_layer_digest, where)


def turbo_base_problem(base: BaseLayer) -> str:
    """Why this base layer cannot back a turboOCI image ("" when it can)."""
    if base.digest == TURBO_BASE_DIGEST and base.size == TURBO_BASE_SIZE:
        return ""
    return (f"turboOCI images name their base layer by a fixed descriptor ({TURBO_BASE_DIGEST}, {TURBO_BASE_SIZE} "
            f"bytes, as the reference convertor writes it); the base layer {base.path} is {base.digest} "
            f"({base.size} bytes)")


def push_base_layer(target_repo: Any, base: BaseLayer, fmt: str, *, oci: bool, upload: bool) -> ConvertedLayer:
    """The base layer of format `fmt` as the output's first layer, uploaded unless the target
    repository has it already (or `upload` is False)."""
    layer = base.converted(fmt, oci)
    if upload and target_repo.head_blob(layer.digest) is None:
        digest, _ = target_repo.upload_blob(base.chunks(fmt), size=layer.size)
        if digest != layer.digest:
            raise IntegrityError(f"base layer {base.path} uploaded as {digest}, expected {layer.digest} "
                                 "(the file changed while it was sent?)")
    return layer


def with_base(base_layer: ConvertedLayer | None, layers: Sequence[ConvertedLayer]) -> list[ConvertedLayer]:
    """`layers` with the base layer (if any) in front: the output manifest's layer list."""
    return ([base_layer] if base_layer is not None else []) + list(layers)
