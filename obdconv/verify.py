"""Read a converted overlaybd / overlaybd-turboOCI image back and compare it with its source image.

`verify_image` checks, per platform present in both images:
  * manifest and config media types, and that every layer carries the overlaybd annotations
    (version, blob-digest == descriptor digest, blob-size == size; turbo: target-digest and
    target-media-type describing the source layer blob);
  * every blob's sha256 and size (config, layers, turbo target blobs);
  * blob structure: native = tar wrapper -> ZFile (CRC of every block) -> LSMT (header, trailer and
    index rules); turbo = `turboOCIv1.tar.gz` with `ext4.fs.meta` (a ZFile'd LSMT warp file),
    `.turbo.ociv1`, and `gzip.meta` exactly when the source layer is gzip;
  * config `rootfs.diff_ids` (native: the blob digest; turbo: sha256 of the uncompressed tar);
  * LSMT uuid / parent uuid chaining: reported as a warning only, since the runtime never checks it
    (spec overlaybd-format.md §1.8);
  * turbo `gzip.meta`: its sizes match the target blob, and reading through EVERY access point
    (input position, bit offset, window) gives the bytes of the sequentially inflated tar;
  * the filesystem: the LSMT stack (turbo: warp layers whose tag-1 entries read from the source
    layer's tar, the inflated blob for gzip sources — equal to reads through the just-checked
    index, without inflating up to a 1 MiB span per small file) is flattened to a sparse raw image, checked with
    `e2fsck -fn`, read back (userspace through libext2fs, or mounted with `mount -o loop,ro`), and
    compared with the source layers applied in order: type, mode, owner, size, content, symlink
    target, device numbers, xattrs, hard-link grouping and mtime.

The source image is always named explicitly (`source_ref`): a native image keeps no link to its
source at all, and a turbo image's target digests name the source *layers* but not the source
config or manifest, so requiring it keeps the two formats symmetric and the comparison explicit.

Nothing here raises on a mismatch: everything found goes into the returned `VerifyReport`
(`.ok`, `.format_text()`, `.to_dict()`); `raise_for_report` turns a failed report into a
`VerificationFailed` (a BadInputError, exit code 65).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from obdconv.errors import BadInputError, IntegrityError, ObdconvError, UnsupportedError
from obdconv.ext4.reader import tree_from_ext4
from obdconv.formats.blob import open_payload
from obdconv.formats.gzindex import GzipIndex, GzipRandomReader
from obdconv.formats.lsmt import LSMTFile, LSMTStack
from obdconv.formats.source import FileSource
from obdconv.oci.decompress import Decompressor
from obdconv.oci.tree import tree_from_directory, tree_from_tar_layers
from obdconv.registry import open_repository
from obdconv.registry.options import RegistryOptions
from obdconv.registry.reference import parse_reference
from obdconv.registry.repository import Repository
from obdconv.tree import Tree, diff_trees

log = logging.getLogger(__name__)

# Media types and annotation keys are spelled out here from the spec (reference-convertor.md §4.1,
# §4.2) instead of being imported from the writer's modules: a verifier sharing the writer's
# constants could not catch a typo in them.
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)

ANNOTATION_PREFIX = "containerd.io/snapshot/overlaybd"
ANN_VERSION = f"{ANNOTATION_PREFIX}/version"
ANN_BLOB_DIGEST = f"{ANNOTATION_PREFIX}/blob-digest"
ANN_BLOB_SIZE = f"{ANNOTATION_PREFIX}/blob-size"
ANN_TARGET_DIGEST = f"{ANNOTATION_PREFIX}/turbo-oci/target-digest"
ANN_TARGET_MEDIA_TYPE = f"{ANNOTATION_PREFIX}/turbo-oci/target-media-type"
NATIVE_VERSION = "0.1.0"
TURBO_VERSION = "0.1.0-turbo.ociv1"

# Members of a turbo layer archive (spec reference-convertor.md §3.6).
TURBO_FS_META = "ext4.fs.meta"
TURBO_MARKER = ".turbo.ociv1"
TURBO_GZIP_INDEX = "gzip.meta"

NULL_UUID = "00000000-0000-0000-0000-000000000000"
COPY_CHUNK = 1 << 20

ERROR, WARNING, INFO = "error", "warning", "info"


class VerificationFailed(BadInputError):
    """The converted image does not match its source or breaks a format rule (see the report)."""
    def __init__(self, message: str, report: VerifyReport) -> None:
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------------------------------------- report


@dataclass(slots=True)
class Finding:
    """One observation. `where` names the object ("manifest", "config", "layer 2", "filesystem")."""
    severity: str  # ERROR, WARNING or INFO
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


@dataclass(slots=True)
class FsckResult:
    """`e2fsck -fn` on the flattened image. status: "clean", "known-quirk", "errors" or "not-run"."""
    status: str
    exit_code: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("clean", "known-quirk")


@dataclass(slots=True)
class PlatformReport:
    platform: str
    manifest_digest: str
    source_manifest_digest: str
    format: str = ""  # "overlaybd" or "turbo"
    layers: int = 0
    findings: list[Finding] = field(default_factory=list)
    fsck: FsckResult = field(default_factory=lambda: FsckResult("not-run"))
    tree_diff: list[str] = field(default_factory=list)
    entries_compared: int = 0
    filesystem_compared: bool = False

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def ok(self) -> bool:
        return not self.errors and not self.tree_diff and self.filesystem_compared and self.fsck.ok

    def add(self, severity: str, where: str, message: str) -> None:
        self.findings.append(Finding(severity, where, message))


@dataclass(slots=True)
class VerifyReport:
    ref: str
    source_ref: str
    method: str  # "userspace" or "mount"
    platforms: list[PlatformReport] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)  # image-level (index, platform matching)

    @property
    def ok(self) -> bool:
        return (bool(self.platforms) and all(p.ok for p in self.platforms)
                and not any(f.severity == ERROR for f in self.findings))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        for pd, p in zip(d["platforms"], self.platforms, strict=True):
            pd["ok"] = p.ok
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def format_text(self, max_diff_lines: int = 200) -> str:
        lines = [f"verify {self.ref} against {self.source_ref} ({self.method}): {'OK' if self.ok else 'FAILED'}"]
        lines += [f"  {f}" for f in self.findings]
        for p in self.platforms:
            lines.append(f"platform {p.platform}: {p.format or '?'} image {p.manifest_digest}, {p.layers} layer(s), "
                         f"source {p.source_manifest_digest}: {'OK' if p.ok else 'FAILED'}")
            lines += [f"  {f}" for f in p.findings]
            if p.fsck.status == "known-quirk":
                lines.append("  fsck: only the reference mkfs's known lost+found HTREE quirk "
                             "(not a failure): " + "; ".join(p.fsck.problems))
            elif p.fsck.status == "errors":
                lines.append(f"  fsck: e2fsck -fn exit {p.fsck.exit_code}:")
                lines += [f"    {line}" for line in p.fsck.problems]
            else:
                lines.append(f"  fsck: {p.fsck.status}")
            if p.filesystem_compared:
                lines.append(f"  filesystem: {p.entries_compared} paths compared, {len(p.tree_diff)} difference(s)")
                lines += [f"    {d}" for d in p.tree_diff[:max_diff_lines]]
                if len(p.tree_diff) > max_diff_lines:
                    lines.append(f"    ... {len(p.tree_diff) - max_diff_lines} more")
            else:
                lines.append("  filesystem: not compared (see errors above)")
        return "\n".join(lines)


def raise_for_report(report: VerifyReport) -> None:
    """Raise VerificationFailed (exit code 65) naming the first problems when the report is not ok."""
    if report.ok:
        return
    problems: list[str] = [str(f) for f in report.findings if f.severity == ERROR]
    for p in report.platforms:
        problems += [f"{p.platform}: {f}" for f in p.errors]
        if p.fsck.status == "errors":
            problems.append(f"{p.platform}: e2fsck: {'; '.join(p.fsck.problems[:3])}")
        problems += [f"{p.platform}: {d}" for d in p.tree_diff[:5]]
    if not report.platforms:
        problems.append("no platform was verified")
    more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
    raise VerificationFailed("converted image does not verify: " + "; ".join(problems[:5]) + more, report)


# ---------------------------------------------------------------------------------------------- fsck

# The reference toolchain's mkfs leaves the HTREE index flag on lost+found (inode 11); e2fsck reports
# exactly these lines for it. Anything else is a real problem.
_FSCK_QUIRK_LINES = (
    re.compile(r"^Problem in HTREE directory inode 11: block #\d+ not referenced$"),
    re.compile(r"^Invalid HTREE directory inode 11 \(/lost\+found\)\.\s+Clear HTree index\? no$"),
)
_FSCK_NOISE = (
    re.compile(r"^e2fsck \d"),
    re.compile(r"^Pass \d[A-Z]?: "),
    re.compile(r"^.*: \d+/\d+ files \(.*\), \d+/\d+ blocks$"),
    re.compile(r"^.*: \*+ WARNING: Filesystem still has errors \*+$"),
)


def classify_fsck_output(exit_code: int, output: str) -> FsckResult:
    """Turn `e2fsck -fn` output into a result: clean, only the known reference quirk, or errors."""
    problems = [line.strip() for line in output.splitlines()
                if line.strip() and not any(p.match(line.strip()) for p in _FSCK_NOISE)]
    if exit_code == 0 and not problems:
        return FsckResult("clean", 0, [])
    # Exit 4 = errors left uncorrected (-n); anything else (8 = operational error, ...) is never a quirk.
    if exit_code == 4 and problems and all(any(q.match(p) for q in _FSCK_QUIRK_LINES) for p in problems) \
            and any(_FSCK_QUIRK_LINES[1].match(p) for p in problems):
        return FsckResult("known-quirk", exit_code, problems)
    return FsckResult("errors", exit_code, problems or [f"e2fsck exited {exit_code} with no message"])


def run_fsck(image_path: str | Path) -> FsckResult:
    """`e2fsck -fn` (force a full check, change nothing) on a raw image."""
    if shutil.which("e2fsck") is None:
        raise UnsupportedError("e2fsck not found: install e2fsprogs to verify filesystems")
    proc = subprocess.run(["e2fsck", "-fn", str(image_path)], capture_output=True, text=True,
                          errors="replace")
    return classify_fsck_output(proc.returncode, proc.stdout + proc.stderr)


# ---------------------------------------------------------------------------------------------- helpers


def _short(digest: str) -> str:
    return digest[:19]


def _descriptor_str(desc: dict[str, Any], key: str) -> str:
    v = desc.get(key)
    return v if isinstance(v, str) else ""


def platform_key(p: dict[str, Any] | None) -> str:
    """"os/arch[/variant]", with arm64's default variant v8 dropped so both spellings match."""
    if not p:
        return "unknown"
    os_, arch, variant = p.get("os", ""), p.get("architecture", ""), p.get("variant", "")
    if arch == "arm64" and variant == "v8":
        variant = ""
    return f"{os_}/{arch}" + (f"/{variant}" if variant else "")


