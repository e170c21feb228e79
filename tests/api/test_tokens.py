"""The tokens file (api/tokens.py) and the watched operator files (api/files.py)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from api.secrets import secrets_file
from api.tokens import TokenStore, bearer_of
from obdconv.errors import UsageError

CI = "ci-token-0123456789abcdef"
DASH = "dashboard-token-fedcba9876543210"


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def tokens_text() -> str:
    return (f'[[tokens]]\nname = "ci"\nsha256 = "{hashlib.sha256(CI.encode()).hexdigest()}"\n'
            'repositories = ["reg.example/team-a/*", "reg.example/shared/base"]\n\n'
            f'[[tokens]]\nname = "dash"\ntoken = "{DASH}"\nrepositories = ["reg.example/*"]\nrate_limit = 0\n')


def test_tokens_by_hash_or_value_and_their_patterns(tmp_path: Path) -> None:
    store = TokenStore(str(write(tmp_path / "tokens.toml", tokens_text(), 0o600)))
    ci = store.authenticate(f"Bearer {CI}")
    assert ci is not None and ci.name == "ci" and ci.rate_limit is None
    assert ci.allows("reg.example/team-a/app") and ci.allows("reg.example/team-a/sub/app")
    assert ci.allows("reg.example/shared/base") and not ci.allows("reg.example/shared/base2")
    assert not ci.allows("reg.example/team-b/app") and not ci.allows("other.example/team-a/app")
    dash = store.authenticate(f"bearer  {DASH} ")
    assert dash is not None and dash.name == "dash" and dash.rate_limit == 0
    for header in ("", f"Basic {CI}", "Bearer", f"Bearer {CI}x", CI):
        assert store.authenticate(header) is None, header
    assert bearer_of("Bearer abc") == "abc" and bearer_of("Token abc") is None


@pytest.mark.parametrize(("text", "mode", "says"), [
    ('[[tokens]]\nname = "a"\nsha256 = "abc"\nrepositories = ["x/*"]\n', 0o600, "64 lowercase hex"),
    (f'[[tokens]]\nname = "a"\ntoken = "{CI}"\nrepositories = ["x/*"]\n', 0o644, "must be 0600"),
    ('[[tokens]]\nname = "a"\ntoken = "short"\nrepositories = ["x/*"]\n', 0o600, "at least 16"),
    (f'[[tokens]]\nname = "a"\ntoken = "{CI}"\nsha256 = "{"0" * 64}"\nrepositories = ["x/*"]\n', 0o600,
     "exactly one of"),
    (f'[[tokens]]\nname = "a"\ntoken = "{CI}"\nrepositories = []\n', 0o600, "non-empty list"),
    (f'[[tokens]]\nname = "a"\ntoken = "{CI}"\nrepositories = ["x/[ab]"]\n', 0o600, "glob patterns"),
    (f'[[tokens]]\nname = "a"\ntoken = "{CI}"\nrepositories = ["x/*"]\nrate_limit = -1\n', 0o600, "rate_limit"),
    (f'[[tokens]]\nname = "a"\ntoken = "{CI}"\nrepositories = ["x/*"]\n[[tokens]]\nname = "a"\n'
     f'token = "{DASH}"\nrepositories = ["x/*"]\n', 0o600, "used twice"),
    (f'[[tokens]]\nname = "a"\ntoken = "{CI}"\nrepositories = ["x/*"]\n[[tokens]]\nname = "b"\n'
     f'sha256 = "{hashlib.sha256(CI.encode()).hexdigest()}"\nrepositories = ["x/*"]\n', 0o600, "same token"),
    ('[[tokens]]\nname = "a"\nsecret = 1\n', 0o600, "unknown key(s) ['secret']"),
    ('tokens = "x"\n', 0o600, "array of tables"),
    ('[[tokens]\n', 0o600, "not readable TOML"),
])
def test_a_bad_tokens_file_stops_the_api_naming_the_problem(tmp_path: Path, text: str, mode: int, says: str) -> None:
    path = write(tmp_path / "tokens.toml", text, mode)
    with pytest.raises(UsageError) as raised:
        TokenStore(str(path))
    assert says in str(raised.value) and str(path) in str(raised.value)


def test_files_are_reloaded_and_a_broken_edit_keeps_the_last_good_version(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens.toml", tokens_text(), 0o600)
    store = TokenStore(str(path))
    store.file.interval = 0.0  # look at every call
    assert store.count() == 2
    write(path, tokens_text().split("\n\n")[0] + "\n", 0o600)  # the dashboard token revoked
    time.sleep(0.01)
    assert store.authenticate(f"Bearer {DASH}") is None and store.count() == 1
    write(path, "[[tokens]\n", 0o600)  # a broken edit
    assert store.count() == 1 and store.authenticate(f"Bearer {CI}") is not None
    path.unlink()  # no file: no tokens at all
    assert store.count() == 0


def test_event_secrets_must_be_private(tmp_path: Path) -> None:
    path = write(tmp_path / "secrets.toml", 'distribution = "Bearer 0123456789abcdef"\n', 0o644)
    with pytest.raises(UsageError, match="must be 0600"):
        secrets_file(str(path))
    os.chmod(path, 0o600)
    secrets = secrets_file(str(path)).get()
    assert secrets.matches("distribution", "Bearer 0123456789abcdef")
    assert not secrets.matches("distribution", "Bearer 0123456789abcdeX")
    assert not secrets.matches("harbor", "Bearer 0123456789abcdef") and not secrets.configured("harbor")
    write(path, 'harbor = "short"\n', 0o600)
    with pytest.raises(UsageError, match="at least 16"):
        secrets_file(str(path))
