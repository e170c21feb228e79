"""A real Flower (`obdconv flower`, i.e. `celery -A workers flower`) on 127.0.0.1 with basic auth, for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests

from obdconv.interpreter import python_command
from tests.services.base import ManagedProcess, free_port


class FlowerServer:
    def __init__(self, workdir: Path, env: dict[str, str], user: str = "flower", password: str = "fl0wer-pw") -> None:
        self.port = free_port()
        self.user, self.password = user, password
        self.process = ManagedProcess(
            f"flower-{self.port}",
            python_command("-m", "obdconv", "flower", "--address=127.0.0.1", f"--port={self.port}",
                           f"--basic-auth={user}:{password}"),
            workdir, ready=self._ready, env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
            timeout=40,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth_url(self) -> str:
        return f"http://{self.user}:{self.password}@127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        return requests.get(self.base_url + "/api/workers", auth=(self.user, self.password), timeout=2).ok

    def api(self, path: str, **params: Any) -> Any:
        r = requests.get(self.base_url + path, auth=(self.user, self.password), params=params, timeout=10)
        r.raise_for_status()
        return r.json()

    def start(self) -> FlowerServer:
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()
