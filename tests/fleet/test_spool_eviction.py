"""Spool eviction policy (tasks/spool.py) on a real directory, with real flocks held by another
process standing in for a task using a layer."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tasks.spool import evict_spool, layer_in_use, spool_entries

ROOT = Path(__file__).resolve().parents[2]


def make_layer(spool: Path, key: str, size: int, last_used: float) -> None:
    entry = spool / key
    entry.mkdir(parents=True)
    (entry / "blocks.bin").write_bytes(os.urandom(size))
    (entry / "prepared.json").write_text("{}")
    os.utime(entry / "prepared.json", (last_used, last_used))


def test_old_layers_go_and_recent_ones_stay(tmp_path: Path) -> None:
    now = time.time()
    make_layer(tmp_path, "old", 4096, now - 1000)
    make_layer(tmp_path, "recent", 4096, now - 10)
    (tmp_path / ".prep-crashed").mkdir()
    os.utime(tmp_path / ".prep-crashed", (now - 1000, now - 1000))
    assert evict_spool(tmp_path, 0, 500, now) == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["recent"]
    assert not (tmp_path / ".prep-crashed").exists()


def test_over_the_byte_limit_least_recently_used_go_first(tmp_path: Path) -> None:
    now = time.time()
    for i, key in enumerate(["a", "b", "c", "d"]):
        make_layer(tmp_path, key, 64 << 10, now - 100 + i)  # a least recently used
    sizes = {e.key: e.size for e in spool_entries(tmp_path)}
    limit = sizes["c"] + sizes["d"]
    assert evict_spool(tmp_path, limit, 0, now) == ["a", "b"]
    assert sum(e.size for e in spool_entries(tmp_path)) <= limit


def test_a_layer_in_use_is_never_evicted(tmp_path: Path) -> None:
    now = time.time()
    make_layer(tmp_path, "busy", 4096, now - 1000)
    make_layer(tmp_path, "idle", 4096, now - 1000)
    # Another process holds "busy" as a task would (shared lock), until we close its stdin.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from tasks.spool import layer_in_use\n"
         f"with layer_in_use(Path({str(tmp_path)!r}), 'busy'):\n print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert evict_spool(tmp_path, 1, 500, now) == ["idle"]
        assert (tmp_path / "busy" / "prepared.json").exists()
    finally:
        holder.communicate("", timeout=10)
    # Released (and marked used just now): no longer too old, but over the byte limit it may go.
    assert evict_spool(tmp_path, 0, 500) == []
    assert evict_spool(tmp_path, 1, 0) == ["busy"]


def test_using_a_layer_marks_it_used(tmp_path: Path) -> None:
    make_layer(tmp_path, "k", 4096, time.time() - 1000)
    with layer_in_use(tmp_path, "k"):
        pass
    assert time.time() - (tmp_path / "k" / "prepared.json").stat().st_mtime < 60
