"""Request validation shared by the local runner, the CLI and `obdconv submit` (no heavy imports)."""

from __future__ import annotations

from obdconv.errors import BadInputError, UnsupportedError, UsageError
from obdconv.registry.reference import check_tag
from obdconv.request import ConversionProfile, ConversionRequest

ALGORITHMS = ("lz4", "zstd")


def validate_request(request: ConversionRequest) -> list[ConversionProfile]:
    """The reference's checks and messages, plus obdconv's own limits."""
    if not request.repository:
        raise UsageError("repository is required (-r)")
    if not (request.input_tag or request.input_digest):
        raise UsageError("one of input-tag [-i] or input-digest [-g] is required")
    profiles = request.profiles()
    if not profiles:
        raise UsageError("output-tag is required, you can specify it by [-o|--overlaybd|--turboOCI]")
    # A bad output tag would otherwise fail only at the final push, after every layer was converted
    # and uploaded.
    for flag, tag in (("--overlaybd/-o", request.overlaybd_tag), ("--turboOCI", request.turbo_tag)):
        try:
            if tag:
                check_tag(tag)
        except BadInputError:
            raise UsageError(f"{flag} {tag!r}: not a valid tag (letters, digits, '_', '.', '-'; "
                             "at most 128, not starting with '.' or '-')") from None
    if request.mkfs and (request.base_layer or request.base_layer_digest):
        raise UsageError("--base-layer is used only with --mkfs=false (with mkfs, layer 0 makes the filesystem)")
    if request.flatten and request.turbo_tag:
        raise UsageError("--flatten with --turboOCI: a turboOCI image cannot be flattened (its layers read file "
                         "data from the original layer blobs, one per layer); flatten --overlaybd only")
    if request.turbo_tag and request.fstype not in ("", "ext4"):
        raise UnsupportedError(f"--fstype {request.fstype} is not supported: only ext4")
    if request.algorithm not in ALGORITHMS:
        raise UsageError(f"--algorithm {request.algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    bs = request.block_size
    if bs < 4096 or bs > 32768 or bs & (bs - 1):
        # 64 KiB is what overlaybd-commit accepts, but the runtime's 64 KiB read buffer cannot
        # read a 64 KiB block that does not compress (stored length > 65536; format spec §2.3).
        raise UsageError(f"--bs {bs // 1024 if bs % 1024 == 0 else bs / 1024} KiB: ZFile block size must be a "
                         "power of two from 4 to 32 KiB")
    if request.vsize_gb <= 0:
        raise UsageError(f"--vsize {request.vsize_gb}: must be a positive number of GB")
    return profiles
