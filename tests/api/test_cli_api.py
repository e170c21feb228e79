"""`obdconv api` on the command line: registered like the other sub-commands, without making the
rest of obdconv import FastAPI (the server itself is started by every service test, tests/services/api.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from obdconv.cli.api import split_listen
from obdconv.errors import UsageError


def test_obdconv_knows_api_without_importing_fastapi() -> None:
    code = ("import sys; from obdconv.cli.main import build_parser; p = build_parser(); "
            "a = p.parse_args(['api', '--listen', '127.0.0.1:9']); "
            "print(a.command, a.listen, 'fastapi' in sys.modules, 'uvicorn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["api", "127.0.0.1:9", "False", "False"]


@pytest.mark.parametrize(("listen", "expected"), [("127.0.0.1:8080", ("127.0.0.1", 8080)),
                                                  ("0.0.0.0:80", ("0.0.0.0", 80)), ("[::1]:8080", ("::1", 8080))])
def test_listen_addresses(listen: str, expected: tuple[str, int]) -> None:
    assert split_listen(listen) == expected


@pytest.mark.parametrize("listen", ["8080", "host:", ":8080", "host:http", "host:70000"])
def test_bad_listen_addresses_say_so(listen: str) -> None:
    with pytest.raises(UsageError, match="expected host:port"):
        split_listen(listen)