def _normalise_platform_arg(p: str) -> str:
    parts = p.split("/")
    return platform_key({"os": parts[0], "architecture": parts[1] if len(parts) > 1 else "",
                         "variant": parts[2] if len(parts) > 2 else ""})


def _is_attestation(entry: dict[str, Any]) -> bool:
    ann = entry.get("annotations") or {}
    return ann.get("vnd.docker.reference.type") == "attestation-manifest" or \
        platform_key(entry.get("platform")) == "unknown/unknown"


class Spool:
    """Blobs fetched to local files (LSMT and gzip readers need random access), each once, by digest."""
    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[str, Path] = {}

    def fetch(self, repo: Repository, digest: str, size: int | None) -> Path:
        """Download `digest` from `repo`, checking sha256 and size. Raises ObdconvError on mismatch."""
        if digest in self.paths:
            return self.paths[digest]
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest or ""):
            raise BadInputError(f"invalid blob digest {digest!r}")
        path = self.root / digest.split(":", 1)[1]
        h = hashlib.sha256()
        n = 0
        with repo.open_blob(digest) as src, open(path, "wb") as out:
            while chunk := src.read(COPY_CHUNK):
                h.update(chunk)
                n += len(chunk)
                out.write(chunk)
        actual = "sha256:" + h.hexdigest()
        if actual != digest:
            raise IntegrityError(f"content has sha256 {actual}, not {digest}")
        if size is not None and n != size:
            raise IntegrityError(f"blob is {n} bytes, descriptor says {size}")
        self.paths[digest] = path
        return path


