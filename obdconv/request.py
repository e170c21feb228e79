"""What a conversion is asked to do, as plain data: shared by `obdconv convert`, the local runner,
`obdconv submit` and the Celery tasks (so it must stay JSON-serialisable and free of secrets).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ENGINE_VERSION = "obdconv-1"


@dataclass(frozen=True, slots=True)
class ConversionProfile:
    """Everything that changes the bytes of a converted layer. Part of every dedup key, so a result
    made one way is never reused for a request made another way."""

    format: str = "native"  # "native" (overlaybd) or "turbo" (overlaybd-turboOCI)
    fstype: str = "ext4"
    vsize_gb: int = 64
    mkfs: bool = True
    algorithm: str = "lz4"  # ZFile block codec: "lz4" or "zstd"
    block_size: int = 4096  # ZFile raw block size
    engine_version: str = ENGINE_VERSION
    base_layer: str = ""  # mkfs=False: digest of the base layer file the image is stacked on
    flatten: bool = False  # native: the whole image as ONE layer

    def key(self) -> str:
        """A short stable string naming this profile (for dedup rows and spool paths). A base layer
        is named by its digest (another file makes other bytes); flattened output is keyed apart."""
        base = "mkfs" if self.mkfs else "base" + (f"-{self.base_layer.partition(':')[2]}" if self.base_layer else "")
        return (
            f"{self.format}/{self.fstype}/v{self.vsize_gb}/{base}/"
            f"{self.algorithm}-{self.block_size // 1024}k/{self.engine_version}"
            + ("/flat" if self.flatten else "")
        )


@dataclass(slots=True)
class RegistryAccess:
    """How to reach registries. `credential_ref` names credentials that the *worker* resolves from
    its own configuration; secrets themselves never travel in a request."""

    plain: bool = False
    insecure: bool = False
    root_ca: list[str] = field(default_factory=list)
    cert_dir: list[str] = field(default_factory=list)
    client_cert: list[str] = field(default_factory=list)
    credential_ref: str = ""


@dataclass(slots=True)
class ConversionRequest:
    """The reference convertor's flags (spec reference-convertor.md §1), plus obdconv's extras."""

    repository: str  # "host[:port]/name" or "oci:PATH"
    input_tag: str = ""
    input_digest: str = ""
    overlaybd_tag: str = ""  # --overlaybd (or -o when neither output flag is given)
    turbo_tag: str = ""  # --turboOCI / --fastoci
    output_repository: str = ""  # obdconv extra: write somewhere else ("" = same repository)
    oci: bool = False
    referrer: bool = False
    mkfs: bool = True
    vsize_gb: int = 64
    fstype: str = "ext4"
    algorithm: str = "lz4"
    block_size: int = 4096
    disable_sparse: bool = False
    platforms: list[str] = field(default_factory=list)
    concurrency_limit: int = 4
    no_upload: bool = False
    dump_manifest: bool = False
    reserve: bool = False
    workdir: str = "tmp_conv"
    db_type: str = ""
    db_str_ref: str = ""  # a reference the worker resolves (the CLI passes the DSN locally)
    db_required: bool = False
    access: RegistryAccess = field(default_factory=RegistryAccess)
    # --mkfs=false: the overlaybd base layer the image stacks on ("" = the reference's default path)
    base_layer: str = ""
    # its sha256, pinned when the conversion starts (a caller may pin it too): every machine taking
    # part must hold exactly this file at `base_layer`, or fails naming the difference
    base_layer_digest: str = ""
    flatten: bool = False  # native output as ONE layer holding the whole image's filesystem
    all_or_nothing: bool = False  # one impossible output format fails the whole request
    # Completion callback: POSTed a signed JSON summary on a terminal state. The HMAC key is named by
    # `callback_secret_ref` and resolved by the worker from its own configuration (never sent here).
    callback_url: str = ""
    callback_secret_ref: str = ""

    def profiles(self) -> list[ConversionProfile]:
        base = "" if self.mkfs else self.base_layer_digest
        out = []
        if self.overlaybd_tag:
            out.append(ConversionProfile("native", "ext4", self.vsize_gb, self.mkfs, self.algorithm, self.block_size,
                                         base_layer=base, flatten=self.flatten))
        if self.turbo_tag:
            out.append(ConversionProfile("turbo", self.fstype, self.vsize_gb, self.mkfs, self.algorithm, self.block_size,
                                         base_layer=base))
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConversionRequest:
        d = dict(d)
        d["access"] = RegistryAccess(**d.get("access", {}))
        return cls(**d)
