"""Stage 4, push: the converted image's config, manifest and index documents, and their upload.

Unlike the reference convertor (which decodes into Go structs and so drops Docker-only config
fields such as Healthcheck or container_config), documents are edited as ordered JSON: EVERY
field of the source is kept, in its order; only what conversion changes is replaced. JSON is
written with the Go-compatible encoder (`obdconv.oci.manifest.go_json`).

Order of pushes (registries that validate references need it): layers (assemble), then config,
then manifest; an index only after all of its children. Only the root is tagged; nested indexes
and child manifests are pushed by digest. With `upload=False` nothing is sent; digests are still
computed so results and dumps are complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from obdconv.errors import BadInputError
from obdconv.oci import mediatypes
from obdconv.oci.digests import sha256_digest
from obdconv.oci.manifest import go_json, parse_json
from obdconv.pipeline.annotations import ARTIFACT_TYPE, config_media_type, descriptor, manifest_media_type

MANIFEST_KEY_ORDER = ("schemaVersion", "mediaType", "artifactType", "config", "layers", "subject", "annotations")
INDEX_KEY_ORDER = ("schemaVersion", "mediaType", "artifactType", "manifests", "subject", "annotations")


def encode(doc: Any) -> bytes:
    out = go_json(doc)
    return out.encode() if isinstance(out, str) else bytes(out)


def _ordered(doc: dict[str, Any], order: Sequence[str]) -> dict[str, Any]:
    """Known keys in the reference's order, then any other keys in their source order."""
    out = {k: doc[k] for k in order if k in doc}
    out.update((k, v) for k, v in doc.items() if k not in out)
    return out


def rewrite_config(config: bytes, diff_ids: Sequence[str], flattened: int = 0) -> bytes:
    """The source config with `rootfs.diff_ids` replaced; every other field kept, in order.
    `flattened` (--flatten): the number of source layers that became one, said in `history`."""
    doc = parse_json(config, "image config")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict):
        raise BadInputError("image config has no rootfs object")
    rootfs = dict(rootfs)
    rootfs["diff_ids"] = list(diff_ids)
    rootfs.setdefault("type", "layers")
    doc["rootfs"] = rootfs
    if flattened:
        doc["history"] = flattened_history(doc, flattened)
    return encode(doc)


def flattened_history(doc: dict[str, Any], layers: int) -> list[Any]:
    """`history` of a flattened image: the source's entries, kept but marked `empty_layer` (none
    of them has a layer of its own any more), then one entry for the layer that holds them all,
    so the non-empty entries still pair with the layers (OCI image spec)."""
    history = doc.get("history")
    entries = [({**h, "empty_layer": True} if isinstance(h, dict) else h)
               for h in (history if isinstance(history, list) else [])]
    entry: dict[str, Any] = {}
    if isinstance(doc.get("created"), str):
        entry["created"] = doc["created"]  # the image's own time: deterministic
    entry["created_by"] = mediatypes.FLATTEN_CREATED_BY
    entry["comment"] = f"{layers} layer(s) flattened into one overlaybd layer holding the final filesystem"
    return [*entries, entry]


def build_manifest(
    source: bytes,
    *,
    config_desc: dict[str, Any],
    layers: Sequence[dict[str, Any]],
    oci: bool,
    subject: dict[str, Any] | None = None,
    artifact_type: str = "",
) -> bytes:
    """The source manifest with config and layers replaced and the media type set per --oci.
    `subject`/`artifact_type` (--referrer) override the source's; otherwise the source's stay."""
    doc = parse_json(source, "manifest")
    doc["mediaType"] = manifest_media_type(oci)
    doc["config"] = config_desc
    doc["layers"] = list(layers)
    if subject is not None:
        doc["subject"] = subject
        doc["artifactType"] = artifact_type
    return encode(_ordered(doc, MANIFEST_KEY_ORDER))


