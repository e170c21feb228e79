"""Completion callbacks without a fleet: request validation (also through `obdconv submit`, which
must queue nothing), the signature, key resolution, the summary, and the outbound POST's hygiene
against real HTTP servers on 127.0.0.1 (redirects, error bodies, timeouts, refused connections)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from config.callback_secrets import env_name, resolve_callback_secret
from obdconv.errors import AuthError, BadInputError, UsageError
from obdconv.pipeline.validate import validate_request
from obdconv.request import ConversionRequest
from tasks.notify import backoff, summary_of
from tasks.webhook import MAX_ERROR_BODY, CallbackError, post_callback, sign, summary_body
from tests.services.base import free_port
from tests.services.redis import RedisServer

ROOT = Path(__file__).resolve().parents[2]
KEY = b"k" * 32


def request_with(url: str, ref: str = "hooks") -> ConversionRequest:
    return ConversionRequest("registry.example/app", input_tag="v1", overlaybd_tag="v1-obd", callback_url=url,
                             callback_secret_ref=ref)


@pytest.mark.parametrize(("url", "ref", "problem"), [
    ("ftp://receiver.example/hook", "hooks", "scheme must be http or https, not 'ftp'"),
    ("receiver.example/hook", "hooks", "scheme must be http or https, not 'missing'"),
    ("javascript:alert(1)", "hooks", "scheme must be http or https"),
    ("http:///hook", "hooks", "no host"),
    ("http://user:pw@receiver.example/hook", "hooks", "must not carry a user or password"),
    ("http://receiver.example:70000/hook", "hooks", "not a valid URL"),
    ("http://receiver.example/a hook", "hooks", "spaces or control characters"),
    ("http://receiver.example/" + "a" * 2100, "hooks", "longer than 2048"),
    ("http://receiver.example/hook", "", "needs --callback-secret-ref"),
    ("", "hooks", "without --callback-url"),
    ("https://receiver.example/hook", "the key itself!", "not the secret itself"),
])
def test_bad_callbacks_are_refused_naming_the_problem(url: str, ref: str, problem: str) -> None:
    with pytest.raises(UsageError) as raised:
        validate_request(request_with(url, ref))
    assert problem in str(raised.value)
    assert isinstance(raised.value, BadInputError)
    assert "pw@" not in str(raised.value)  # a password in the URL is not echoed back


def test_good_callbacks_pass() -> None:
    validate_request(request_with("https://receiver.example:8443/hooks/obdconv?team=a", "team-a.hooks_1"))
    validate_request(request_with("http://127.0.0.1:9000/", "x"))
    validate_request(request_with("", ""))  # no callback at all


def test_submit_refuses_a_bad_callback_and_queues_nothing(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OBDCONV_BROKER_URL": redis.url(0),
               "OBDCONV_RESULT_BACKEND": redis.url(1), "OBDCONV_DB_TYPE": "sqlite",
               "OBDCONV_DB_STR": str(tmp_path / "status.sqlite")}
        result = subprocess.run(
            [sys.executable, "-m", "obdconv", "submit", "-r", "registry.example/app", "-i", "v1", "--overlaybd",
             "v1-obd", "--callback-url", "file:///etc/passwd", "--callback-secret-ref", "hooks"],
            capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
        assert result.returncode == UsageError.exit_code, result.stderr
        assert "--callback-url 'file:///etc/passwd': the scheme must be http or https" in result.stderr
        assert redis.client(0).dbsize() == 0  # nothing queued, no ledger entry
        assert not (tmp_path / "status.sqlite").exists()  # no status row either
    finally:
        redis.stop()


def test_submit_sends_the_callback_fields() -> None:
    import argparse

    from obdconv.cli import fleet

    parser = argparse.ArgumentParser()
    fleet.register(parser.add_subparsers())
    args = parser.parse_args(["submit", "-r", "registry.example/app", "-i", "v1", "--overlaybd", "o",
                              "--callback-url", "https://r.example/h", "--callback-secret-ref", "hooks"])
    request = fleet.request_from_args(args)
    assert (request.callback_url, request.callback_secret_ref) == ("https://r.example/h", "hooks")


def test_signature_matches_openssl() -> None:
    body = summary_body({"request_id": "r1", "state": "SUCCESS", "source": "ü"})
    assert body == '{"request_id":"r1","source":"ü","state":"SUCCESS"}'.encode()
    openssl = subprocess.run(["openssl", "dgst", "-sha256", "-hmac", KEY.decode()], input=b"1700000000." + body,
                             capture_output=True, check=True).stdout.decode()
    assert sign(KEY, "1700000000", body) == "sha256=" + openssl.split("= ")[-1].strip()


def test_keys_resolve_from_env_then_a_private_file(tmp_path: Path) -> None:
    secrets = tmp_path / "callback-secrets.json"
    secrets.write_text(json.dumps({"team-a": "file-key-0123456789", "short": "tiny", "odd": 5}))
    os.chmod(secrets, 0o600)
    assert env_name("team-a") == "OBDCONV_CALLBACK_SECRET_TEAM_A"
    assert resolve_callback_secret("team-a", secrets, env={}) == b"file-key-0123456789"
    assert resolve_callback_secret("team-a", secrets, env={env_name("team-a"): "env-key-0123456789ab"}) \
        == b"env-key-0123456789ab"
    with pytest.raises(AuthError, match="'missing' is not configured on this worker") as raised:
        resolve_callback_secret("missing", secrets, env={})
    assert "file-key" not in str(raised.value)
    with pytest.raises(AuthError, match="shorter than 16"):
        resolve_callback_secret("short", secrets, env={})
    with pytest.raises(AuthError, match="must be a string"):
        resolve_callback_secret("odd", secrets, env={})
    os.chmod(secrets, 0o644)
    with pytest.raises(AuthError, match="mode 644; it must be 0600"):
        resolve_callback_secret("team-a", secrets, env={})


def test_summary_keeps_digests_and_drops_dumps() -> None:
    status = {"request_id": "r1", "state": "SUCCESS", "source": "h/app:v1", "submitted_at": 1.0,
              "started_at": 2.0, "finished_at": 3.0, "error": None, "stage": "done",
              "outputs": {"native": {"tag": "v1-obd", "digest": "sha256:ab", "mediaType": "m", "size": 9,
                                     "dedup": True, "dump": {"manifest.json": "{...}"}}}}
    assert summary_of(status) == {
        "event": "conversion.finished", "request_id": "r1", "state": "SUCCESS", "source": "h/app:v1",
        "outputs": {"native": {"tag": "v1-obd", "digest": "sha256:ab", "mediaType": "m", "size": 9, "dedup": True}},
        "error": None, "submitted_at": 1.0, "started_at": 2.0, "finished_at": 3.0}


def test_backoff_doubles_within_its_bounds() -> None:
    for attempt, ceiling in ((1, 2), (2, 4), (3, 8), (9, 60)):
        waits = [backoff(attempt, 2, 60) for _ in range(200)]
        assert all(0 <= w <= ceiling for w in waits) and max(waits) > ceiling / 2


# --- the POST against real servers ----------------------------------------------------------------------

Handler = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], str]]:
    """Start HTTP servers on 127.0.0.1 whose POST handler is given; returns each one's base URL."""
    servers: list[ThreadingHTTPServer] = []

    def start(handle: Handler) -> str:
        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def reply(code: int, body: bytes = b"", **headers: str) -> Handler:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(code)
        for name, value in headers.items():
            h.send_header(name.replace("_", "-"), value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return handle


def post(url: str, timeout: float = 5) -> int:
    return post_callback(url, b"{}", KEY, request_id="r1", delivery="r1/SUCCESS", timeout=timeout)


def test_2xx_is_delivered_and_same_host_307_is_followed(serve: Callable[[Handler], str]) -> None:
    hits: list[str] = []

    def handle(h: BaseHTTPRequestHandler) -> None:
        hits.append(h.path)
        if h.path == "/old":
            reply(307, Location="/new")(h)
        else:
            reply(202)(h)

    base = serve(handle)
    assert post(base + "/old") == 202
    assert hits == ["/old", "/new"]


def test_redirects_elsewhere_are_not_followed(serve: Callable[[Handler], str]) -> None:
    elsewhere_hits: list[str] = []
    elsewhere = serve(lambda h: (elsewhere_hits.append(h.path), reply(204)(h)))
    base = serve(lambda h: reply(307, Location=elsewhere + "/steal")(h))
    with pytest.raises(CallbackError, match=r"redirect to http://127\.0\.0\.1:\d+ not followed") as raised:
        post(base + "/hook")
    assert not raised.value.retryable and elsewhere_hits == []
    moved = serve(lambda h: reply(302, Location="/other")(h))  # would turn the POST into a GET
    with pytest.raises(CallbackError, match="HTTP 302"):
        post(moved + "/hook")


def test_error_answers_say_whether_to_retry(serve: Callable[[Handler], str]) -> None:
    unavailable = serve(reply(503, b"down for maintenance\x00\n" + b"x" * 100_000))
    with pytest.raises(CallbackError) as raised:
        post(unavailable + "/hook")
    message = str(raised.value)
    assert raised.value.retryable and message.startswith("HTTP 503 from http://127.0.0.1:")
    assert "down for maintenance" in message and len(message) < MAX_ERROR_BODY + 100
    for code, retryable in ((401, False), (404, False), (429, True), (408, True), (500, True)):
        with pytest.raises(CallbackError) as raised:
            post(serve(reply(code)) + "/hook?token=do-not-log")
        assert raised.value.retryable is retryable, code
        assert "do-not-log" not in str(raised.value)


def test_a_receiver_that_does_not_answer_times_out(serve: Callable[[Handler], str]) -> None:
    release = threading.Event()
    slow = serve(lambda h: (release.wait(10), reply(204)(h)))
    started = time.monotonic()
    try:
        with pytest.raises(CallbackError, match="no answer within 1s") as raised:
            post(slow + "/hook", timeout=1)
    finally:
        release.set()
    assert raised.value.retryable and time.monotonic() - started < 5


def test_nothing_listening_is_retryable() -> None:
    with pytest.raises(CallbackError, match=r"cannot reach http://127\.0\.0\.1:\d+: Connection refused") as raised:
        post(f"http://127.0.0.1:{free_port()}/hook")
    assert raised.value.retryable


def test_status_shows_the_callback_outcome() -> None:
    from obdconv.cli.fleet import format_status

    text = format_status({"request_id": "r1", "state": "SUCCESS", "stage": "done", "outputs": {},
                          "callback": {"state": "FAILED", "attempts": 9, "error": "HTTP 401 from http://r:80"}})
    assert text.splitlines()[-1] == "  callback: FAILED after 9 attempt(s): HTTP 401 from http://r:80"
    assert "callback" not in format_status({"request_id": "r1", "state": "SUCCESS", "stage": "", "callback": None})
