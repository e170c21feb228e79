-- obdconv dedup database schema for MySQL / MariaDB (schema version 1).
-- `obdconv db init --db-type mysql --db-str DSN` runs exactly these statements; they are idempotent
-- (CREATE ... IF NOT EXISTS), so existing reference tables and their rows are left intact.
-- Statements are separated by a line ending in ';' (the loader splits there; keep ';' out of comments).

-- Reference convertor tables (accelerated-container-image cmd/convertor/resources/samples/mysql.conf),
-- unchanged so an existing deployment and the reference convertor keep working. obdconv reads them only
-- for the reference profile (native, ext4, 64 GB, mkfs, lz4, 4 KiB) and mirrors its rows of that profile
-- into them.
CREATE TABLE IF NOT EXISTS `overlaybd_layers` (
  `host` varchar(255) NOT NULL,
  `repo` varchar(255) NOT NULL,
  `chain_id` varchar(255) NOT NULL COMMENT 'chain-id of the normal image layer',
  `data_digest` varchar(255) NOT NULL COMMENT 'digest of overlaybd layer',
  `data_size` bigint(20) NOT NULL COMMENT 'size of overlaybd layer',
  PRIMARY KEY (`host`,`repo`,`chain_id`),
  KEY `index_registry_chainId` (`host`,`chain_id`) USING BTREE
) DEFAULT CHARSET=utf8;

CREATE TABLE IF NOT EXISTS `overlaybd_manifests` (
  `host` varchar(255) NOT NULL,
  `repo` varchar(255) NOT NULL,
  `src_digest` varchar(255) NOT NULL COMMENT 'digest of the normal image manifest',
  `out_digest` varchar(255) NOT NULL COMMENT 'digest of overlaybd manifest',
  `data_size` bigint(20) NOT NULL COMMENT 'size of overlaybd manifest',
  `mediatype` varchar(255) NOT NULL COMMENT 'mediatype of the converted image manifest',
  PRIMARY KEY (`host`,`repo`,`src_digest`,`mediatype`),
  KEY `index_registry_src_digest` (`host`,`src_digest`,`mediatype`) USING BTREE
) DEFAULT CHARSET=utf8;

-- obdconv's own tables: the reference keys plus the conversion profile
-- (ConversionProfile.key(), e.g. 'native/ext4/v64/mkfs/lz4-4k/obdconv-1'; manifests of --referrer
-- conversions append '/referrer'). ASCII with binary collation: registry hosts, repository names,
-- digests and profile keys are ASCII by definition, compared exactly, and the four/five-column primary
-- keys stay within InnoDB's 3072-byte key limit.
CREATE TABLE IF NOT EXISTS `obdconv_layers` (
  `host` varchar(255) NOT NULL,
  `repo` varchar(255) NOT NULL,
  `chain_id` varchar(255) NOT NULL COMMENT 'chain-id of the source layer',
  `profile` varchar(255) NOT NULL COMMENT 'conversion profile key',
  `data_digest` varchar(255) NOT NULL COMMENT 'digest of the converted layer blob',
  `data_size` bigint(20) NOT NULL COMMENT 'size of the converted layer blob',
  `created_at` datetime(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
  PRIMARY KEY (`host`,`repo`,`chain_id`,`profile`),
  KEY `obdconv_layers_host_chain` (`host`,`chain_id`,`profile`)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

CREATE TABLE IF NOT EXISTS `obdconv_manifests` (
  `host` varchar(255) NOT NULL,
  `repo` varchar(255) NOT NULL,
  `src_digest` varchar(255) NOT NULL COMMENT 'digest of the source image manifest',
  `mediatype` varchar(255) NOT NULL COMMENT 'media type of the converted manifest',
  `profile` varchar(255) NOT NULL COMMENT 'conversion profile key',
  `out_digest` varchar(255) NOT NULL COMMENT 'digest of the converted manifest',
  `data_size` bigint(20) NOT NULL COMMENT 'size of the converted manifest',
  `created_at` datetime(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
  PRIMARY KEY (`host`,`repo`,`src_digest`,`mediatype`,`profile`),
  KEY `obdconv_manifests_host_src` (`host`,`src_digest`,`mediatype`,`profile`)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

-- In-flight conversions (leases). Times are the DATABASE's clock (NOW(6)), so workers with skewed
-- clocks agree on expiry.
CREATE TABLE IF NOT EXISTS `obdconv_claims` (
  `key` varchar(255) NOT NULL COMMENT 'what is being converted (see obdconv.dedup.claims)',
  `owner` varchar(255) NOT NULL COMMENT 'who holds the lease (host/pid/task id)',
  `expires_at` datetime(6) NOT NULL,
  `heartbeat_at` datetime(6) NOT NULL,
  `created_at` datetime(6) NOT NULL,
  PRIMARY KEY (`key`),
  KEY `obdconv_claims_expires` (`expires_at`)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

-- Durable status of fleet requests (obdconv/status.py; the workers also create it when missing).
-- The callback_* columns came later: on a table without them, `obdconv db init` and every worker
-- add them in place (all NULL, instant on MySQL 8 / MariaDB 10.3+). By hand, for a DBA:
--   ALTER TABLE `obdconv_requests` ADD COLUMN `callback_state` varchar(16) NULL,
--     ADD COLUMN `callback_error` text NULL, ADD COLUMN `callback_attempts` int NULL
CREATE TABLE IF NOT EXISTS `obdconv_requests` (
  `request_id` varchar(64) NOT NULL,
  `state` varchar(16) NOT NULL,
  `stage` varchar(64) NOT NULL,
  `source` varchar(512) NOT NULL,
  `request_json` text NOT NULL,
  `submitted_at` double DEFAULT NULL,
  `started_at` double DEFAULT NULL,
  `finished_at` double DEFAULT NULL,
  `updated_at` double NOT NULL,
  `outputs_json` text NOT NULL,
  `error_class` varchar(64) NOT NULL,
  `error_message` text NOT NULL,
  `callback_state` varchar(16) DEFAULT NULL COMMENT 'completion callback: PENDING/RETRYING/DELIVERED/FAILED',
  `callback_error` text DEFAULT NULL,
  `callback_attempts` int DEFAULT NULL,
  PRIMARY KEY (`request_id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS `obdconv_schema` (
  `name` varchar(64) NOT NULL,
  `value` varchar(255) NOT NULL,
  PRIMARY KEY (`name`)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

INSERT IGNORE INTO `obdconv_schema` (`name`, `value`) VALUES ('version', '1');