def build_index(
    source: bytes,
    children: Sequence[dict[str, Any] | None],
    *,
    oci: bool,
    resolved_media_type: str,
    subject: dict[str, Any] | None = None,
    artifact_type: str = "",
) -> bytes:
    """The source index with entry i's mediaType/digest/size replaced by children[i]'s (keeping
    its platform, annotations and other fields) and entries whose child is None dropped
    (attestations, platforms not asked for). The media type is OCI with --oci, else the source's
    (or, when the source omits it, the type the registry resolved it as: spec §10.5)."""
    doc = parse_json(source, "index")
    entries = doc.get("manifests")
    if not isinstance(entries, list) or len(entries) != len(children):
        raise BadInputError("index manifests list changed while converting")
    out_entries = []
    for entry, child in zip(entries, children, strict=True):
        if child is None:
            continue
        new = dict(entry)
        for key in ("mediaType", "digest", "size"):
            new[key] = child[key]
        out_entries.append(_ordered(new, ("mediaType", "digest", "size", "urls", "annotations", "data",
                                          "platform", "artifactType")))
    doc["manifests"] = out_entries
    if oci:
        doc["mediaType"] = mediatypes.OCI_INDEX
    elif not doc.get("mediaType"):
        doc["mediaType"] = resolved_media_type
    if subject is not None:
        doc["subject"] = subject
        doc["artifactType"] = artifact_type
    return encode(_ordered(doc, INDEX_KEY_ORDER))


def referrer_fields(fmt: str, referrer: bool, source_desc: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(subject, artifactType) for --referrer: the SOURCE object's descriptor and the format's type."""
    if not referrer:
        return None, ""
    subject = {"mediaType": source_desc["mediaType"], "digest": source_desc["digest"], "size": source_desc["size"]}
    return subject, ARTIFACT_TYPE[fmt]


@dataclass(slots=True)
class PushedManifest:
    """A converted manifest: its descriptor, and the config it points at."""

    media_type: str
    digest: str
    size: int
    config_digest: str
    layer_digests: list[str] = field(default_factory=list)

    def descriptor(self) -> dict[str, Any]:
        return descriptor(self.media_type, self.digest, self.size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PushedManifest:
        return cls(**d)


def _dump(path: Path, data: bytes) -> None:
    """Atomic write, mode 0644, like the reference's --dump-manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:  # a full disk or Ctrl-C leaves no stray temp file behind
        tmp.unlink(missing_ok=True)
        raise


def push_manifest(
    target_repo: Any,
    *,
    source_manifest: bytes,
    source_config: bytes,
    source_desc: dict[str, Any],
    fmt: str,
    layers: Sequence[dict[str, Any]],
    diff_ids: Sequence[str],
    oci: bool,
    referrer: bool,
    ref: str,
    upload: bool = True,
    dump_dir: Path | None = None,
    flattened: int = 0,
) -> PushedManifest:
    """Rewrite and push config then manifest; `ref` is the tag for a root manifest, else "" (by
    digest). `flattened`: how many source layers the (one) converted layer holds (--flatten).
    Returns the manifest's descriptor fields."""
    oci = oci or referrer  # --referrer forces --oci (spec §1)
    config = rewrite_config(source_config, diff_ids, flattened)
    config_desc = descriptor(config_media_type(oci), sha256_digest(config), len(config))
    subject, artifact_type = referrer_fields(fmt, referrer, source_desc)
    manifest = build_manifest(source_manifest, config_desc=config_desc, layers=layers, oci=oci,
                              subject=subject, artifact_type=artifact_type)
    media_type = manifest_media_type(oci)
    digest = sha256_digest(manifest)
    if dump_dir is not None:
        _dump(dump_dir / "config.json", config)
        _dump(dump_dir / "manifest.json", manifest)
    if upload:
        if target_repo.head_blob(config_desc["digest"]) is None:
            target_repo.upload_blob([config])
        pushed = target_repo.put_manifest(manifest, media_type, ref or digest)
        if pushed and pushed != digest:
            raise BadInputError(f"registry stored manifest as {pushed}, expected {digest}")
    return PushedManifest(media_type, digest, len(manifest), config_desc["digest"],
                          [d["digest"] for d in layers])


def push_index(
    target_repo: Any,
    *,
    source_index: bytes,
    source_desc: dict[str, Any],
    children: Sequence[dict[str, Any] | None],
    fmt: str,
    oci: bool,
    referrer: bool,
    ref: str,
    upload: bool = True,
    dump_path: Path | None = None,
) -> dict[str, Any]:
    """Rebuild and push an index after all its children; returns its new descriptor."""
    oci = oci or referrer
    subject, artifact_type = referrer_fields(fmt, referrer, source_desc)
    data = build_index(source_index, children, oci=oci, resolved_media_type=source_desc["mediaType"],
                       subject=subject, artifact_type=artifact_type)
    media_type = json.loads(data)["mediaType"]
    digest = sha256_digest(data)
    if dump_path is not None:
        _dump(dump_path, data)
    if upload:
        target_repo.put_manifest(data, media_type, ref or digest)
    return descriptor(media_type, digest, len(data))
