"""Configuration: TOML -> validated settings, one-line errors, generated config, provider loading."""

import dataclasses
import os
import stat
import textwrap
import tomllib
from pathlib import Path

import pytest

import kleis
import settings as config

ROOT = Path(kleis.__file__).parent
SECRET = "s" * 32


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_example_config_is_valid_and_documents_every_option(tmp_path):
    example = (ROOT / "config.example.toml").read_text()
    path = write(tmp_path, example.replace('secret_key = ""', f'secret_key = "{SECRET}"'))
    settings = config.load_settings(path, env={})
    loaded = kleis.load_providers(settings)
    assert sorted(loaded) == ["claude", "codex", "copilot"]
    raw = tomllib.loads(example)
    for name, provider in loaded.items():
        missing = set(provider.module.OPTIONS) - set(raw["providers"][name])
        assert not missing, f"config.example.toml lacks [providers.{name}] {missing}"
    for section, cls in config.SECTIONS.items():
        documented = set(raw.get(section, {}))
        assert documented == {f.name for f in dataclasses.fields(cls)}, section
    # The example's values are the defaults.
    assert settings.server == config.ServerSettings()
    assert settings.usage == config.UsageSettings()
    for name, provider in loaded.items():
        assert provider.options == provider.module.OPTIONS, name


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[server]\nnope = 1\n", "[server] nope: unknown key"),
        ('[server]\nport = "80"\n', "[server] port: must be int, got str '80'"),
        ("[server]\nport = 70000\n", "[server] port: must be 1-65535"),
        ("[usage]\nflush_interval = true\n", "[usage] flush_interval: must be float, got bool"),
        ("[wat]\n", "[wat]: unknown section"),
        ("[providers.codex]\napi_urll = 'x'\n", "[providers.codex] api_urll: unknown key"),
        ("[providers.codex]\napi_url = 5\n", "[providers.codex] api_url: must be str, got int 5"),
        (
            "[providers.mine]\nentry = 'nothere'\n",
            "[providers.mine] entry: 'nothere' not found; available: claude, codex, copilot",
        ),
        ("[database]\nurl = 'mysql://x'\n", "[database] url: must start with sqlite:/// or postgresql://"),
        ("[[accounts]]\nlabel = 'x'\n", "[accounts.0] provider: required"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, body, message):
    path = write(tmp_path, f'[security]\nsecret_key = "{SECRET}"\n' + body)
    assert kleis.main(["--config", str(path), "check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kleis: ") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1


def test_missing_secret_and_not_toml(tmp_path, capsys):
    path = write(tmp_path, "[server]\nport = 1\n")
    assert kleis.main(["--config", str(path), "check"]) == 2
    assert "[security] secret_key: required" in capsys.readouterr().err
    path.write_text("this is = = not toml")
    assert kleis.main(["--config", str(path), "check"]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_env_overrides_secrets(tmp_path):
    path = write(tmp_path, '[admin]\ntoken = "kla_file_9Qw2Zr7Lm4Xc8Vb1Nt6Hy3Ks5Pd0"\n')
    env = {
        "KLEIS_ADMIN_TOKEN": "kla_env_4Gh8Jk2Lq6Wz0Xc3Vb7Nm1Rt5Yp9",
        "KLEIS_SECRET_KEY": SECRET,
        "KLEIS_DATABASE_URL": "sqlite:///other.db",
    }
    settings = config.load_settings(path, env=env)
    assert settings.admin.token == "kla_env_4Gh8Jk2Lq6Wz0Xc3Vb7Nm1Rt5Yp9"
    assert settings.security.secret_key == SECRET
    assert settings.database.url == "sqlite:///other.db"


def test_init_creates_private_config_once(tmp_path, capsys):
    path = tmp_path / "sub" / "config.toml"
    assert kleis.main(["--config", str(path), "init"]) == 0
    out = capsys.readouterr().out
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o600
    raw = tomllib.loads(path.read_text())
    token = raw["admin"]["token"]
    assert token.startswith("kla_") and token in out.replace("\n", "")
    assert len(raw["security"]["secret_key"]) >= 32
    assert raw["database"]["url"] == "sqlite:///kleis.db"
    before = path.read_text()
    assert kleis.main(["--config", str(path), "init"]) == 0
    assert path.read_text() == before and "Created" not in capsys.readouterr().out
    assert kleis.main(["--config", str(path), "check"]) == 0


def test_sqlite_path_is_relative_to_the_config(tmp_path):
    path = write(tmp_path, f'[security]\nsecret_key = "{SECRET}"\n')
    settings = config.load_settings(path, env={})
    assert settings.resolve("kleis.db") == tmp_path / "kleis.db"


def test_provider_from_plugins_dir_and_broken_contract(tmp_path, capsys):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    codex_source = (ROOT / "providers" / "codex.py").read_text()
    # A copy of the codex adapter under another name serving other routes.
    source = codex_source.replace('"/openai/v1/responses"', '"/mine/v1/responses"').replace(
        'BASE_PATH = "/openai/v1"', 'BASE_PATH = "/mine/v1"'
    )
    (plugins / "mine.py").write_text(source)
    (plugins / "broken.py").write_text("CONTRACT = 1\nNAME = 'broken'\n")
    path = write(
        tmp_path,
        f"""
        [server]
        plugins_dir = "plugins"
        [security]
        secret_key = "{SECRET}"
        [providers.mine]
        entry = "mine"
    """,
    )
    loaded = kleis.load_providers(config.load_settings(path, env={}))
    assert "mine" in loaded and loaded["mine"].module.ROUTES == {"/mine/v1/responses": "responses"}
    path.write_text(path.read_text() + '[providers.bad]\nentry = "broken"\n')
    assert kleis.main(["--config", str(path), "check"]) == 2
    err = capsys.readouterr().err
    assert "[providers.bad] entry: broken.py does not meet contract v1 (missing: CATALOGUE" in err


def test_duplicate_route_is_refused(tmp_path):
    path = write(
        tmp_path,
        f"""
        [security]
        secret_key = "{SECRET}"
        [providers.codex2]
        entry = "codex"
    """,
    )
    with pytest.raises(config.ConfigError, match=r"route /openai/v1/responses is already served by codex"):
        kleis.load_providers(config.load_settings(path, env={}))


def test_secrets_are_masked_in_logs():
    line = (
        'refresh with {"refresh_token": "rt-abc.def", "access_token":"at-123"} key kleis_'
        + "a" * 32
        + " Authorization: Bearer sk-ant-oat01-xyzxyzxyz gho_ABCDEFGHIJKLMN"
    )
    masked = config.mask_secrets(line)
    for secret in ("rt-abc.def", "at-123", "a" * 32, "sk-ant-oat01", "gho_ABCDEFGHIJKLMN"):
        assert secret not in masked
    assert "***" in masked


@pytest.mark.parametrize(
    "line",
    [
        "BEARER abcdef",
        "ID_TOKEN=xyz",
        "access_to\u212aen: secret-value",  # the Kelvin sign matches k under re.IGNORECASE
        "kla_" + "0" * 12,
        "kmd_" + "f" * 10,
        "ghs_ABCDEFGHIJ",
        "nothing secret here: POST /openai/v1/responses 200 key=laptop",
    ],
)
def test_masking_skips_only_lines_no_pattern_can_match(line):
    """The literal pre-check lets a line through untouched only when no pattern matches it."""
    by_patterns = line
    for pattern in config.SECRET_PATTERNS:
        by_patterns = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "***", by_patterns)
    assert config.mask_secrets(line) == by_patterns
    assert ("***" in by_patterns) == ("secret here" not in line)
