"""A fleet task heartbeats all of its request's claims in one statement (tasks/claims.py): one per
claim made a request's database queries grow with the square of its layers (docs/CAPACITY.md)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

import workers.database
from obdconv.dedup import claims
from obdconv.dedup.claims import layer_claim_key
from obdconv.dedup.store import REFERENCE_PROFILE
from tasks.claims import held_claims
from workers.app import app, settings_of


@pytest.fixture
def worker_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(app, "obdconv_settings",
                        settings_of(app).with_overrides(db_type="sqlite", db_str=str(tmp_path / "w.sqlite")))
    monkeypatch.setattr(workers.database, "_db_pid", None)
    yield workers.database.dedup_store()
    monkeypatch.setattr(workers.database, "_db_pid", None)


def test_a_task_beats_all_its_claims_in_one_statement(worker_db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [layer_claim_key("registry.test:5000", f"sha256:{i:064x}", REFERENCE_PROFILE) for i in range(30)]
    owner = "fleet:request:manifest"
    for key in keys:
        assert worker_db.claim(key, owner, ttl=300)
    statements = []
    beaten = threading.Event()
    for name in ("heartbeat", "heartbeat_many"):
        real = getattr(claims, name)

        def counting(*args: Any, real: Any = real, name: str = name) -> Any:
            statements.append(name)
            result = real(*args)
            beaten.set()
            return result

        monkeypatch.setattr(claims, name, counting)
    with held_claims({"reuse": {"owner": owner, "claims": keys}}):
        assert beaten.wait(10)
    assert statements == ["heartbeat_many"], statements
    for key in keys:
        holder = worker_db.holder(key)
        assert holder is not None and holder.owner == owner and holder.seconds_left > 250
