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

What a faithful conversion is comes from `obdconv.faithful`, which the converter imports too:
each difference made on purpose (sockets skipped, xattrs ext4 does not store dropped, times
clamped to ext4's range, mkfs's /lost+found) is expected, and reported in the "differences"
section of the report (text and JSON) with its reason, never as a failure.

The source image is always named explicitly (`source_ref`): a native image keeps no link to its
source at all, and a turbo image's target digests name the source *layers* but not the source
config or manifest, so requiring it keeps the two formats symmetric and the comparison explicit.

Nothing here raises on a mismatch: everything found goes into the returned `VerifyReport`
(`.ok`, `.format_text()`, `.to_dict()`); `raise_for_report` turns a failed report into a
`VerificationFailed` (a BadInputError, exit code 65).

Modules: `names` (media types and annotation keys, from the spec), `report`, `fsck`, `images`
(blobs, JSON, platform pairing), `layers` (per-layer rules, opening native and turbo layers),
`filesystem` (flatten, read back, compare), `run` (the driver).
"""

from obdconv.verify.fsck import classify_fsck_output, run_fsck
from obdconv.verify.layers import check_uuid_chain
from obdconv.verify.names import (
    ANN_BLOB_DIGEST,
    ANN_BLOB_SIZE,
    ANN_TARGET_DIGEST,
    ANN_TARGET_MEDIA_TYPE,
    ANN_VERSION,
)
from obdconv.verify.report import (
    ERROR,
    INFO,
    WARNING,
    Finding,
    FsckResult,
    PlatformReport,
    VerificationFailed,
    VerifyReport,
    raise_for_report,
)
from obdconv.verify.run import verify_image, verify_platform, verify_reference

__all__ = [
    "ANN_BLOB_DIGEST", "ANN_BLOB_SIZE", "ANN_TARGET_DIGEST", "ANN_TARGET_MEDIA_TYPE", "ANN_VERSION", "ERROR", "INFO",
    "WARNING", "Finding", "FsckResult", "PlatformReport", "VerificationFailed", "VerifyReport", "check_uuid_chain",
    "classify_fsck_output", "raise_for_report", "run_fsck", "verify_image", "verify_platform", "verify_reference",
]
