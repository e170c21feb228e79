"""peewee models of the dedup tables (DDL: config/schema.mysql.sql, config/schema.sqlite.sql).

The tables are created from those SQL files (`obdconv.dedup.schema`), not by peewee, so DBAs and
`obdconv db init` use one definition; these models only map the columns. All bind to the
`obdconv.dedup.db.database` proxy.
"""

from __future__ import annotations

import peewee

from obdconv.dedup.db import database


class DedupModel(peewee.Model):
    class Meta:
        database = database


class ReferenceLayer(DedupModel):
    """`overlaybd_layers`: the reference convertor's layer table (no profile)."""

    host = peewee.CharField(max_length=255)
    repo = peewee.CharField(max_length=255)
    chain_id = peewee.CharField(max_length=255)
    data_digest = peewee.CharField(max_length=255)
    data_size = peewee.BigIntegerField()

    class Meta:
        table_name = "overlaybd_layers"
        primary_key = peewee.CompositeKey("host", "repo", "chain_id")


class ReferenceManifest(DedupModel):
    """`overlaybd_manifests`: the reference convertor's manifest table (no profile)."""

    host = peewee.CharField(max_length=255)
    repo = peewee.CharField(max_length=255)
    src_digest = peewee.CharField(max_length=255)
    out_digest = peewee.CharField(max_length=255)
    data_size = peewee.BigIntegerField()
    mediatype = peewee.CharField(max_length=255)

    class Meta:
        table_name = "overlaybd_manifests"
        primary_key = peewee.CompositeKey("host", "repo", "src_digest", "mediatype")


class ProfileLayer(DedupModel):
    """`obdconv_layers`: converted layers keyed by (host, repo, chain id, profile key)."""

    host = peewee.CharField(max_length=255)
    repo = peewee.CharField(max_length=255)
    chain_id = peewee.CharField(max_length=255)
    profile = peewee.CharField(max_length=255)
    data_digest = peewee.CharField(max_length=255)
    data_size = peewee.BigIntegerField()

    class Meta:
        table_name = "obdconv_layers"
        primary_key = peewee.CompositeKey("host", "repo", "chain_id", "profile")


class ProfileManifest(DedupModel):
    """`obdconv_manifests`: converted manifests keyed by (host, repo, source digest, media type, profile)."""

    host = peewee.CharField(max_length=255)
    repo = peewee.CharField(max_length=255)
    src_digest = peewee.CharField(max_length=255)
    mediatype = peewee.CharField(max_length=255)
    profile = peewee.CharField(max_length=255)
    out_digest = peewee.CharField(max_length=255)
    data_size = peewee.BigIntegerField()

    class Meta:
        table_name = "obdconv_manifests"
        primary_key = peewee.CompositeKey("host", "repo", "src_digest", "mediatype", "profile")


class Claim(DedupModel):
    """`obdconv_claims`: one lease per key; times come from the database clock."""

    key = peewee.CharField(max_length=255, primary_key=True, column_name="key")
    owner = peewee.CharField(max_length=255)
    expires_at = peewee.DateTimeField()
    heartbeat_at = peewee.DateTimeField()
    created_at = peewee.DateTimeField()

    class Meta:
        table_name = "obdconv_claims"


class SchemaInfo(DedupModel):
    """`obdconv_schema`: name/value pairs; `version` is the applied schema version."""

    name = peewee.CharField(max_length=64, primary_key=True)
    value = peewee.CharField(max_length=255)

    class Meta:
        table_name = "obdconv_schema"


DEDUP_MODELS: tuple[type[DedupModel], ...] = (
    ReferenceLayer, ReferenceManifest, ProfileLayer, ProfileManifest, Claim, SchemaInfo,
)
