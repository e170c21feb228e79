"""A fault-injecting HTTP proxy for tests, run as its own process in front of a real registry:

    python tests/services/fault_proxy.py CONFIG.json

CONFIG: {"port": int, "control_port": int, "upstream": "127.0.0.1:PORT"}. Clients talk to `port`
as if it were the registry (the registry builds upload `Location`s from the Host header, so they
point back at the proxy). Every request is forwarded on its own upstream connection and answered
with `Connection: close` (simple framing: the response body is whatever the registry sends until
it closes), unless a rule matches it first.

Rules are added at run time through the control port (JSON over HTTP, see `FaultProxy` below):
{"method": "GET" | "*", "path": regex searched in the request path (with query),
 "header": optional request header that must be present (e.g. "Range"), "times": how many
 matching requests the rule acts on (-1: all), "action": one of
   "status"                 answer `status` (e.g. 500, 502, 503, 429) with a distribution error
                            body and, if given, `Retry-After: retry_after`; upstream never sees it
   "reset"                  reset the connection (TCP RST) before any answer
   "delay"                  wait `seconds`, then forward (a slow registry: late response headers)
   "hold"                   never answer: keep the request until the rule is released (or
                            `seconds` pass), then reset; upstream never sees it
   "reset_response_after"   forward; reset after `bytes` bytes of the response body
   "stall_response_after"   forward; after `bytes` bytes of the response body, hold (as "hold")
   "reset_request_after"    forward; reset both sides after `bytes` bytes of the request body
   "stall_request_after"    forward; after `bytes` bytes of the request body, hold (as "hold"),
                            then reset both sides
   "drop_response"          forward; the registry acts on it, but the client gets a reset instead
                            of the answer (a response lost on the way back)
   "throttle"               forward; response body at `rate` bytes per second
}
The log (`GET /log`) lists every request: method, path, the rule that acted (or ""), the action
and the upstream status. Released or cleared holds end with a reset, never a late answer, so a
request held for a client that died meanwhile never reaches the registry.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import socketserver
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

HOLD_LIMIT = 300.0  # seconds: a hold nobody releases ends (with a reset) after this
SOCKET_TIMEOUT = 120.0
COPY_CHUNK = 64 << 10


class Rule:
    def __init__(self, rule_id: str, spec: dict[str, Any]) -> None:
        self.id = rule_id
        self.spec = spec
        self.method = str(spec.get("method", "*")).upper()
        self.path = re.compile(str(spec.get("path", "")))
        self.header = str(spec.get("header", "")).lower()
        self.remaining = int(spec.get("times", -1))
        self.action = str(spec["action"])
        self.hits = 0
        self.released = threading.Event()

    def matches(self, method: str, path: str, headers: dict[str, str]) -> bool:
        return ((self.method in ("*", method)) and self.path.search(path) is not None
                and (not self.header or self.header in headers) and self.remaining != 0)

    def to_dict(self) -> dict[str, Any]:
        return {**self.spec, "id": self.id, "remaining": self.remaining, "hits": self.hits}


class State:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.lock = threading.Lock()
        self.rules: list[Rule] = []
        self.log: list[dict[str, Any]] = []
        self.ids = itertools.count(1)

    def add(self, spec: dict[str, Any]) -> Rule:
        with self.lock:
            rule = Rule(f"r{next(self.ids)}", spec)
            self.rules.append(rule)
            return rule

    def take(self, method: str, path: str, headers: dict[str, str]) -> Rule | None:
        """The first rule matching this request, its count taken (rules act in the order added)."""
        with self.lock:
            for rule in self.rules:
                if rule.matches(method, path, headers):
                    if rule.remaining > 0:
                        rule.remaining -= 1
                    rule.hits += 1
                    return rule
        return None

    def clear(self) -> None:
        with self.lock:
            for rule in self.rules:
                rule.released.set()
            self.rules = []

    def release(self) -> None:
        with self.lock:
            for rule in self.rules:
                rule.released.set()

    def rule(self, rule_id: str) -> Rule:
        with self.lock:
            for rule in self.rules:
                if rule.id == rule_id:
                    return rule
        done = Rule(rule_id, {"action": "hold"})  # cleared meanwhile: nothing to wait for
        done.released.set()
        return done

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.log.append(entry)
        sys.stdout.write(json.dumps(entry) + "\n")
        sys.stdout.flush()


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), what a crashed peer or a middlebox drop looks like."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _read_head(f: BinaryIO) -> tuple[str, list[tuple[str, str]]] | None:
    """The start line and header fields of an HTTP/1.1 message, or None at EOF."""
    start = f.readline(65536)
    if not start:
        return None
    headers: list[tuple[str, str]] = []
    while True:
        line = f.readline(65536)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return start.decode("latin-1").rstrip("\r\n"), headers


def _head_bytes(start: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [start, *(f"{k}: {v}" for k, v in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _with_close(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in headers if k.lower() not in ("connection", "keep-alive", "proxy-connection")]
    return [*kept, ("Connection", "close")]


def _body_pieces(f: BinaryIO, headers: dict[str, str]) -> Any:
    """The request body as raw wire pieces (chunk framing kept), by Content-Length or chunked."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = f.readline(65536)
            if not size_line:
                return
            yield size_line
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, up to the empty line
                    trailer = f.readline(65536)
                    yield trailer
                    if trailer in (b"\r\n", b"\n", b""):
                        return
            left = size + 2  # data + CRLF
            while left:
                piece = f.read(min(left, COPY_CHUNK))
                if not piece:
                    return
                left -= len(piece)
                yield piece
    else:
        left = int(headers.get("content-length", "0") or 0)
        while left > 0:
            piece = f.read(min(left, COPY_CHUNK))
            if not piece:
                return
            left -= len(piece)
            yield piece


