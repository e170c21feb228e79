"""Descriptors of converted layers with the overlaybd annotations the reference convertor writes
(spec reference-convertor.md §4.1, §4.2). Names and values come from `obdconv.oci.mediatypes`."""

from __future__ import annotations

from typing import Any

from obdconv.oci import mediatypes as mt

ARTIFACT_TYPE = {"native": mt.ARTIFACT_TYPE_NATIVE, "turbo": mt.ARTIFACT_TYPE_TURBO}


def layer_media_type(fmt: str, oci: bool) -> str:
    """Depends only on --oci and the output format, never on the source (spec §4.1)."""
    return mt.native_layer_type(oci) if fmt == "native" else mt.turbo_layer_type(oci)


def manifest_media_type(oci: bool) -> str:
    return mt.output_manifest_type(oci)


def config_media_type(oci: bool) -> str:
    return mt.output_config_type(oci)


def layer_annotations(fmt: str, digest: str, size: int, *, target_digest: str = "",
                      target_media_type: str = "") -> dict[str, str]:
    """A converted layer's annotations, keys sorted (Go encodes maps sorted)."""
    ann = {
        mt.ANNOTATION_VERSION: mt.OVERLAYBD_VERSION if fmt == "native" else mt.TURBO_OCI_VERSION,
        mt.ANNOTATION_BLOB_DIGEST: digest,
        mt.ANNOTATION_BLOB_SIZE: str(size),
    }
    if fmt == "turbo":
        ann[mt.ANNOTATION_TURBO_TARGET_DIGEST] = target_digest
        ann[mt.ANNOTATION_TURBO_TARGET_MEDIA_TYPE] = target_media_type
    return dict(sorted(ann.items()))


def descriptor(media_type: str, digest: str, size: int, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """An OCI descriptor with the reference's key order (mediaType, digest, size, annotations)."""
    d: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        d["annotations"] = dict(sorted(annotations.items()))
    return d
