"""`Fanout`: every consumer gets every piece in order, in its own thread; the first error stops all
of them and reaches the producer; abort drops what is queued."""

from __future__ import annotations

import threading
import time

import pytest

from obdconv.errors import FormatError, IntegrityError
from obdconv.pipeline.fanout import Fanout, ReadAhead


@pytest.mark.parametrize("threaded", [True, False])
def test_each_consumer_gets_every_piece_in_order(threaded: bool) -> None:
    got: list[list[int]] = [[], []]
    where: set[str] = set()

    def first(x: int) -> None:
        where.add(threading.current_thread().name)
        got[0].append(x)

    fan = Fanout([first, got[1].append], depth=2, threaded=threaded)
    for i in range(500):
        fan.put(i)
    fan.close()
    assert got == [list(range(500))] * 2
    assert (threading.current_thread().name in where) != threaded


@pytest.mark.parametrize("threaded", [True, False])
def test_a_consumer_error_reaches_the_producer(threaded: bool) -> None:
    seen: list[int] = []

    def bad(x: int) -> None:
        if x == 5:
            raise FormatError("bad piece 5")

    fan = Fanout([bad, seen.append], depth=1, threaded=threaded)
    with pytest.raises(FormatError, match="bad piece 5"):
        for i in range(10_000):
            fan.put(i)
        fan.close()
    with pytest.raises(FormatError):
        fan.close()  # still the same error
    fan.abort()  # never raises


def test_abort_drops_the_queued_pieces() -> None:
    release = threading.Event()
    got: list[int] = []

    def slow(x: int) -> None:
        release.wait(5)
        got.append(x)

    fan = Fanout([slow], depth=1)
    fan.put(1)
    fan.put(2)  # queued behind the blocked first
    threading.Timer(0.2, release.set).start()
    t = time.monotonic()
    fan.abort()
    assert time.monotonic() - t < 4
    assert got == [1]  # 2 was dropped
    with pytest.raises(RuntimeError, match="aborted"):
        fan.put(3)


def test_context_manager_aborts_on_error() -> None:
    got: list[int] = []
    with pytest.raises(KeyError), Fanout([got.append]) as fan:
        fan.put(1)
        raise KeyError("producer failed")
    assert fan._error is not None


class _Source:
    def __init__(self, data: bytes, fail_at_end: bool = False) -> None:
        self.data, self.pos, self.fail_at_end = data, 0, fail_at_end
        self.thread = ""

    def read(self, n: int) -> bytes:
        self.thread = threading.current_thread().name
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        if not chunk and self.fail_at_end:
            raise IntegrityError("digest mismatch at EOF")
        return chunk


def test_read_ahead_returns_the_chunks_in_order_from_its_thread() -> None:
    data = bytes(range(256)) * 100
    source = _Source(data)
    with ReadAhead(source, 1000, depth=2) as reader:  # type: ignore[arg-type]
        chunks = []
        while chunk := reader.read():
            chunks.append(chunk)
        assert reader.read() == b""
    assert b"".join(chunks) == data and all(len(c) == 1000 for c in chunks[:-1])
    assert source.thread == "read-ahead"


def test_read_ahead_raises_the_source_error_where_it_happens() -> None:
    with ReadAhead(_Source(b"x" * 2500, fail_at_end=True), 1000) as reader:  # type: ignore[arg-type]
        assert [reader.read() for _ in range(3)] == [b"x" * 1000, b"x" * 1000, b"x" * 500]
        with pytest.raises(IntegrityError, match="mismatch"):
            reader.read()
        assert reader.read() == b""


def test_read_ahead_closes_while_its_queue_is_full() -> None:
    reader = ReadAhead(_Source(bytes(10_000_000)), 1000, depth=2)  # type: ignore[arg-type]
    assert reader.read() == bytes(1000)
    t = time.monotonic()
    reader.close()
    assert time.monotonic() - t < 2
