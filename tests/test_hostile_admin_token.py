"""A guessable admin token stops start-up (issue 13, point 10), unless explicitly allowed.

Kleis refuses a short or low-entropy `[admin] token` (or KLEIS_ADMIN_TOKEN) with one line
saying why and how to make a good one; `[admin] allow_weak_token = true` accepts it. The
generated config and the test suite's own tokens pass.
"""

from __future__ import annotations

import secrets

import pytest
import tomli_w

import kleis as kleis_module
from settings import admin_token_weakness, load_settings, write_new_config

WEAK = [
    "kla_test",  # short
    "kla_" + "a" * 32,  # one character repeated
    "abcdefghijklmnopqrstuvwxyz0123456789",  # a run
    "0123456789abcdef0123456789abcdef",  # runs again
    "password1234password1234",  # few bits for its alphabet
    "admin-admin-admin-admin-admin",
]


def config(tmp_path, **admin) -> str:
    path = tmp_path / "config.toml"
    path.write_text(
        tomli_w.dumps(
            {
                "admin": admin,
                "security": {"secret_key": secrets.token_urlsafe(24)},
                "database": {"url": f"sqlite:///{tmp_path}/kleis.db"},
                "models": {"source_url": ""},
            }
        )
    )
    return str(path)


@pytest.mark.parametrize("token", WEAK)
def test_a_weak_token_stops_serve_and_check(tmp_path, capsys, token):
    path = config(tmp_path, token=token)
    # `serve` only where a regression would still end (a token this short can never pass).
    for command in ("serve", "check") if token == "kla_test" else ("check",):
        assert kleis_module.main(["--config", path, command]) == 2
        err = capsys.readouterr().err
        assert "[admin] token:" in err and "secrets.token_urlsafe(32)" in err and "allow_weak_token" in err
        assert token not in err  # the message never repeats the token


def test_a_weak_token_from_the_environment_is_refused_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KLEIS_ADMIN_TOKEN", "hunter2hunter2")
    assert kleis_module.main(["--config", config(tmp_path), "check"]) == 2
    assert "[admin] token: too short" in capsys.readouterr().err


async def test_allow_weak_token_accepts_it(start_kleis, http):
    kleis = await start_kleis(admin={"token": "kla_test", "allow_weak_token": True})
    async with http.get(kleis.url + "/admin/keys", headers={"Authorization": "Bearer kla_test"}) as resp:
        assert resp.status == 200


def test_generated_and_suite_tokens_are_strong(tmp_path):
    token = write_new_config(tmp_path / "config.toml")
    assert admin_token_weakness(token) is None
    load_settings(tmp_path / "config.toml")  # the generated config starts
    for _ in range(2000):  # what tests/conftest.py writes, and what the README suggests
        assert admin_token_weakness("kla_" + secrets.token_hex(16)) is None
        assert admin_token_weakness(secrets.token_urlsafe(32)) is None
    assert all(admin_token_weakness(token) for token in WEAK)
