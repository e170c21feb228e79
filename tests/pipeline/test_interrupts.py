"""`obdconv convert` stopped by SIGTERM or SIGKILL, as real processes: every process it started is
gone promptly (a wrapper reading its stdout gets EOF), SIGTERM cleans up and exits 143, and what a
SIGKILLed run left (work directories, spools, partial `.upload-*` blobs) is removed by the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.pipeline.images import Layout, directory, file, layer, sha

OBDCONV = str(Path(sys.executable).parent / "obdconv")


def big_image(root: Path) -> Layout:
    """Four layers of 24 incompressible MiB each: prepares take a few seconds on this machine."""
    lay = Layout(root)
    noise = os.urandom(1 << 20)
    lay.image([layer([directory(f"d{k}"), *[file(f"d{k}/f{i}", noise[i + k:] + noise[:i + k]) for i in range(24)]])
               for k in range(4)], tag="t")
    return lay


def start(lay: Layout, work: Path, *, group: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen([OBDCONV, "convert", "-r", f"oci:{lay.root}", "-i", "t", "--overlaybd", "obd",
                             "-d", str(work), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=group)


def wait_for_prepares(proc: subprocess.Popen[bytes], work: Path) -> list[psutil.Process]:
    """Until a layer is being prepared; then every process the run started (pool workers, the
    forkserver, the resource tracker)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        spool = work / "spool"
        if spool.is_dir() and any(p.name.startswith(".prep-") for p in spool.iterdir()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "conversion ended before it could be interrupted"
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 3, children  # forkserver, resource tracker, workers
    return children


def stacks_of(proc: subprocess.Popen[bytes]) -> str:
    """The stack of every thread of a live `obdconv` (SIGUSR1: obdconv/cli/main.py), then it is killed."""
    proc.send_signal(signal.SIGUSR1)
    time.sleep(1)
    proc.kill()
    _, err = proc.communicate(timeout=10)
    return err.decode(errors="replace")


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(processes)


def leftovers(work: Path) -> list[str]:
    return sorted(str(p.relative_to(work)) for p in work.rglob("*")) if work.exists() else []


def uploads(lay: Layout) -> list[str]:
    return [p.name for p in (lay.root / "blobs" / "sha256").iterdir() if p.name.startswith(".upload-")]


def check_blobs(lay: Layout) -> None:
    for blob in (lay.root / "blobs" / "sha256").iterdir():
        assert sha(blob.read_bytes()) == "sha256:" + blob.name, blob.name


@pytest.mark.parametrize("to_group", [False, True], ids=["pid", "process-group"])
def test_sigterm_cleans_up_and_exits_143(to_group: bool, tmp_path: Path) -> None:
    """SIGTERM to the runner alone (docker stop, Kubernetes) or to its whole process group
    (timeout, systemd): exit 143 promptly, "terminated", nothing left under --dir, no process
    left, the caller's pipes reach EOF, no tag, no partial upload."""
    lay = big_image(tmp_path / "src")
    index_before = (lay.root / "index.json").read_bytes()
    work = tmp_path / "work"
    proc = start(lay, work, group=to_group)
    try:
        children = wait_for_prepares(proc, work)
        sent = time.monotonic()
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)  # EOF on both pipes: nothing else holds them
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit 30 s after SIGTERM; where it was stuck:\n{stacks_of(proc)}")
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert err.decode().strip().splitlines()[-1] == "obdconv: terminated"
    assert took < 20, took  # not after the prepares under way would have finished
    assert wait_gone(children, 5) == []
    assert leftovers(work) == []
    assert (lay.root / "index.json").read_bytes() == index_before
    assert uploads(lay) == []
    check_blobs(lay)


def test_sigkill_leaves_no_process_and_the_next_run_cleans_up(tmp_path: Path) -> None:
    lay = big_image(tmp_path / "src")
    work = tmp_path / "work"
    proc = start(lay, work)
    try:
        children = wait_for_prepares(proc, work)
        proc.kill()
        proc.communicate(timeout=10)  # EOF: the pool did not keep the caller's stdout/stderr open
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_gone(children, 5) == []
    left = leftovers(work)
    # The run's record, and in the spool a prepare under way (`.prep-*`) or, when the workers finished
    # one in the moment between the runner's death and theirs, its result: both are the next run's to remove.
    assert any(".obdconv-run-" in p for p in left) and any(p.startswith("spool/") for p in left), left
    # the next run in the same --dir converts, and removes what the killed one left
    again = start(lay, work)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err.decode()
    assert leftovers(work) == []
    assert uploads(lay) == []
    check_blobs(lay)


PARTIAL_UPLOAD = r"""
import sys, time
from obdconv.registry.layout import OCILayoutRepository

def chunks():
    yield b"x" * 100000
    print("writing", flush=True)
    time.sleep(3600)

OCILayoutRepository(sys.argv[1]).begin_upload(chunks())
"""


def test_partial_uploads_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    """A writer SIGKILLed mid-blob leaves a `.upload-*` file; the next conversion into that layout
    removes it. One still being written by a live process stays."""
    lay = Layout(tmp_path / "src")
    lay.image([layer([file("a", b"a" * 5000)])], tag="t")
    writers = [subprocess.Popen([sys.executable, "-P", "-c", PARTIAL_UPLOAD, str(lay.root)],
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for w in writers:
            assert w.stdout is not None and w.stdout.readline() == "writing\n"
        writers[0].kill()
        writers[0].wait()
        partial = uploads(lay)
        assert len(partial) == 2
        time.sleep(0.05)  # the leftover is older than the run below
        proc = subprocess.run([OBDCONV, "convert", "-r", f"oci:{lay.root}", "-i", "t", "--overlaybd", "obd",
                               "-d", str(tmp_path / "work"), "--workers", "1"], capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
        live = psutil.Process(writers[1].pid)
        owned = {Path(f.path).name for f in live.open_files()}
        assert uploads(lay) == [n for n in partial if n in owned]
    finally:
        for w in writers:
            w.kill()
            w.wait()


def test_sigusr1_prints_every_thread_s_stack_and_the_run_goes_on(tmp_path: Path) -> None:
    lay = big_image(tmp_path / "src")
    proc = start(lay, tmp_path / "work")
    try:
        wait_for_prepares(proc, tmp_path / "work")
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    text = err.decode()
    assert "Current thread" in text and text.count("Thread 0x") >= 2, text  # the main thread and its helpers
    assert "obdconv/pipeline/runner.py" in text
