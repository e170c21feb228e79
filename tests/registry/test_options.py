from __future__ import annotations

import pytest

from obdconv.errors import UsageError
from obdconv.registry.options import RegistryOptions, split_client_cert, split_user_password
from obdconv.request import RegistryAccess


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("alice:secret", ("alice", "secret")),
        ("alice:pa:ss:word", ("alice", "pa:ss:word")),  # first ':' only
        ("alice:", ("alice", "")),
        (":secret", ("", "")),  # leading colon => anonymous
        ("alice", ("", "")),  # no colon => anonymous
        ("", ("", "")),
    ],
)
def test_split_user_password(flag: str, expected: tuple[str, str]) -> None:
    assert split_user_password(flag) == expected


def test_client_cert_needs_exactly_two_parts() -> None:
    assert split_client_cert("/a.crt:/a.key") == ("/a.crt", "/a.key")
    for bad in ("/a.crt", "/a:/b:/c", ":/a.key"):
        with pytest.raises(UsageError, match="invalid format"):
            split_client_cert(bad)


def test_password_not_in_repr() -> None:
    options = RegistryOptions.from_flags("bob:hunter2-secret", plain=True)
    assert options.username == "bob" and options.password == "hunter2-secret"
    assert "hunter2" not in repr(options)


def test_from_access_resolves_credential_reference() -> None:
    access = RegistryAccess(plain=True, root_ca=["/ca.pem"], credential_ref="prod")
    options = RegistryOptions.from_access(access, {"prod": "u:p:w"}.get)
    assert (options.plain, options.root_ca, options.username, options.password) == (True, ["/ca.pem"], "u", "p:w")
    with pytest.raises(UsageError, match="not configured"):
        RegistryOptions.from_access(RegistryAccess(credential_ref="other"), {"prod": "u:p"}.get)
    assert RegistryOptions.from_access(RegistryAccess()).username == ""