def _fetch_json(repo: Repository, spool: Spool, desc: dict[str, Any], report: PlatformReport, where: str) -> dict | None:
    digest = _descriptor_str(desc, "digest")
    try:
        path = spool.fetch(repo, digest, desc.get("size"))
        return json.loads(path.read_bytes())
    except ObdconvError as e:
        report.add(ERROR, where, f"blob {_short(digest)}: {e}")
    except ValueError as e:
        report.add(ERROR, where, f"blob {_short(digest)} is not JSON: {e}")
    return None


def _sniff_compression(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


def _expected_target_media_type(source_media_type: str, compression: str) -> str:
    """Spec §3.7: Docker family iff the source layer type is a Docker one; gzip iff sniffed gzip."""
    docker = source_media_type.startswith("application/vnd.docker.")
    if compression == "gzip":
        return DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
    return DOCKER_LAYER if docker else OCI_LAYER


# ---------------------------------------------------------------------------------------------- manifests


@dataclass(slots=True)
class _ImagePair:
    """One platform to verify: converted manifest (+digest) and source manifest (+digest)."""
    platform: str
    manifest: dict[str, Any]
    manifest_media_type: str
    manifest_digest: str
    source_manifest: dict[str, Any]
    source_digest: str


def _load(repo: Repository, ref: str) -> tuple[dict[str, Any], str, str]:
    m = repo.get_manifest(ref)
    try:
        obj = json.loads(m.data)
    except ValueError as e:
        raise BadInputError(f"manifest {ref} is not JSON: {e}") from e
    media_type = obj.get("mediaType") or m.media_type
    return obj, media_type, m.digest


def _children(repo: Repository, index: dict[str, Any]) -> dict[str, tuple[dict[str, Any], str, str]]:
    out: dict[str, tuple[dict[str, Any], str, str]] = {}
    for entry in index.get("manifests") or []:
        if _is_attestation(entry):
            continue
        key = platform_key(entry.get("platform"))
        obj, mt, digest = _load(repo, _descriptor_str(entry, "digest"))
        if mt in INDEX_TYPES:
            continue  # nested indexes carry no platform of their own (spec §4.5); not verified
        out.setdefault(key, (obj, mt, digest))
    return out


def _config_platform(repo: Repository, manifest: dict[str, Any]) -> str:
    desc = manifest.get("config") or {}
    try:
        with repo.open_blob(_descriptor_str(desc, "digest")) as f:
            cfg = json.loads(f.read())
        return platform_key({"os": cfg.get("os", ""), "architecture": cfg.get("architecture", ""),
                             "variant": cfg.get("variant", "")})
    except (ObdconvError, ValueError):
        return "unknown"


def pair_platforms(converted: Repository, ref: str, source: Repository, source_ref: str, platform: str | None,
                   findings: list[Finding]) -> list[_ImagePair]:
    """Match the converted image's platforms with the source's (a manifest or an index on each side)."""
    conv, conv_mt, conv_digest = _load(converted, ref)
    src, src_mt, src_digest = _load(source, source_ref)
    if conv_mt in INDEX_TYPES:
        conv_by = _children(converted, conv)
    else:
        conv_by = {_config_platform(converted, conv): (conv, conv_mt, conv_digest)}
    if src_mt in INDEX_TYPES:
        src_by = _children(source, src)
    else:
        src_by = {_config_platform(source, src): (src, src_mt, src_digest)}
    if conv_mt not in INDEX_TYPES and src_mt not in INDEX_TYPES:
        # Two single manifests: compare them whatever their configs say.
        only_key = next(iter(conv_by))
        src_by = {only_key: next(iter(src_by.values()))}
    wanted = _normalise_platform_arg(platform) if platform else None
    pairs: list[_ImagePair] = []
    for key in sorted(conv_by):
        if wanted and key != wanted:
            continue
        if key not in src_by:
            findings.append(Finding(ERROR, "index", f"platform {key} is in the converted image but not in the source"))
            continue
        c, cmt, cd = conv_by[key]
        s, _smt, sd = src_by[key]
        pairs.append(_ImagePair(key, c, cmt, cd, s, sd))
    for key in sorted(set(src_by) - set(conv_by)):
        if not wanted or key == wanted:
            findings.append(Finding(INFO, "index", f"source platform {key} has no converted manifest (not verified)"))
    if wanted and not pairs:
        findings.append(Finding(ERROR, "index", f"platform {platform} is not present in both images"))
    return pairs


# ---------------------------------------------------------------------------------------------- layers


@dataclass(slots=True)
class _SourceLayer:
    media_type: str
    digest: str
    path: Path | None
    compression: str = "none"


def base_layer_count(pair: _ImagePair, flattened: bool = False) -> int:
    """1 when the converted image starts with a base layer the source lacks (`--mkfs=false`: the
    reference prepends its ext4 base layer, annotated as a native layer, spec §4.2), else 0. A
    `flattened` image has one layer of its own, so a second one below it is the base."""
    layers = pair.manifest.get("layers") or []
    converted = 1 if flattened else len(pair.source_manifest.get("layers") or [])
    if len(layers) == converted + 1 and layers:
        if (layers[0].get("annotations") or {}).get(ANN_VERSION) == NATIVE_VERSION:
            return 1
    return 0


# The history entry `obdconv convert --flatten` appends to a flattened image's config.
FLATTEN_CREATED_BY = "obdconv convert --flatten"


def flattened_config(config: dict[str, Any] | None) -> bool:
    """The config of an image made with `--flatten` (its last history entry says so)."""
    history = (config or {}).get("history")
    return isinstance(history, list) and bool(history) and isinstance(history[-1], dict) \
        and history[-1].get("created_by") == FLATTEN_CREATED_BY


def flattened(fmt: str, converted_layers: int, source_layers: int) -> bool:
    """An overlaybd image of one layer for several source layers: made with `--flatten`, its one
    layer holds the whole filesystem (checked against every source layer applied in order)."""
    return fmt == "overlaybd" and converted_layers == 1 and source_layers > 1


def check_manifest_types(pair: _ImagePair, report: PlatformReport, base: int = 0) -> tuple[str, str]:
    """Media types of manifest and config; returns (family "oci"|"docker", layer format)."""
    m = pair.manifest
    mt = pair.manifest_media_type
    if mt == OCI_MANIFEST:
        family, want_config = "oci", OCI_CONFIG
    elif mt == DOCKER_MANIFEST:
        family, want_config = "docker", DOCKER_CONFIG
    else:
        report.add(ERROR, "manifest", f"media type {mt!r} is not an OCI or Docker schema 2 image manifest")
        family, want_config = "oci", OCI_CONFIG
    if m.get("schemaVersion") != 2:
        report.add(ERROR, "manifest", f"schemaVersion is {m.get('schemaVersion')!r}, expected 2")
    config_mt = _descriptor_str(m.get("config") or {}, "mediaType")
    if config_mt != want_config:
        report.add(ERROR, "manifest", f"config media type {config_mt!r}, expected {want_config!r} for a {family} manifest")
    versions = {(layer.get("annotations") or {}).get(ANN_VERSION, "") for layer in (m.get("layers") or [])[base:]}
    if versions == {NATIVE_VERSION}:
        fmt = "overlaybd"
    elif versions == {TURBO_VERSION}:
        fmt = "turbo"
    else:
        report.add(ERROR, "manifest", f"layer {ANN_VERSION} annotations are {sorted(versions)!r}; expected all "
                   f"{NATIVE_VERSION!r} (overlaybd) or all {TURBO_VERSION!r} (turbo)")
        fmt = "turbo" if TURBO_VERSION in versions else "overlaybd"
    return family, fmt


def check_layer_annotations(i: int, desc: dict[str, Any], family: str, fmt: str, source: _SourceLayer | None,
                            report: PlatformReport) -> None:
    where = f"layer {i}"
    ann = desc.get("annotations") or {}
    digest, size, mt = _descriptor_str(desc, "digest"), desc.get("size"), _descriptor_str(desc, "mediaType")
    want_mt = {("oci", "overlaybd"): OCI_LAYER, ("docker", "overlaybd"): DOCKER_LAYER,
               ("oci", "turbo"): OCI_LAYER_GZIP, ("docker", "turbo"): DOCKER_LAYER_GZIP}[(family, fmt)]
    if mt != want_mt:
        report.add(ERROR, where, f"media type {mt!r}, expected {want_mt!r}")
    if ann.get(ANN_BLOB_DIGEST) != digest:
        report.add(ERROR, where, f"annotation {ANN_BLOB_DIGEST} is {ann.get(ANN_BLOB_DIGEST)!r}, "
                   f"descriptor digest is {digest!r}")
    if ann.get(ANN_BLOB_SIZE) != str(size):
        report.add(ERROR, where, f"annotation {ANN_BLOB_SIZE} is {ann.get(ANN_BLOB_SIZE)!r}, "
                   f"descriptor size is {size!r}")
    if fmt != "turbo":
        for key in (ANN_TARGET_DIGEST, ANN_TARGET_MEDIA_TYPE):
            if key in ann:
                report.add(ERROR, where, f"annotation {key} on a non-turbo layer")
        return
    target = ann.get(ANN_TARGET_DIGEST)
    if not target:
        report.add(ERROR, where, f"annotation {ANN_TARGET_DIGEST} is missing")
    elif source is not None and target != source.digest:
        report.add(ERROR, where, f"annotation {ANN_TARGET_DIGEST} is {target}, but source layer {i} is {source.digest}")
    if source is not None and source.path is not None:
        want = _expected_target_media_type(source.media_type, source.compression)
        if ann.get(ANN_TARGET_MEDIA_TYPE) != want:
            report.add(ERROR, where, f"annotation {ANN_TARGET_MEDIA_TYPE} is {ann.get(ANN_TARGET_MEDIA_TYPE)!r}, "
                       f"expected {want!r} for source blob {_short(source.digest)} ({source.compression})")


def open_native_layer(i: int, path: Path, report: PlatformReport) -> LSMTFile | None:
    """tar wrapper -> ZFile (every block CRC checked) -> LSMT; None (with an error finding) if invalid."""
    where = f"layer {i}"
    try:
        payload = open_payload(FileSource(path))
        if payload.tar is None:
            report.add(INFO, where, "no tar wrapper (the runtime also accepts a bare ZFile/LSMT)")
        if payload.zfile is not None:
            payload.zfile.verify()
        else:
            report.add(WARNING, where, "payload is not ZFile-compressed (the reference always compresses)")
        return LSMTFile.open(payload.source, None, payload.size)
    except ObdconvError as e:
        report.add(ERROR, where, f"blob structure: {e}")
    return None


def open_turbo_layer(i: int, path: Path, source: _SourceLayer | None, spool: Spool, report: PlatformReport,
                     diff_id: str | None) -> LSMTFile | None:
    """Check a `turboOCIv1.tar.gz` and open its fs meta as a warp LSMT over the source layer blob."""
    where = f"layer {i}"
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        report.add(ERROR, where, f"turbo layer blob is not gzip: {e}")
        return None
    tar_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    if diff_id is not None and diff_id != tar_digest:
        report.add(ERROR, "config", f"rootfs.diff_ids[{i}] is {diff_id}, but the uncompressed turbo tar of "
                   f"layer {i} is {tar_digest}")
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            members = {m.name.removeprefix("./"): (m, tar.extractfile(m).read() if m.isreg() else b"")  # type: ignore[union-attr]
                       for m in tar.getmembers()}
    except tarfile.TarError as e:
        report.add(ERROR, where, f"turbo layer is not a tar: {e}")
        return None
    if TURBO_FS_META not in members:
        other = [n for n in members if n.endswith(".fs.meta")]
        if other:
            report.add(ERROR, where, f"{other[0]}: only ext4 turbo layers can be verified ({UnsupportedError.__name__})")
        else:
            report.add(ERROR, where, f"turbo archive has no {TURBO_FS_META} (members: {sorted(members)})")
        return None
    if TURBO_MARKER not in members:
        report.add(WARNING, where, f"turbo archive has no {TURBO_MARKER} marker (the reference always writes it)")
    elif members[TURBO_MARKER][1]:
        report.add(WARNING, where, f"{TURBO_MARKER} is not empty")
    if source is None or source.path is None:
        report.add(ERROR, where, "no source layer blob to read file data from")
        return None
    gz_meta = members.get(TURBO_GZIP_INDEX)
    if source.compression == "gzip" and gz_meta is None:
        report.add(ERROR, where, f"source layer is gzip but the turbo archive has no {TURBO_GZIP_INDEX}")
        return None
    if source.compression == "none" and gz_meta is not None:
        report.add(WARNING, where, f"{TURBO_GZIP_INDEX} present for an uncompressed source layer (unused)")
    if source.compression not in ("gzip", "none"):
        report.add(ERROR, where, f"source layer compression {source.compression} cannot back a turbo layer")
        return None
    meta_path = spool.root / f"turbo-{i}-{TURBO_FS_META}"
    meta_path.write_bytes(members[TURBO_FS_META][1])
    try:
        target: Any
        if source.compression == "gzip":
            index = GzipIndex.parse(gz_meta[1])  # type: ignore[index]
            blob_size = source.path.stat().st_size
            if index.header.gzip_file_size != blob_size:  # the runtime rejects the pair (spec §5)
                report.add(ERROR, where, f"{TURBO_GZIP_INDEX} is for a {index.header.gzip_file_size}-byte gzip, "
                           f"the target blob is {blob_size} bytes")
                return None
            tar_path = spool.root / f"turbo-{i}-target.tar"
            if not check_gzip_index(GzipRandomReader(FileSource(source.path), index, readahead=0),
                                    source.path, tar_path, report, where):
                return None
            # Every access point of the index was just checked against the sequentially inflated
            # tar, so reading file data from that tar gives exactly what reads through the index
            # give, without re-inflating up to a span (1 MiB) per small file, which makes big
            # images take hours.
            target = FileSource(tar_path)
        else:
            target = FileSource(source.path)
        payload = open_payload(FileSource(meta_path))
        if payload.zfile is not None:
            payload.zfile.verify()
        return LSMTFile.open(payload.source, target, payload.size)
    except ObdconvError as e:
        report.add(ERROR, where, f"{TURBO_FS_META}: {e}")
    return None


def inflate_to(blob: Path, out_path: Path) -> int:
    """Sequentially decompress a gzip blob (all members) to `out_path`; returns the size."""
    d = Decompressor("gzip")
    n = 0
    with open(blob, "rb") as f, open(out_path, "wb") as out:
        while chunk := f.read(COPY_CHUNK):
            for piece in d.feed_iter(chunk):
                out.write(piece)
                n += len(piece)
        tail = d.finish()
        out.write(tail)
        n += len(tail)
    return n


def check_gzip_index(reader: Any, blob: Path, tar_path: Path, report: PlatformReport, where: str) -> bool:
    """`gzip.meta` against the blob: the indexed size is the whole tar, and reading through every
    access point (window, bit offset, input position) yields the tar's bytes at that offset."""
    try:
        size = inflate_to(blob, tar_path)
    except ObdconvError as e:
        report.add(ERROR, where, f"target blob does not inflate: {e}")
        return False
    indexed = reader.index.header.uncompress_file_size
    if indexed != size:
        report.add(ERROR, where, f"{TURBO_GZIP_INDEX} indexes {indexed} uncompressed bytes, the target "
                   f"blob inflates to {size} (more than one gzip member?)")
        return False
    with open(tar_path, "rb") as tar:
        for n, entry in enumerate(reader.index.entries):
            length = min(4096, size - entry.de_pos)
            if length <= 0:
                continue
            tar.seek(entry.de_pos)
            try:
                got = reader.pread(entry.de_pos, length)
            except ObdconvError as e:
                got = f"error: {e}".encode()
            if got != tar.read(length):
                report.add(ERROR, where, f"{TURBO_GZIP_INDEX} access point {n} (uncompressed offset "
                           f"{entry.de_pos}) does not read back the target's bytes")
                return False
    return True


def check_uuid_chain(layers: list[LSMTFile], report: PlatformReport) -> None:
    """parent_uuid[k] == uuid[k-1]; reported, never failed: the runtime does not check it (§1.8)."""
    broken: list[str] = []
    for k, layer in enumerate(layers):
        want_parent = layers[k - 1].uuid if k else NULL_UUID
        if str(layer.parent_uuid).upper() != str(want_parent).upper():
            broken.append(f"layer {k} parent_uuid {layer.parent_uuid} != "
                          f"{f'layer {k - 1} uuid' if k else 'null'} {want_parent}")
    if broken:
        report.add(WARNING, "uuid chain", "LSMT uuid/parent uuid chain is not consistent (informational: the "
                   "overlaybd runtime does not check it): " + "; ".join(broken))


# ---------------------------------------------------------------------------------------------- filesystem


@contextmanager
def mounted(image: Path, mountpoint: Path) -> Iterator[Path]:
    """`mount -o loop,ro`; always unmounted (the loop device is auto-cleared with it)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "ext4", "-o", "loop,ro,noload", str(image), str(mountpoint)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BadInputError(f"mount -o loop,ro {image} failed: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            # Busy (e.g. a scanner still has a file open): detach lazily so nothing stays mounted.
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def read_tree(image: Path, mount: bool, workdir: Path) -> Tree:
    if mount:
        with mounted(image, workdir / "mnt") as root:
            return tree_from_directory(root)

    return tree_from_ext4(image)


def _drop_lost_found(actual: Tree, expected: Tree) -> Tree:
    """mkfs creates lost+found; ignore it unless the source image has one too."""
    if "lost+found" in expected:
        return actual
    return {p: e for p, e in actual.items() if p != "lost+found" and not p.startswith("lost+found/")}


def compare_filesystem(layers: list[LSMTFile], source_layers: list[_SourceLayer], report: PlatformReport,
                       workdir: Path, mount: bool) -> None:
    image = workdir / "flat.img"
    t0 = time.monotonic()
    try:
        LSMTStack(layers).flatten_to(image)
    except (ObdconvError, OSError) as e:
        report.add(ERROR, "filesystem", f"cannot read the layer stack: {e}")
        return
    t1 = time.monotonic()
    report.fsck = run_fsck(image)
    t2 = time.monotonic()
    try:
        try:
            expected = tree_from_tar_layers([s.path for s in source_layers if s.path is not None])
        except ObdconvError as e:
            report.add(ERROR, "source", f"cannot read the source layers: {e}")
            return
        try:
            actual = _drop_lost_found(read_tree(image, mount, workdir), expected)
        except ObdconvError as e:
            report.add(ERROR, "filesystem", f"cannot read the converted filesystem: {e}")
            return
    finally:
        image.unlink(missing_ok=True)
    log.info("%s: flatten %.1f s, e2fsck %.1f s, trees %.1f s", report.platform, t1 - t0, t2 - t1,
             time.monotonic() - t2)
    report.tree_diff = diff_trees(expected, actual)
    report.entries_compared = len(set(expected) | set(actual))
    report.filesystem_compared = True


# ---------------------------------------------------------------------------------------------- driver


def verify_platform(converted: Repository, source: Repository, pair: _ImagePair, workdir: Path, mount: bool) -> PlatformReport:
    report = PlatformReport(pair.platform, pair.manifest_digest, pair.source_digest)
    spool = Spool(workdir)
    # read first: a flattened image's config says so, which tells a base layer below its one layer
    config = _fetch_json(converted, spool, pair.manifest.get("config") or {}, report, "config")
    flat_marked = flattened_config(config)
    base = base_layer_count(pair, flat_marked)
    family, fmt = check_manifest_types(pair, report, base)
    report.format = fmt
    layers_desc: list[dict[str, Any]] = list(pair.manifest.get("layers") or [])
    src_desc: list[dict[str, Any]] = list(pair.source_manifest.get("layers") or [])
    report.layers = len(layers_desc)
    if base:
        report.add(INFO, "layer 0", "base layer (converted with --mkfs=false): stacked below the others, "
                   "matched with no source layer")
    flat = flat_marked or flattened(fmt, len(layers_desc) - base, len(src_desc))
    if flat:
        report.add(INFO, f"layer {base}", f"flattened (--flatten): one layer holds the filesystem of the "
                   f"{len(src_desc)} source layers, compared with all of them applied in order")
    if len(layers_desc) != (1 if flat else len(src_desc)) + base:
        report.add(ERROR, "manifest", f"{len(layers_desc)} converted layers for {len(src_desc)} source layers")

    diff_ids: list[str] | None = None
    if config is not None:
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        if len(diff_ids) != len(layers_desc):
            report.add(ERROR, "config", f"rootfs.diff_ids has {len(diff_ids)} entries for {len(layers_desc)} layers")
            diff_ids = None

    sources: list[_SourceLayer] = []
    for j, d in enumerate(src_desc):
        s = _SourceLayer(_descriptor_str(d, "mediaType"), _descriptor_str(d, "digest"), None)
        try:
            s.path = spool.fetch(source, s.digest, d.get("size"))
            s.compression = _sniff_compression(s.path)
        except ObdconvError as e:
            report.add(ERROR, f"source layer {j}", f"blob {_short(s.digest)}: {e}")
        sources.append(s)

    opened: list[LSMTFile | None] = []
    for i, desc in enumerate(layers_desc):
        is_base = i < base
        layer_fmt = "overlaybd" if is_base else fmt
        src = None if is_base or flat or i - base >= len(sources) else sources[i - base]
        check_layer_annotations(i, desc, family, layer_fmt, src, report)
        digest = _descriptor_str(desc, "digest")
        try:
            path = spool.fetch(converted, digest, desc.get("size"))
        except ObdconvError as e:
            report.add(ERROR, f"layer {i}", f"blob {_short(digest)}: {e}")
            opened.append(None)
            continue
        if layer_fmt == "turbo":
            target_digest = (desc.get("annotations") or {}).get(ANN_TARGET_DIGEST, "")
            if src is not None and target_digest and target_digest != src.digest:
                # Read the data where the runtime would: the blob the annotation names.
                try:
                    tpath = spool.fetch(converted, target_digest, None)
                    src = _SourceLayer(src.media_type, target_digest, tpath, _sniff_compression(tpath))
                except ObdconvError as e:
                    report.add(ERROR, f"layer {i}", f"target blob {_short(target_digest)}: {e}")
                    src = None
            elif src is not None and target_digest and converted is not source:
                if _has_blob(converted, target_digest) is False:
                    report.add(ERROR, f"layer {i}", f"target blob {_short(target_digest)} is not in the converted "
                               "image's repository (the runtime fetches it from there)")
            opened.append(open_turbo_layer(i, path, src, spool, report, diff_ids[i] if diff_ids else None))
        else:
            if diff_ids is not None and diff_ids[i] != digest:
                report.add(ERROR, "config", f"rootfs.diff_ids[{i}] is {diff_ids[i]}, expected the layer blob "
                           f"digest {digest} (an overlaybd blob is uncompressed)")
            opened.append(open_native_layer(i, path, report))

    layers = [x for x in opened if x is not None]
    if fmt == "overlaybd" and layers and len(layers) == len(opened):
        check_uuid_chain(layers, report)
    # The filesystem is compared only when every layer opened: a partial stack would only add noise.
    if layers and len(layers) == len(opened) == (1 if flat else len(sources)) + base \
            and all(s.path is not None for s in sources):
        compare_filesystem(layers, sources, report, workdir, mount)
    for s in sources:
        if s.path is not None:
            s.path.unlink(missing_ok=True)
    return report


def _has_blob(repo: Repository, digest: str) -> bool | None:
    try:
        return repo.head_blob(digest) is not None
    except ObdconvError:
        return None


def verify_image(converted: Repository, ref: str, source: Repository, source_ref: str, *, platform: str | None = None,
                 mount: bool = False, workdir: str | Path | None = None) -> VerifyReport:
    """Verify converted image `converted`@`ref` against `source`@`source_ref` (both `Repository`s).

    `platform` ("os/arch[/variant]") limits an index to one platform; `mount` reads the filesystem
    through the kernel (root + loop device) instead of libext2fs; `workdir` holds the spooled blobs and
    the flattened sparse image (a temporary directory when None; removed at the end either way).
    """
    report = VerifyReport(ref, source_ref, "mount" if mount else "userspace")
    with ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="obdconv-verify-", dir=workdir)))
        pairs = pair_platforms(converted, ref, source, source_ref, platform, report.findings)
        for n, pair in enumerate(pairs):
            pdir = base / f"p{n}"
            pdir.mkdir()
            try:
                report.platforms.append(verify_platform(converted, source, pair, pdir, mount))
            finally:
                shutil.rmtree(pdir, ignore_errors=True)
    return report


def verify_reference(ref: str, source_ref: str, options: RegistryOptions | None = None, **kwargs: Any) -> VerifyReport:
    """Parse both references (`host/repo:tag`, `oci:PATH:tag`, `...@sha256:...`), open their
    repositories with `options` (a RegistryOptions) and call `verify_image`."""
    options = options or RegistryOptions()
    conv_ref, src_ref = parse_reference(ref), parse_reference(source_ref)
    if not conv_ref.ref:
        raise BadInputError(f"reference {ref!r} names no tag or digest")
    if not src_ref.ref:
        raise BadInputError(f"source reference {source_ref!r} names no tag or digest")
    converted = open_repository(conv_ref.name, options)
    source = converted if src_ref.name == conv_ref.name else open_repository(src_ref.name, options)
    report = verify_image(converted, conv_ref.ref, source, src_ref.ref, **kwargs)
    report.ref, report.source_ref = ref, source_ref  # name the images as the caller did
    return report
