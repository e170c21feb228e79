"""A native blob finished inside its spool file, and stored without a copy.

A native layer blob is head + the prepared blocks + tail (assemble.py). When prepare left exactly
the head's room in front of the blocks (`prepare_layer(head_room=native_head_size(...))`), the
head and tail can be written around the blocks in blocks.bin itself, and a target that can take a
whole file (`adopt_file`: an OCI layout on the same filesystem) stores that file by a hard link.
The blocks of a large layer (1.7 GB for the benchmark's 2.7 GiB layer) are then written to disk
once instead of being copied and written again at the end; the local runner also has them go to
disk while they are prepared (`prepare_layer(early_writeback=True)`, writeback.py), so that the
final fsync finds little left. Only the head's length must be right: its bytes are the real head
computed at assemble, whatever was guessed at prepare.

The blocks themselves never change, so the spool stays reusable. Once linked, the file is a
published blob and must not change again, so the head and tail are written only while the file
has no other link (st_nlink == 1), under its flock (taken without waiting: a busy file is
copied instead); the target keeps that flock until the blob is committed or cancelled. Another
conversion of the same spool (another chain, so another head) copies, as without this.
"""

from __future__ import annotations

import os

from obdconv.leftovers import hold, release
from obdconv.registry.repository import PendingBlob, Repository


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def finish_in_place(body_path: str, head: bytes, body_offset: int, body_size: int, tail: bytes,
                    target_repo: Repository) -> PendingBlob | None:
    """The blob `head` + `body_size` bytes of `body_path` from `body_offset` + `tail`, finished in
    `body_path` and sent to `target_repo` as that whole file; None when it cannot be (the target
    takes no files, the room is not the head's size, the file is busy or already published), for
    the caller to send the bytes instead."""
    if not target_repo.adopts_files or len(head) != body_offset:
        return None
    try:
        lock = hold(body_path)
    except BlockingIOError:  # another conversion is finishing this file right now
        return None
    pending: PendingBlob | None = None
    try:
        if os.fstat(lock).st_nlink == 1:
            end = body_offset + body_size
            fd = os.open(body_path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                _pwrite_all(fd, head, 0)
                os.ftruncate(fd, end)  # a tail left by an earlier blob of this file may be longer
                _pwrite_all(fd, tail, end)
            finally:
                os.close(fd)
            pending = target_repo.adopt_file(body_path, end + len(tail), lock)
    finally:
        if pending is None:
            release(lock)
    return pending
