"""Deduplication database: what was already converted (per registry host, repository, source chain id /
manifest digest and conversion profile), and who is converting what right now (claims).

    from obdconv.dedup import open_store, converted_layer_or_claim, record_layer, owner_id
    store = open_store(request.db_type, dsn, required=request.db_required)
    outcome = converted_layer_or_claim(store, target_repo, chain_id, profile, owner_id(), timeout=3600)
    if outcome.result is not None:
        digest, size = outcome.result          # converted already (HEAD-checked, or mounted from a sibling)
    else:
        with outcome.lease:                    # heartbeats; released at exit, also on error
            digest, size = convert_and_push(...)
            record_layer(store, target_repo, chain_id, profile, digest, size)   # only after the push

Modules: db (DSN parsing, the peewee `database` proxy, `register_model`), models (tables), schema
(create/migrate from config/schema.*.sql), store (`DedupStore`, `open_store`, `REFERENCE_PROFILE`),
claims (leases), lookup (the pipeline's lookups).
"""

from obdconv.dedup.claims import (
    ClaimTimeoutError,
    Lease,
    WaitOutcome,
    layer_claim_key,
    manifest_claim_key,
)
from obdconv.dedup.db import DatabaseConfig, database, parse_db_config, register_model
from obdconv.dedup.lookup import (
    converted_layer_or_claim,
    converted_manifest_or_claim,
    find_converted_layer,
    find_converted_manifest,
    owner_id,
    record_layer,
    record_manifest,
)
from obdconv.dedup.schema import SCHEMA_VERSION, init_schema
from obdconv.dedup.store import (
    REFERENCE_PROFILE,
    DedupStore,
    LayerRecord,
    ManifestRecord,
    manifest_profile_key,
    open_store,
    uses_reference_tables,
)

__all__ = [
    "REFERENCE_PROFILE",
    "SCHEMA_VERSION",
    "ClaimTimeoutError",
    "DatabaseConfig",
    "DedupStore",
    "LayerRecord",
    "Lease",
    "ManifestRecord",
    "WaitOutcome",
    "converted_layer_or_claim",
    "converted_manifest_or_claim",
    "database",
    "find_converted_layer",
    "find_converted_manifest",
    "init_schema",
    "layer_claim_key",
    "manifest_claim_key",
    "manifest_profile_key",
    "open_store",
    "owner_id",
    "parse_db_config",
    "record_layer",
    "record_manifest",
    "register_model",
    "uses_reference_tables",
]
