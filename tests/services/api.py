"""The HTTP API (`obdconv api`, uvicorn) as a separate process on 127.0.0.1 for tests.

`ApiServer(workdir, env)` writes nothing itself: the caller's env names the tokens, rules and
event secrets files (see `write_api_files`). Several servers on the same Redis/database are
replicas of one API (tests check they answer alike).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import requests

from tests.services.base import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parents[2]


def write_api_files(directory: Path, tokens: list[dict[str, Any]], rules: str = "",
                    secrets: dict[str, str] | None = None) -> dict[str, str]:
    """Tokens (each {"name", "token", "repositories"[, "rate_limit"]}: stored as sha256), rules (TOML text) and event
    secrets files (mode 0600) in `directory`; returns the OBDCONV_API_* variables naming them."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for t in tokens:
        lines += ["[[tokens]]", f"name = {json.dumps(t['name'])}",
                  f"sha256 = \"{hashlib.sha256(t['token'].encode()).hexdigest()}\"",
                  f"repositories = {json.dumps(t['repositories'])}"]
        if "rate_limit" in t:
            lines.append(f"rate_limit = {int(t['rate_limit'])}")
        lines.append("")
    (directory / "tokens.toml").write_text("\n".join(lines))
    (directory / "rules.toml").write_text(rules)
    secrets_path = directory / "event-secrets.toml"
    secrets_path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in (secrets or {}).items()))
    os.chmod(secrets_path, 0o600)
    return {"OBDCONV_API_TOKENS_FILE": str(directory / "tokens.toml"),
            "OBDCONV_API_RULES_FILE": str(directory / "rules.toml"),
            "OBDCONV_API_EVENT_SECRETS_FILE": str(secrets_path)}


class ApiServer:
    def __init__(self, workdir: Path, env: dict[str, str], name: str = "api") -> None:
        self.port = free_port()
        self.process = ManagedProcess(
            f"{name}-{self.port}",
            [sys.executable, "-m", "obdconv", "api", "--listen", f"127.0.0.1:{self.port}"],
            workdir, ready=self._ready, env={**env, "PYTHONPATH": str(ROOT)}, timeout=40)
        self.session = requests.Session()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        return requests.get(self.url + "/healthz", timeout=1).status_code == 200

    def request(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.session.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def log_text(self) -> str:
        return self.process.log_path.read_text(errors="replace")

    def start(self) -> ApiServer:
        self.process.start()
        return self

    def stop(self) -> None:
        self.session.close()
        self.process.stop()
