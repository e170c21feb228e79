"""Stage 0, plan: resolve the source reference into the tree of indexes and manifests to convert.

`resolve_image(repo, ref, platforms) -> ImagePlan` reads every index and manifest (and each
manifest's config) once; the plan is plain JSON-serialisable data, so a fleet can ship it.

Decisions (each tested in tests/pipeline/test_plan.py):

* Media types: image manifests (OCI, Docker schema 2) and indexes (OCI index, Docker list, nested
  to any depth) are converted; anything else at the root or inside an index (schema 1, artifacts
  with custom types) is an `UnsupportedError` naming it, as the reference does.
* Attestation manifests (annotation `vnd.docker.reference.type=attestation-manifest`, as BuildKit
  writes them) are DROPPED from the converted index with a warning, like the reference: they are
  signed statements about the SOURCE manifests (their in-toto subjects name the source digests),
  so re-pointing them at converted manifests would make them claim something they never
  attested.
* `platforms` (e.g. ["linux/amd64", "linux/arm64/v8"]) filters index entries: a manifest entry
  whose platform matches none is dropped from the output index (with a log line). An empty list
  converts every entry, like the reference. Nested indexes are always descended into; a nested
  index left with no entries is dropped too, a root index left empty is an error.
* A config whose `rootfs.diff_ids` count differs from the manifest's layer count is rejected
  with `BadInputError` (the reference panics on fewer; spec §10.3).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from obdconv.errors import BadInputError, UnsupportedError
from obdconv.oci import mediatypes
from obdconv.oci import mediatypes as mt
from obdconv.oci.digests import chain_ids
from obdconv.oci.manifest import is_attestation, parse_json, parse_platforms, platform_matches

log = logging.getLogger(__name__)

MANIFEST_TYPES = mediatypes.MANIFEST_TYPES
INDEX_TYPES = mediatypes.INDEX_TYPES
MAX_DEPTH = 8


@dataclass(slots=True)
class ManifestPlan:
    """One image manifest to convert. `descriptor` is how it was reached (root or index entry)."""

    descriptor: dict[str, Any]
    data: str  # the manifest JSON as fetched
    config: str  # the config JSON as fetched
    layers: list[dict[str, Any]]
    diff_ids: list[str]
    chain_ids: list[str]

    @property
    def digest(self) -> str:
        return self.descriptor["digest"]

    @property
    def platform(self) -> str:
        p = self.descriptor.get("platform") or {}
        parts = [p.get("os", ""), p.get("architecture", ""), p.get("variant", "")]
        return "/".join(x for x in parts if x)


@dataclass(slots=True)
class IndexPlan:
    """One index to rebuild. `children[i]` is the digest of the converted entry i, or "" if the
    entry is dropped (attestation, platform filter)."""

    descriptor: dict[str, Any]
    data: str
    children: list[str]

    @property
    def digest(self) -> str:
        return self.descriptor["digest"]


@dataclass(slots=True)
class ImagePlan:
    root: dict[str, Any]  # the root descriptor (mediaType, digest, size)
    manifests: dict[str, ManifestPlan] = field(default_factory=dict)  # by source digest
    indexes: list[IndexPlan] = field(default_factory=list)  # children before parents

    @property
    def root_is_index(self) -> bool:
        return self.root["mediaType"] in INDEX_TYPES

    def unique_layers(self) -> list[dict[str, Any]]:
        """Every distinct source layer (by digest), in first-seen order."""
        seen: dict[str, dict[str, Any]] = {}
        for m in self.manifests.values():
            for layer in m.layers:
                seen.setdefault(layer["digest"], layer)
        return list(seen.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImagePlan:
        return cls(
            root=d["root"],
            manifests={k: ManifestPlan(**v) for k, v in d["manifests"].items()},
            indexes=[IndexPlan(**i) for i in d["indexes"]],
        )


def _read_blob(repo: Any, digest: str) -> bytes:
    with repo.open_blob(digest) as f:
        return f.read()


def _check_size(desc: dict[str, Any], size: int, what: str) -> None:
    """A descriptor's size must be its blob's (the digest matched, so the descriptor is wrong)."""
    if "size" in desc and desc["size"] != size:
        raise BadInputError(f"{what} {desc['digest']}: the descriptor says {desc['size']} bytes, the blob has {size}")


def _plan_manifest(repo: Any, desc: dict[str, Any], data: bytes) -> ManifestPlan:
    doc = parse_json(data, f"manifest {desc['digest']}")
    config_desc = doc.get("config") or {}
    if "digest" not in config_desc:
        raise BadInputError(f"manifest {desc['digest']} has no config")
    config = _read_blob(repo, config_desc["digest"])
    _check_size(config_desc, len(config), f"manifest {desc['digest']}: config")
    layers = doc.get("layers") or []
    diff_ids = ((parse_json(config, f"config {config_desc['digest']}").get("rootfs") or {}).get("diff_ids")) or []
    if len(diff_ids) != len(layers):
        raise BadInputError(
            f"manifest {desc['digest']}: config lists {len(diff_ids)} diff_ids for {len(layers)} layers")
    for layer in layers:
        if "digest" not in layer:
            raise BadInputError(f"manifest {desc['digest']}: a layer has no digest")
        # An image already converted: its layers are overlaybd blobs, not tars (converting them
        # again would give a filesystem holding only /overlaybd.commit).
        marks = sorted(k for k in (layer.get("annotations") or {}) if k.startswith(mt.ANNOTATION_PREFIX))
        if marks:
            raise BadInputError(f"manifest {desc['digest']} is already an overlaybd/turboOCI image (layer "
                                f"{layer['digest']} has the overlaybd annotation {marks[0]}): convert its source "
                                "image instead")
    return ManifestPlan(desc, data.decode(), config.decode(), layers, list(diff_ids),
                        chain_ids(diff_ids) if diff_ids else [])


def resolve_image(repo: Any, ref: str, platforms: list[str] | None = None) -> ImagePlan:
    """Read the object `ref` names (tag or digest) and everything below it."""
    platforms = platforms or []
    wanted = parse_platforms(platforms)
    root_manifest = repo.get_manifest(ref)
    root = {"mediaType": root_manifest.media_type, "digest": root_manifest.digest, "size": len(root_manifest.data)}
    plan = ImagePlan(root)

    def visit(desc: dict[str, Any], data: bytes, depth: int) -> bool:
        """Plan `desc`; False when it is an index left with nothing to convert."""
        media_type = desc["mediaType"]
        if media_type in MANIFEST_TYPES:
            if desc["digest"] not in plan.manifests:
                plan.manifests[desc["digest"]] = _plan_manifest(repo, desc, data)
            return True
        if media_type not in INDEX_TYPES:
            raise UnsupportedError(f'unsupported media type "{media_type}" ({desc["digest"]})')
        if depth > MAX_DEPTH:
            raise BadInputError(f"index {desc['digest']}: nested deeper than {MAX_DEPTH}")
        doc = parse_json(data, f"index {desc['digest']}")
        children = []
        for entry in doc.get("manifests") or []:
            if is_attestation(entry):
                log.warning("skipping attestation manifest %s: cannot be re-associated after conversion",
                            entry.get("digest"))
                children.append("")
                continue
            child_type = entry.get("mediaType", "")
            if child_type in MANIFEST_TYPES and not platform_matches(entry, wanted):
                log.info("skipping manifest %s: platform not requested", entry.get("digest"))
                children.append("")
                continue
            if child_type and child_type not in MANIFEST_TYPES | INDEX_TYPES:
                raise UnsupportedError(f'unsupported media type "{child_type}" ({entry.get("digest")}) '
                                       f'in index {desc["digest"]}')
            child = repo.get_manifest(entry["digest"])
            _check_size(entry, len(child.data), f"index {desc['digest']}: manifest")
            child_desc = dict(entry)
            child_desc["mediaType"] = child_type or child.media_type
            children.append(entry["digest"] if visit(child_desc, child.data, depth + 1) else "")
        if not any(children):
            if depth:
                return False
            raise BadInputError(f"index {desc['digest']}: no manifest left to convert"
                                + (f" for platforms {platforms}" if platforms else ""))
        if not any(i.digest == desc["digest"] for i in plan.indexes):
            plan.indexes.append(IndexPlan(desc, data.decode(), children))
        return True

    visit(root, root_manifest.data, 0)
    # No layer anywhere: an overlaybd image of it would have no filesystem (and nothing marks its
    # manifest as overlaybd). Refused; a layerless platform inside an index with others is kept.
    if not any(m.layers for m in plan.manifests.values()):
        raise BadInputError(f"image {ref} has no layers: nothing to convert")
    return plan
