"""`obdconv api`: the HTTP API in front of the fleet (api/README.md), served by uvicorn.

Reads the fleet's settings (config/settings.py) like a worker, plus its own `api_*` ones. One
process per replica: run as many replicas as needed behind a load balancer (they share all state
through Redis and the database). FastAPI and uvicorn are imported only when this command runs.
"""

from __future__ import annotations

import argparse
import logging

from obdconv.errors import UsageError


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {listen!r}: expected host:port, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from config.settings import load_settings

    settings = load_settings()
    host, port = split_listen(args.listen or settings.api_listen)
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger("api").setLevel(logging.INFO)  # what was queued, cancelled, ignored
    uvicorn.run("api.app:create_app", factory=True, host=host, port=port, access_log=args.access_log,
                log_level="info", proxy_headers=args.proxy_headers, forwarded_allow_ips=args.forwarded_allow_ips,
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("api", help="HTTP API in front of the fleet (REST + registry events)")
    p.add_argument("--listen", default="", help="host:port to listen on (default: setting api_listen)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log one line per request (method, path, status; never headers)")
    p.add_argument("--proxy-headers", action="store_true",
                   help="trust X-Forwarded-* from --forwarded-allow-ips (behind a load balancer)")
    p.add_argument("--forwarded-allow-ips", default="127.0.0.1")
    p.add_argument("--graceful-timeout", type=int, default=20, help="seconds to finish requests on SIGTERM")
    p.set_defaults(func=run)
