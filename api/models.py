"""Request and response bodies of /v1/conversions (pydantic; the OpenAPI document is made from them).

`ConversionIn` is `obdconv.request.ConversionRequest` as JSON, with the same field names as the
`obdconv.convert` task's `request` (tasks/README.md), the registry access fields flattened
(`plain`, `insecure`, `credential_ref`). Unknown fields are refused (a typo must not silently
convert something else). Left out on purpose: fields naming paths on a worker's disk or the
worker's own database (`workdir`, `reserve`, `root_ca`, `cert_dir`, `client_cert`, `db_*`) and
`no_upload` (an API conversion is pushed). Checking values is `validate_request`'s job
(obdconv/pipeline/validate.py), the same checks as `obdconv submit`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from obdconv.errors import UsageError
from obdconv.pipeline.validate import validate_callback_url
from obdconv.request import ConversionRequest, RegistryAccess

_ACCESS_FIELDS = ("plain", "insecure", "credential_ref")


def check_callback_url(url: str) -> str:
    """An http(s) URL with a host, or "" (none). Anything else is refused before it is queued."""
    if url:
        try:
            validate_callback_url(url)
        except UsageError as e:
            raise ValueError(str(e)) from None
    return url


class ConversionIn(BaseModel):
    """A conversion to enqueue (`obdconv submit`'s flags)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{
        "repository": "registry.example/team-a/app", "input_tag": "v1", "overlaybd_tag": "v1-obd",
        "credential_ref": "team-a"}]})

    repository: str = Field(description="source repository, host[:port]/name (no tag or digest)")
    input_tag: str = Field("", description="source tag (wins over input_digest when both are given)")
    input_digest: str = Field("", description="source manifest or index digest")
    overlaybd_tag: str = Field("", description="tag of the overlaybd (native) output")
    turbo_tag: str = Field("", description="tag of the overlaybd-turboOCI output")
    output_repository: str = Field("", description="write the outputs there instead of the source repository")
    platforms: list[str] = Field(default_factory=list, description="only these platforms of an index, os/arch[/variant]")
    oci: bool = Field(False, description="OCI media types (else Docker schema 2)")
    referrer: bool = Field(False, description="outputs refer to their source (subject + artifactType; implies oci)")
    algorithm: str = Field("lz4", description="ZFile codec: lz4 or zstd")
    block_size: int = Field(4096, description="ZFile block size in bytes: 4096..32768, a power of two")
    vsize_gb: int = Field(64, description="virtual block device size in GB")
    fstype: str = Field("ext4", description="filesystem (ext4 only)")
    concurrency_limit: int = Field(4, description="manifests of an index converted at once (<= 0: all)")
    dump_manifest: bool = Field(False, description="return the produced manifest/config JSON in the outputs")
    mkfs: bool = Field(True, description="false: stack on the base layer `base_layer` (--mkfs=false)")
    base_layer: str = Field("", description="the overlaybd base layer for mkfs=false")
    flatten: bool = Field(False, description="native output as one layer holding the whole filesystem")
    all_or_nothing: bool = Field(False, description="one impossible output format fails the whole request")
    plain: bool = Field(False, description="http:// to the registries")
    insecure: bool = Field(False, description="skip TLS verification")
    credential_ref: str = Field("", description="name of registry credentials configured on the workers")
    callback_url: str = Field("", description="http(s) URL POSTed a signed summary when the request ends")
    callback_secret_ref: str = Field("", description="name of the callback's HMAC key configured on the workers")

    @field_validator("callback_url")
    @classmethod
    def _callback_is_http(cls, value: str) -> str:
        return check_callback_url(value)

    def to_request(self, repository: str, output_repository: str) -> ConversionRequest:
        """The ConversionRequest, with the repositories as normalised by the caller."""
        values = self.model_dump()
        access = RegistryAccess(**{name: values.pop(name) for name in _ACCESS_FIELDS})
        values.update(repository=repository, output_repository=output_repository)
        return ConversionRequest(**values, access=access)


class Accepted(BaseModel):
    request_id: str
    status_url: str
    state: str = "PENDING"
    idempotent_replay: bool = False


class ErrorInfo(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    error_class: str = Field(alias="class")
    message: str


class ConversionSummary(BaseModel):
    """One request as the durable status row holds it (times in RFC 3339, UTC)."""

    request_id: str
    state: str = Field(description="PENDING, RUNNING, or a final state: SUCCESS, FAILURE, CANCELLED, PARTIAL (some "
                       "formats delivered, each missing one in outputs with its error)")
    stage: str = ""
    source: str = ""
    submitted_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    updated_at: str | None = None
    outputs: dict[str, Any] = Field(default_factory=dict, description="per format: tag, digest, mediaType, size")
    error: dict[str, str] | None = Field(None, description='{"class": obdconv error class, "message"}')
    status_url: str = ""


class LayerProgress(BaseModel):
    digest: str
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                              description="prepare/assemble -> done, total (bytes), host")


class ManifestProgress(BaseModel):
    digest: str
    platform: dict[str, Any] | None = None
    stage: str = ""
    done: int = 0
    total: int = 0
    layers: list[LayerProgress] = Field(default_factory=list)


class Progress(BaseModel):
    manifests: list[ManifestProgress] = Field(default_factory=list)
    other: list[LayerProgress] = Field(default_factory=list, description="layer progress of no known manifest")


class ConversionStatusOut(ConversionSummary):
    """The durable status merged with live progress from the fleet."""

    celery_state: str = ""
    progress: Progress = Field(default_factory=Progress)


class ConversionList(BaseModel):
    items: list[ConversionSummary]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page; null on the last")


def known_request_fields() -> set[str]:
    """ConversionRequest's fields (a test checks every ConversionIn field maps onto one)."""
    from dataclasses import fields

    return {f.name for f in fields(ConversionRequest)}
