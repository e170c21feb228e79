"""One TLS configuration for every registry host (spec §1): system CAs + --root-ca + `*.crt` from
--cert-dir; client certificates from --client-cert and `*.cert`/`*.key` pairs in --cert-dir; --insecure."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from obdconv.errors import UsageError
from obdconv.registry.options import RegistryOptions, split_client_cert

log = logging.getLogger(__name__)


def _cert_dir_files(directories: list[str]) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """(*.crt CA files, (*.cert, *.key) client pairs); missing or unreadable directories are skipped."""
    cas: list[Path] = []
    pairs: list[tuple[Path, Path]] = []
    for directory in directories:
        try:
            entries = sorted(Path(directory).iterdir())
        except (FileNotFoundError, PermissionError, NotADirectoryError):
            continue  # the reference convertor silently skips these
        for path in entries:
            if path.suffix == ".crt":
                cas.append(path)
            elif path.suffix == ".cert":
                key = path.with_suffix(".key")
                if not key.exists():
                    raise UsageError(f"client certificate {path} has no matching key {key.name}")
                pairs.append((path, key))
    return cas, pairs


def build_ssl_context(options: RegistryOptions) -> ssl.SSLContext:
    context = ssl.create_default_context()  # system CA pool
    cas, pairs = _cert_dir_files(options.cert_dir)
    for ca in [*map(Path, options.root_ca), *cas]:
        if not ca.is_file():
            raise UsageError(f"root CA file {ca} cannot be read")
        try:
            context.load_verify_locations(cafile=str(ca))
        except ssl.SSLError:
            # Like Go's AppendCertsFromPEM, a file without a parseable certificate is ignored.
            log.warning("no usable certificate in root CA file %s", ca)
    pairs = [*(tuple(map(Path, split_client_cert(v))) for v in options.client_cert), *pairs]
    if pairs:
        # Python's ssl offers one client chain per context where Go picks among several by the
        # server's acceptable CAs: the first pair is used and the others are reported.
        cert, key = pairs[0]
        try:
            context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"client certificate {cert} / key {key} cannot be loaded: {e}") from None
        for cert, _ in pairs[1:]:
            log.warning("only one client certificate is supported; ignoring %s", cert)
    if options.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
