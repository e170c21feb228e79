"""Media types, annotation keys and member names of converted images, spelled out here from the
spec (reference-convertor.md §4.1, §4.2, §3.6) instead of imported from the writer's modules: a
verifier sharing the writer's constants could not catch a typo in them."""

from __future__ import annotations

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
