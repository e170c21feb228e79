"""A small Docker-registry token server for tests (distribution's token auth spec), run as its own process:

    python tests/services/token_server.py CONFIG.json

CONFIG: {"port": int, "issuer": str, "service": str, "key": PEM path, "cert": PEM path,
         "users": {"name": "password"}, "acl": [{"account": str, "repository": glob, "actions": [...]}]}
ACL "account": a user name, "*" (any authenticated user) or "" (anonymous). A request's scopes are
granted only as far as the ACL allows (like real token servers: a partial grant, not an error); a wrong
password is a 401. Tokens are RS256 JWTs whose `x5c` header carries the signing certificate, which the
registry trusts through `auth.token.rootcertbundle`. Each grant is logged (never the password).

`start_token_server(workdir, ...)` starts it with ManagedProcess and returns a `TokenServer`.
"""

from __future__ import annotations

import base64
import fnmatch
import hmac
import json
import os
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

TOKEN_LIFETIME = 300


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _Signer:
    def __init__(self, key_path: str, cert_path: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        self._key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()

    def sign(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg]
        return signing_input + "." + _b64url(signature)


def _parse_scope(scope: str) -> list[tuple[str, str, list[str]]]:
    out = []
    for item in scope.split():
        parts = item.split(":")
        if len(parts) < 3:
            continue
        out.append((parts[0], ":".join(parts[1:-1]), [a for a in parts[-1].split(",") if a]))
    return out


def make_handler(config: dict[str, Any], signer: _Signer) -> type[BaseHTTPRequestHandler]:
    users: dict[str, str] = config.get("users", {})
    acl: list[dict[str, Any]] = config.get("acl", [])

    def allowed(account: str, repository: str) -> set[str]:
        actions: set[str] = set()
        for rule in acl:
            who = rule.get("account", "")
            if who == account or (who == "*" and account):
                if fnmatch.fnmatchcase(repository, rule["repository"]):
                    actions.update(rule["actions"])
        return actions

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # access log without query secrets
            sys.stdout.write(f"{self.address_string()} {self.command} {urlparse(self.path).path} -> "
                             f"{args[1] if len(args) > 1 else ''}\n")
            sys.stdout.flush()

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path != "/token":
                self._reply(404, {"error": "not found"})
                return
            query = parse_qs(url.query)
            account = ""
            header = self.headers.get("Authorization", "")
            if header.startswith("Basic "):
                try:
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                except ValueError:
                    user, password = "", ""
                expected = users.get(user)
                if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
                    sys.stdout.write(f"token denied: bad credentials for {user!r}\n")
                    sys.stdout.flush()
                    self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                    return
                account = user
            if query.get("service", [""])[0] != config["service"]:
                self._reply(400, {"errors": [{"code": "INVALID", "message": "unknown service"}]})
                return
            access = []
            for scope in query.get("scope", []):
                for kind, name, actions in _parse_scope(scope):
                    if kind != "repository":
                        continue
                    permitted = allowed(account, name)
                    granted = sorted(set(actions) if "*" in permitted else set(actions) & permitted)
                    if granted:
                        access.append({"type": kind, "name": name, "actions": granted})
            now = int(time.time())
            claims = {"iss": config["issuer"], "sub": account, "aud": config["service"], "exp": now + TOKEN_LIFETIME,
                      "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
            token = signer.sign(claims)
            sys.stdout.write(f"token account={account or '<anonymous>'} requested={query.get('scope', [])} "
                             f"granted={json.dumps(access, separators=(',', ':'))}\n")
            sys.stdout.flush()
            self._reply(200, {"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME,
                              "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))})

    return Handler


def main(argv: list[str]) -> int:
    config = json.loads(Path(argv[1]).read_text())
    signer = _Signer(config["key"], config["cert"])
    server = ThreadingHTTPServer(("127.0.0.1", int(config["port"])), make_handler(config, signer))
    sys.stdout.write(f"token server listening on 127.0.0.1:{config['port']} pid {os.getpid()}\n")
    sys.stdout.flush()
    server.serve_forever()
    return 0


# ---- test-side helpers (imported by fixtures; not used by the server process) -------------------------------

class TokenServer:
    def __init__(self, process: Any, port: int, config: dict[str, Any]) -> None:
        self.process = process
        self.port = port
        self.config = config

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def grants_logged(self) -> list[str]:
        return [line for line in self.process.tail(1 << 20).splitlines() if line.startswith("token ")]

    def stop(self) -> None:
        self.process.stop()


def start_token_server(workdir: Path, users: dict[str, str], acl: list[dict[str, Any]],
                       service: str = "obdconv-test-registry", issuer: str = "obdconv-test-issuer") -> TokenServer:
    import urllib.request

    from tests.services.base import ManagedProcess, free_port
    from tests.services.registry import make_signing_cert

    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = make_signing_cert(workdir / "signing")
    port = free_port()
    config = {"port": port, "issuer": issuer, "service": service, "key": str(key), "cert": str(cert),
              "users": users, "acl": acl}
    config_path = workdir / "token-server.json"
    config_path.write_text(json.dumps(config))

    def ready() -> bool:
        url = f"http://127.0.0.1:{port}/token?service={service}"
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200

    process = ManagedProcess("token-server", [sys.executable, str(Path(__file__).resolve()), str(config_path)],
                             workdir, ready=ready, timeout=20.0)
    process.start()
    return TokenServer(process, port, config)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
