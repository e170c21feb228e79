"""A completion-callback receiver on 127.0.0.1 for tests: a real HTTP server in its own process that
checks obdconv's signature the way a receiver in another language would, from the documented
scheme only (tasks/README.md), without importing obdconv:

    X-Obdconv-Signature == "sha256=" + hex(HMAC-SHA256(key, X-Obdconv-Timestamp + "." + body))
    and the timestamp within 5 minutes of now.

Answers 204 to a valid POST, 401 to anything else; every POST is appended to a JSON-lines log
(`received()`), with its verdict. `WebhookReceiver(workdir, key).start()` / `.stop()` (by pid).
Run directly: `python -m tests.services.webhook_receiver PORT KEY LOG`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.services.base import ManagedProcess, free_port, port_open

MAX_AGE_SECONDS = 300
MAX_BODY = 1 << 20


def _handler(key: bytes, log: Path) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(min(length, MAX_BODY))
            timestamp = self.headers.get("X-Obdconv-Timestamp", "")
            signature = self.headers.get("X-Obdconv-Signature", "")
            expected = "sha256=" + hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
            fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) <= MAX_AGE_SECONDS
            valid = fresh and hmac.compare_digest(expected, signature)
            record = {"path": self.path, "valid": valid, "body": body.decode("utf-8", errors="replace"),
                      "headers": {k: v for k, v in self.headers.items() if k.lower().startswith("x-obdconv-")},
                      "content_type": self.headers.get("Content-Type", "")}
            with lock, open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.send_response(204 if valid else 401)
            self.send_header("Content-Length", "0" if valid else "13")
            self.end_headers()
            if not valid:
                self.wfile.write(b"bad signature")

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write("receiver: " + format % args + "\n")

    return Handler


class WebhookReceiver:
    def __init__(self, workdir: Path, key: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log = workdir / f"received-{self.port}.jsonl"
        self.process = ManagedProcess(
            f"webhook-receiver-{self.port}",
            [sys.executable, "-m", "tests.services.webhook_receiver", str(self.port), key, str(self.log)],
            workdir, ready=lambda: port_open(self.port), timeout=20,
            env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def received(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def start(self) -> WebhookReceiver:
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()


def main(argv: list[str]) -> None:
    port, key, log = int(argv[0]), argv[1].encode(), Path(argv[2])
    ThreadingHTTPServer(("127.0.0.1", port), _handler(key, log)).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
