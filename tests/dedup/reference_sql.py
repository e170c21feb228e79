"""The reference convertor's SQL, verbatim (accelerated-container-image cmd/convertor/database/mysql.go
and resources/samples/mysql.conf), so tests prove compatibility with the real statements, not ours."""

from __future__ import annotations

# resources/samples/mysql.conf (without its CREATE DATABASE / USE lines).
REFERENCE_DDL = [
    """CREATE TABLE `overlaybd_layers` (
  `host` varchar(255) NOT NULL,
  `repo` varchar(255) NOT NULL,
  `chain_id` varchar(255) NOT NULL COMMENT 'chain-id of the normal image layer',
  `data_digest` varchar(255) NOT NULL COMMENT 'digest of overlaybd layer',
  `data_size` bigint(20) NOT NULL COMMENT 'size of overlaybd layer',
  PRIMARY KEY (`host`,`repo`,`chain_id`),
  KEY `index_registry_chainId` (`host`,`chain_id`) USING BTREE
) DEFAULT CHARSET=utf8""",
    """CREATE TABLE `overlaybd_manifests` (
  `host` varchar(255) NOT NULL,
  `repo` varchar(255) NOT NULL,
  `src_digest` varchar(255) NOT NULL COMMENT 'digest of the normal image manifest',
  `out_digest` varchar(255) NOT NULL COMMENT 'digest of overlaybd manifest',
  `data_size` bigint(20) NOT NULL COMMENT 'size of overlaybd manifest',
  `mediatype` varchar(255) NOT NULL COMMENT 'mediatype of the converted image manifest',
  PRIMARY KEY (`host`,`repo`,`src_digest`, `mediatype`),
  KEY `index_registry_src_digest` (`host`,`src_digest`, `mediatype`) USING BTREE
) DEFAULT CHARSET=utf8""",
]

# database/mysql.go, with go-sql-driver's `?` placeholders.
CREATE_LAYER = "insert into overlaybd_layers(host, repo, chain_id, data_digest, data_size) values(?, ?, ?, ?, ?)"
GET_LAYER_FOR_REPO = ("select host, repo, chain_id, data_digest, data_size from overlaybd_layers "
                      "where host=? and repo=? and chain_id=?")
GET_CROSS_REPO_LAYERS = ("select host, repo, chain_id, data_digest, data_size from overlaybd_layers "
                         "where host=? and chain_id=?")
CREATE_MANIFEST = ("insert into overlaybd_manifests(host, repo, src_digest, out_digest, data_size, mediatype) "
                   "values(?, ?, ?, ?, ?, ?)")
GET_MANIFEST_FOR_REPO = ("select host, repo, src_digest, out_digest, data_size, mediatype from overlaybd_manifests "
                         "where host=? and repo=? and src_digest=? and mediatype=?")
GET_CROSS_REPO_MANIFESTS = ("select host, repo, src_digest, out_digest, data_size, mediatype from overlaybd_manifests "
                            "where host=? and src_digest=? and mediatype=?")
