"""OCI side of obdconv: media types, digests and chain ids, manifest/index/config JSON, layer
decompression, the streaming tar scanner (`tarscan`, over the header fields of `tarheader`) and
filesystem tree models (`tree`).

Modules are imported explicitly (`from obdconv.oci.tarscan import TarScanner`); nothing heavy here.
"""