def _hold(rule: Rule) -> None:
    rule.released.wait(float(rule.spec.get("seconds", HOLD_LIMIT)))


class ProxyHandler(socketserver.BaseRequestHandler):
    server: ProxyServer

    def handle(self) -> None:
        client: socket.socket = self.request
        client.settimeout(SOCKET_TIMEOUT)
        try:
            if client.recv(1, socket.MSG_PEEK) == b"\x16":  # a TLS handshake: this proxy speaks plain HTTP
                _reset(client)
                return
        except OSError:
            return
        reader = client.makefile("rb")
        try:
            head = _read_head(reader)
        except OSError:
            return
        if head is None:
            return
        start, header_list = head
        method, path = [*start.split(" "), "", ""][:2]
        headers = {k.lower(): v for k, v in header_list}
        state = self.server.state
        rule = state.take(method, path, headers)
        entry: dict[str, Any] = {"time": time.time(), "method": method, "path": path,
                                 "rule": rule.id if rule else "", "action": rule.action if rule else "", "status": 0}
        try:
            self._serve(client, reader, start, header_list, headers, rule, entry)
        except OSError as e:
            entry["error"] = f"{type(e).__name__}: {e}"
        finally:
            entry["seconds"] = round(time.time() - entry["time"], 3)
            state.record(entry)

    def _serve(self, client: socket.socket, reader: BinaryIO, start: str, header_list: list[tuple[str, str]],
               headers: dict[str, str], rule: Rule | None, entry: dict[str, Any]) -> None:
        action = rule.action if rule else ""
        spec = rule.spec if rule else {}
        if action == "reset":
            _reset(client)
            return
        if action == "hold":
            _hold(rule)  # type: ignore[arg-type]
            _reset(client)
            return
        if action == "status":
            for _ in _body_pieces(reader, headers):  # read it all: the client then sees the answer
                pass
            status = int(spec.get("status", 503))
            code = "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE"
            body = json.dumps({"errors": [{"code": code, "message": f"injected {status}"}]}).encode()
            extra = [("Retry-After", str(spec["retry_after"]))] if "retry_after" in spec else []
            client.sendall(_head_bytes(f"HTTP/1.1 {status} Injected", [
                ("Content-Type", "application/json"), ("Content-Length", str(len(body))), *extra,
                ("Connection", "close")]) + body)
            entry["status"] = status
            client.close()
            return
        if action == "delay":
            time.sleep(float(spec.get("seconds", 1.0)))
        upstream = socket.create_connection(self.server.state.upstream, timeout=SOCKET_TIMEOUT)
        try:
            upstream.sendall(_head_bytes(start, _with_close(header_list)))
            sent = 0
            limit = int(spec.get("bytes", 0))
            for piece in _body_pieces(reader, headers):
                if action in ("reset_request_after", "stall_request_after") and sent + len(piece) > limit:
                    upstream.sendall(piece[:max(limit - sent, 0)])
                    entry["sent"] = limit
                    if action == "stall_request_after":
                        _hold(rule)  # type: ignore[arg-type]
                    _reset(client)
                    _reset(upstream)
                    return
                upstream.sendall(piece)
                sent += len(piece)
            up = upstream.makefile("rb")
            head = _read_head(up)
            if head is None:
                _reset(client)
                return
            status_line, response_headers = head
            entry["status"] = int(status_line.split(" ")[1])
            if action == "drop_response":
                while up.read1(COPY_CHUNK):  # type: ignore[attr-defined]
                    pass
                _reset(client)
                return
            client.sendall(_head_bytes(status_line, _with_close(response_headers)))
            self._copy_response(client, up, action, spec, entry)
        finally:
            with contextlib.suppress(OSError):
                upstream.close()

    def _copy_response(self, client: socket.socket, up: BinaryIO, action: str, spec: dict[str, Any],
                       entry: dict[str, Any]) -> None:
        limit = int(spec.get("bytes", 0))
        rate = float(spec.get("rate", 0))
        copied = 0
        started = time.monotonic()
        while True:
            want = COPY_CHUNK
            if action in ("reset_response_after", "stall_response_after"):
                want = min(want, limit - copied) or 1
            if action == "throttle" and rate:
                want = max(1, min(want, int(rate / 10)))
            piece = up.read1(want)  # type: ignore[attr-defined]
            if not piece:
                break
            if action in ("reset_response_after", "stall_response_after") and copied + len(piece) > limit:
                client.sendall(piece[:limit - copied])
                entry["sent"] = limit
                if action == "stall_response_after":
                    _hold(self.server.state.rule(entry["rule"]))
                _reset(client)
                return
            client.sendall(piece)
            copied += len(piece)
            if action == "throttle" and rate:
                ahead = copied / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        entry["sent"] = copied
        client.close()


class ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: State) -> None:
        self.state = state
        super().__init__(address, ProxyHandler)


def make_control_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Control(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/log":
                with state.lock:
                    self._reply(200, list(state.log))
            elif self.path == "/rules":
                with state.lock:
                    self._reply(200, [r.to_dict() for r in state.rules])
            else:
                self._reply(200 if self.path == "/health" else 404, {})

        def do_POST(self) -> None:
            if self.path == "/rules":
                spec = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                self._reply(200, {"id": state.add(spec).id})
            elif self.path == "/release":
                state.release()
                self._reply(200, {})
            else:
                self._reply(404, {})

        def do_DELETE(self) -> None:
            if self.path == "/rules":
                state.clear()
            elif self.path == "/log":
                with state.lock:
                    state.log = []
            self._reply(200, {})

    return Control


def main(argv: list[str]) -> int:
    config = json.loads(Path(argv[1]).read_text())
    host, _, port = str(config["upstream"]).rpartition(":")
    state = State((host, int(port)))
    control = ThreadingHTTPServer(("127.0.0.1", int(config["control_port"])), make_control_handler(state))
    threading.Thread(target=control.serve_forever, daemon=True).start()
    proxy = ProxyServer(("127.0.0.1", int(config["port"])), state)
    sys.stdout.write(f"fault proxy 127.0.0.1:{config['port']} -> {config['upstream']}, "
                     f"control 127.0.0.1:{config['control_port']}\n")
    sys.stdout.flush()
    proxy.serve_forever()
    return 0


# ---- test-side helpers (imported by fixtures; not used by the proxy process) --------------------------------

class FaultProxy:
    """A running proxy: `.host` ("127.0.0.1:PORT", use it as the registry host), `.add(...)` a rule
    (returns its id), `.clear()` (rules gone, holds end), `.release()`, `.log()`, `.hits(id)`."""

    def __init__(self, process: Any, port: int, control_port: int) -> None:
        self.process = process
        self.port = port
        self.control_port = control_port

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _control(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import requests

        session = requests.Session()
        session.trust_env = False
        response = session.request(method, f"http://127.0.0.1:{self.control_port}{path}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def add(self, action: str, path: str, method: str = "*", times: int = -1, **options: Any) -> str:
        return str(self._control("POST", "/rules", {"action": action, "path": path, "method": method,
                                                    "times": times, **options})["id"])

    def clear(self) -> None:
        self._control("DELETE", "/rules")

    def release(self) -> None:
        self._control("POST", "/release")

    def log(self, rule_id: str | None = None) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self._control("GET", "/log")
        return entries if rule_id is None else [e for e in entries if e["rule"] == rule_id]

    def clear_log(self) -> None:
        self._control("DELETE", "/log")

    def hits(self, rule_id: str) -> int:
        for rule in self._control("GET", "/rules"):
            if rule["id"] == rule_id:
                return int(rule["hits"])
        return len(self.log(rule_id))

    def wait_for_hits(self, rule_id: str, count: int = 1, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.hits(rule_id) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fault proxy rule {rule_id}: fewer than {count} hit(s) in {timeout}s; "
                                     f"log tail: {self.log()[-10:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.stop()


def start_fault_proxy(workdir: Path, upstream: str, name: str = "fault-proxy") -> FaultProxy:
    """Start a proxy in front of `upstream` ("127.0.0.1:PORT") on free ports; wait until it answers."""
    from tests.services.base import ManagedProcess, free_port, port_open

    workdir.mkdir(parents=True, exist_ok=True)
    port, control_port = free_port(), free_port()
    config_path = workdir / f"{name}.json"
    config_path.write_text(json.dumps({"port": port, "control_port": control_port, "upstream": upstream}))
    process = ManagedProcess(name, [sys.executable, str(Path(__file__).resolve()), str(config_path)], workdir,
                             ready=lambda: port_open(port) and port_open(control_port), timeout=20.0)
    process.start()
    return FaultProxy(process, port, control_port)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
