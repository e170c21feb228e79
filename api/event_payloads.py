"""The bodies registries POST to /v1/events/*: each read into the pushes it reports.

* CNCF distribution (docker-registry) `notifications`: an envelope
  `{"events": [{"id", "timestamp", "action", "target": {descriptor fields, "length", "repository",
  "fromRepository", "url", "tag", "references"}, "request", "actor", "source"}]}` (media type
  application/vnd.docker.distribution.events.v2+json). A manifest pushed by tag has `target.tag`;
  `target.url` is the manifest's URL on the registry (`request.host` names it too). Blob pushes,
  pulls, mounts and deletes are events as well: they are ignored, as are manifests pushed by digest
  alone (an index's children arrive that way; the index converts them).
* Harbor webhooks, payload format "Default": `{"type": "PUSH_ARTIFACT", "occur_at", "operator",
  "event_data": {"resources": [{"digest", "tag", "resource_url"}], "repository": {"date_created",
  "name", "namespace", "repo_full_name", "repo_type"}}}`. Other event types are ignored; the
  CloudEvents payload format is not supported (refused as unknown fields).

The parts obdconv reads are modelled strictly: an unknown field there is refused, so a payload of
another shape is never half-understood. The registry's own records (`request`, `actor`, `source`,
descriptor `platform`/`annotations`, `references`) are passed over unread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from obdconv.oci import mediatypes as mt

MANIFEST_MEDIA_TYPES = frozenset({*mt.MANIFEST_TYPES, *mt.INDEX_TYPES})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DistributionTarget(_Strict):
    mediaType: str = ""
    digest: str = ""
    size: int = 0
    length: int = 0
    urls: list[str] = Field(default_factory=list)
    annotations: dict[str, str] = Field(default_factory=dict)
    data: str = ""
    platform: dict[str, Any] | None = None
    artifactType: str = ""
    repository: str = ""
    fromRepository: str = ""
    url: str = ""
    tag: str = ""
    references: list[dict[str, Any]] = Field(default_factory=list)


class DistributionEvent(_Strict):
    id: str = ""
    timestamp: str = ""
    action: str
    target: DistributionTarget = Field(default_factory=DistributionTarget)
    request: dict[str, Any] = Field(default_factory=dict)
    actor: dict[str, Any] = Field(default_factory=dict)
    source: dict[str, Any] = Field(default_factory=dict)


class DistributionEnvelope(_Strict):
    events: list[DistributionEvent]


class HarborResource(_Strict):
    digest: str = ""
    tag: str = ""
    resource_url: str = ""
    scan_overview: dict[str, Any] | None = None
    sbom_overview: dict[str, Any] | None = None


class HarborRepository(_Strict):
    date_created: int = 0
    name: str = ""
    namespace: str = ""
    repo_full_name: str = ""
    repo_type: str = ""


class HarborEventData(_Strict):
    resources: list[HarborResource] = Field(default_factory=list)
    repository: HarborRepository | None = None
    custom_attributes: dict[str, Any] | None = None
    replication: dict[str, Any] | None = None
    retention: dict[str, Any] | None = None
    scan: dict[str, Any] | None = None


class HarborPayload(_Strict):
    type: str
    occur_at: int = 0
    operator: str = ""
    event_data: HarborEventData


@dataclass(frozen=True)
class Push:
    """One tagged manifest push an event reports."""

    event: str  # the event's id (distribution) or "<type>:<n>" (Harbor), for answers and logs
    registry: str  # host[:port] the event names ("" when it names none)
    scheme: str  # "http", "https" or "" (unknown)
    repository: str  # the repository's name on that registry
    digest: str
    tag: str


@dataclass(frozen=True)
class Skipped:
    event: str
    reason: str


def distribution_pushes(envelope: DistributionEnvelope) -> list[Push | Skipped]:
    out: list[Push | Skipped] = []
    for i, event in enumerate(envelope.events):
        name = event.id or f"event:{i}"
        target = event.target
        if event.action != "push":
            out.append(Skipped(name, f"action {event.action!r}: only pushes convert"))
        elif target.mediaType not in MANIFEST_MEDIA_TYPES:
            out.append(Skipped(name, f"{target.mediaType or 'a blob'} is not an image manifest or index"))
        elif not target.tag:
            out.append(Skipped(name, "manifest pushed by digest alone (no tag to name the outputs after)"))
        else:
            url = urlsplit(target.url) if target.url else None
            registry = url.netloc if url is not None and url.netloc else str(event.request.get("host", ""))
            out.append(Push(name, registry, url.scheme if url is not None else "", target.repository,
                            target.digest, target.tag))
    return out


def harbor_pushes(payload: HarborPayload) -> list[Push | Skipped]:
    if payload.type != "PUSH_ARTIFACT":
        return [Skipped(payload.type, f"event type {payload.type!r}: only PUSH_ARTIFACT converts")]
    repository = payload.event_data.repository
    full_name = repository.repo_full_name if repository is not None else ""
    out: list[Push | Skipped] = []
    for i, resource in enumerate(payload.event_data.resources):
        name = f"{payload.type}:{i}"
        if not resource.tag:
            out.append(Skipped(name, "artifact pushed by digest alone (no tag to name the outputs after)"))
            continue
        # resource_url is "host[:port]/namespace/name:tag" (or "@digest"): the host is its first part.
        registry = resource.resource_url.split("/", 1)[0] if "/" in resource.resource_url else ""
        out.append(Push(name, registry, "", full_name, resource.digest, resource.tag))
    return out
