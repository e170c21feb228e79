-- obdconv dedup database schema for SQLite (schema version 1); same tables as schema.mysql.sql.
-- `obdconv db init --db-type sqlite --db-str PATH` runs exactly these statements; they are idempotent.
-- Statements are separated by a line ending in ';' (the loader splits there; keep ';' out of comments).
-- Times are text 'YYYY-MM-DD HH:MM:SS.SSS' in UTC from the database clock, so they compare as strings.

-- Reference convertor tables (same columns and keys as the reference's MySQL tables).
CREATE TABLE IF NOT EXISTS overlaybd_layers (
  host varchar(255) NOT NULL,
  repo varchar(255) NOT NULL,
  chain_id varchar(255) NOT NULL,
  data_digest varchar(255) NOT NULL,
  data_size bigint NOT NULL,
  PRIMARY KEY (host, repo, chain_id)
);
CREATE INDEX IF NOT EXISTS index_registry_chainId ON overlaybd_layers (host, chain_id);

CREATE TABLE IF NOT EXISTS overlaybd_manifests (
  host varchar(255) NOT NULL,
  repo varchar(255) NOT NULL,
  src_digest varchar(255) NOT NULL,
  out_digest varchar(255) NOT NULL,
  data_size bigint NOT NULL,
  mediatype varchar(255) NOT NULL,
  PRIMARY KEY (host, repo, src_digest, mediatype)
);
CREATE INDEX IF NOT EXISTS index_registry_src_digest ON overlaybd_manifests (host, src_digest, mediatype);

-- obdconv's own tables: the reference keys plus the conversion profile.
CREATE TABLE IF NOT EXISTS obdconv_layers (
  host varchar(255) NOT NULL,
  repo varchar(255) NOT NULL,
  chain_id varchar(255) NOT NULL,
  profile varchar(255) NOT NULL,
  data_digest varchar(255) NOT NULL,
  data_size bigint NOT NULL,
  created_at text NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
  PRIMARY KEY (host, repo, chain_id, profile)
);
CREATE INDEX IF NOT EXISTS obdconv_layers_host_chain ON obdconv_layers (host, chain_id, profile);

CREATE TABLE IF NOT EXISTS obdconv_manifests (
  host varchar(255) NOT NULL,
  repo varchar(255) NOT NULL,
  src_digest varchar(255) NOT NULL,
  mediatype varchar(255) NOT NULL,
  profile varchar(255) NOT NULL,
  out_digest varchar(255) NOT NULL,
  data_size bigint NOT NULL,
  created_at text NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
  PRIMARY KEY (host, repo, src_digest, mediatype, profile)
);
CREATE INDEX IF NOT EXISTS obdconv_manifests_host_src ON obdconv_manifests (host, src_digest, mediatype, profile);

-- In-flight conversions (leases), database clock.
CREATE TABLE IF NOT EXISTS obdconv_claims (
  "key" varchar(255) NOT NULL PRIMARY KEY,
  owner varchar(255) NOT NULL,
  expires_at text NOT NULL,
  heartbeat_at text NOT NULL,
  created_at text NOT NULL
);
CREATE INDEX IF NOT EXISTS obdconv_claims_expires ON obdconv_claims (expires_at);

-- Durable status of fleet requests (obdconv/status.py; the workers also create it when missing).
-- The callback_* columns came later: on a table without them, `obdconv db init` and every worker
-- add them in place (all NULL). By hand: ALTER TABLE obdconv_requests ADD COLUMN callback_state
-- varchar(16), then the same for callback_error text and callback_attempts integer.
CREATE TABLE IF NOT EXISTS obdconv_requests (
  request_id varchar(64) NOT NULL PRIMARY KEY,
  state varchar(16) NOT NULL,
  stage varchar(64) NOT NULL,
  source varchar(512) NOT NULL,
  request_json text NOT NULL,
  submitted_at real,
  started_at real,
  finished_at real,
  updated_at real NOT NULL,
  outputs_json text NOT NULL,
  error_class varchar(64) NOT NULL,
  error_message text NOT NULL,
  callback_state varchar(16),
  callback_error text,
  callback_attempts integer
);

CREATE TABLE IF NOT EXISTS obdconv_schema (
  name varchar(64) NOT NULL PRIMARY KEY,
  value varchar(255) NOT NULL
);

INSERT OR IGNORE INTO obdconv_schema (name, value) VALUES ('version', '1');
