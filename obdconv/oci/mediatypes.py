"""Media types, annotation keys and values of source and converted images (spec reference-convertor §4.1, §4.2)."""

from __future__ import annotations

# -- OCI ------------------------------------------------------------------------------------
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

# -- Docker schema 2 ----------------------------------------------------------------------------
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
# Schema 1 is rejected (spec §10.4) but named so the error can say what it saw.
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
LAYER_TYPES = frozenset({
    OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD,
    OCI_LAYER_NONDIST_TAR, OCI_LAYER_NONDIST_GZIP, OCI_LAYER_NONDIST_ZSTD,
    DOCKER_LAYER_TAR, DOCKER_LAYER_GZIP, DOCKER_LAYER_ZSTD, DOCKER_LAYER_FOREIGN_GZIP,
})
# Accept header for manifest GETs: everything `process()` can dispatch on.
MANIFEST_ACCEPT = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)


def is_docker(media_type: str) -> bool:
    return media_type.startswith("application/vnd.docker.")


def output_manifest_type(oci: bool) -> str:
    """Converted manifest media type: chosen by `--oci` only, not by the source (spec §4.1)."""
    return OCI_MANIFEST if oci else DOCKER_MANIFEST


def output_config_type(oci: bool) -> str:
    return OCI_CONFIG if oci else DOCKER_CONFIG


def native_layer_type(oci: bool) -> str:
    """Native overlaybd layer (and any base layer): an uncompressed tar (the tar wrapper)."""
    return OCI_LAYER_TAR if oci else DOCKER_LAYER_TAR


def turbo_layer_type(oci: bool) -> str:
    """TurboOCI meta layer `turboOCIv1.tar.gz`."""
    return OCI_LAYER_GZIP if oci else DOCKER_LAYER_GZIP


def turbo_target_media_type(source_media_type: str, sniffed_gzip: bool) -> str:
    """`turbo-oci/target-media-type`: family of the source type, compression as sniffed (spec §3.7)."""
    if is_docker(source_media_type):
        return DOCKER_LAYER_GZIP if sniffed_gzip else DOCKER_LAYER_TAR
    return OCI_LAYER_GZIP if sniffed_gzip else OCI_LAYER_TAR


# -- overlaybd annotations (pkg/label/label.go, pkg/version/version.go) -------------------------
ANNOTATION_PREFIX = "containerd.io/snapshot/overlaybd/"
ANNOTATION_VERSION = "containerd.io/snapshot/overlaybd/version"
ANNOTATION_BLOB_DIGEST = "containerd.io/snapshot/overlaybd/blob-digest"
ANNOTATION_BLOB_SIZE = "containerd.io/snapshot/overlaybd/blob-size"
ANNOTATION_TURBO_TARGET_DIGEST = "containerd.io/snapshot/overlaybd/turbo-oci/target-digest"
ANNOTATION_TURBO_TARGET_MEDIA_TYPE = "containerd.io/snapshot/overlaybd/turbo-oci/target-media-type"
# Never emitted by the reference CLI, but readers should recognise them.
ANNOTATION_ACCELERATION_LAYER = "containerd.io/snapshot/overlaybd/acceleration-layer"
ANNOTATION_BLOB_FS_TYPE = "containerd.io/snapshot/overlaybd/blob-fs-type"
ANNOTATION_VSIZE = "containerd.io/snapshot/overlaybd/vsize"
ANNOTATION_LEGACY_FASTOCI_TARGET_DIGEST = "containerd.io/snapshot/overlaybd/fastoci/target-digest"
ANNOTATION_LEGACY_FASTOCI_TARGET_MEDIA_TYPE = "containerd.io/snapshot/overlaybd/fastoci/target-media-type"

OVERLAYBD_VERSION = "0.1.0"
TURBO_OCI_VERSION = "0.1.0-turbo.ociv1"

# -- referrers (builder_engine.go) ------------------------------------------------------------
ARTIFACT_TYPE_NATIVE = "application/vnd.containerd.overlaybd.native.v1+json"
ARTIFACT_TYPE_TURBO = "application/vnd.containerd.overlaybd.turbo.v1+json"

# -- index entry annotations ----------------------------------------------------------------------
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_DOCKER_REFERENCE_TYPE = "vnd.docker.reference.type"
ANNOTATION_DOCKER_REFERENCE_DIGEST = "vnd.docker.reference.digest"
ATTESTATION_MANIFEST = "attestation-manifest"

# `created_by` of the history entry `obdconv convert --flatten` appends to a flattened image's
# config (push writes it, verify recognises a flattened image by it).
FLATTEN_CREATED_BY = "obdconv convert --flatten"
