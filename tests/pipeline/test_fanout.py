"""`Fanout`: every consumer gets every piece in order, in its own thread; the first error stops all
of them and reaches the producer; abort drops what is queued."""

from __future__ import annotations

import threading
import time

import pytest

from obdconv.errors import FormatError
from obdconv.pipeline.fanout import Fanout


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
