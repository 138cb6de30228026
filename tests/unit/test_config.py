"""Settings: defaults, the documented file, environment overrides and every validation path."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pacs_agent.checks import check_settings
from pacs_agent.cli import main
from pacs_agent.config import Settings, load_settings, settings_from_mapping
from pacs_agent.errors import ConfigError

ROOT = Path(__file__).parents[2]
DOCUMENTED = ROOT / "config" / "pacs-agent.toml"


def test_documented_file_equals_embedded_defaults() -> None:
    assert load_settings(DOCUMENTED, environ={}) == Settings()


def test_documented_file_mentions_every_key() -> None:
    text = DOCUMENTED.read_text()
    data = tomllib.loads(text)
    for section, model in Settings.model_fields.items():
        if section in ("destinations", "sources"):  # lists of tables, commented examples
            assert f"# [[{section}]]" in text
            continue
        assert section in data, section
        keys = set(model.annotation.model_fields)  # type: ignore[union-attr]
        assert keys == set(data[section]), section


def test_default_database_is_sqlite_in_state_dir(tmp_path: Path) -> None:
    settings = load_settings(None, environ={"PACS_AGENT__STORAGE__STATE_DIR": str(tmp_path)})
    assert settings.database_url == f"sqlite:///{tmp_path / 'pacs-agent.db'}"
    assert settings.storage.spool_dir == tmp_path / "spool"


def test_environment_overrides_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[node]\nport = 4000\nae_title = "FROMFILE"\n')
    settings = load_settings(
        config,
        environ={
            "PACS_AGENT__NODE__PORT": "4001",
            "PACS_AGENT__SECURITY__ALLOWED_HOSTS": '["10.0.0.0/8", "192.168.1.7"]',
            "UNRELATED": "x",
        },
    )
    assert settings.node.port == 4001
    assert settings.node.ae_title == "FROMFILE"
    assert settings.security.allowed_hosts == ("10.0.0.0/8", "192.168.1.7")


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(Exception, match="frozen"):
        settings.node.port = 1  # type: ignore[misc]


def test_destinations_parse(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "10.0.0.5"\nport = 4242\n'
        '[[destinations]]\nname = "research"\nae_title = "RESEARCH"\nhost = "h"\nport = 104\n'
    )
    settings = load_settings(config, environ={})
    assert [d.name for d in settings.destinations] == ["pacs", "research"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"node": {"port": 70000}}, "node.port"),
        ({"node": {"port": "abc"}}, "node.port"),
        ({"node": {"ae_title": "THIS_TITLE_IS_WAY_TOO_LONG"}}, "node.ae_title: AE title"),
        ({"node": {"ae_title": "BAD\\AET"}}, "node.ae_title"),
        ({"node": {"ae_title": "   "}}, "must not be empty"),
        ({"node": {"portt": 1}}, "node.portt: unknown setting"),
        ({"storage": {"min_free_mb": -1}}, "storage.min_free_mb"),
        ({"readiness": {"quiet_seconds": -5}}, "readiness.quiet_seconds"),
        ({"security": {"allowed_hosts": ["not-an-ip"]}}, "is not an IP address or network"),
        ({"security": {"allowed_calling_aets": ["WAY_TOO_LONG_AE_TITLE_X"]}}, "security.allowed_calling_aets"),
        ({"jobs": {"methods": ["nope"]}}, "unknown method(s) nope"),
        ({"jobs": {"methods": []}}, "at least one method"),
        ({"destinations": [{"name": "a", "ae_title": "A", "host": "h"}]}, "destinations.0: a DIMSE"),
        (
            {
                "destinations": [
                    {"name": "a", "ae_title": "A", "host": "h", "port": 1},
                    {"name": "a", "ae_title": "B", "host": "h", "port": 2},
                ]
            },
            "destination names must be unique; repeated: a",
        ),
        ({"bogus": {}}, "bogus: unknown setting"),
    ],
)
def test_invalid_values_are_reported(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data)
    assert any(expected in problem for problem in info.value.problems), info.value.problems


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping({"node": {"port": 0, "ae_title": ""}, "storage": {"min_free_mb": -1}})
    assert len(info.value.problems) == 3


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, environ={})


def test_env_conflict_is_reported() -> None:
    with pytest.raises(ConfigError, match="conflicts"):
        load_settings(None, environ={"PACS_AGENT__NODE": "1", "PACS_AGENT__NODE__PORT": "2"})


def test_host_and_aet_allow_lists() -> None:
    security = settings_from_mapping(
        {"security": {"allowed_hosts": ["10.1.0.0/16", "127.0.0.1"], "allowed_calling_aets": ["CT1"]}}
    ).security
    assert security.host_allowed("10.1.200.3")
    assert security.host_allowed("127.0.0.1")
    assert not security.host_allowed("10.2.0.1")
    assert not security.host_allowed("garbage")
    assert security.calling_aet_allowed("CT1 ")
    assert not security.calling_aet_allowed("CT2")
    assert Settings().security.host_allowed("8.8.8.8")


def test_machine_checks(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    settings = settings_from_mapping(
        {
            "storage": {"state_dir": str(blocker / "state")},
            "database": {"url": "mysql://x@y/z"},
            "destinations": [{"name": "me", "ae_title": "PACS_AGENT", "host": "h", "port": 11112}],
        }
    )
    problems = check_settings(settings)
    assert any("is not a directory" in p for p in problems)
    assert any("not supported" in p for p in problems)
    assert any("points at this node itself" in p for p in problems)
    assert check_settings(settings_from_mapping({"storage": {"state_dir": str(tmp_path / "s")}})) == []


def test_config_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(f'[storage]\nstate_dir = "{tmp_path / "state"}"\n')
    assert main(["config", "check", "--config", str(good)]) == 0
    assert "configuration OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nport = 0\nae_title = "X\\\\Y"\n')
    assert main(["config", "check", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert "node.port" in err
    assert "node.ae_title" in err


def test_routing_settings_validate() -> None:
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        settings_from_mapping({"routing": {"portal_venous_patterns": ["("]}})
    with pytest.raises(ConfigError, match="min, max"):
        settings_from_mapping({"routing": {"delay_window_seconds": [90, 60]}})
    rules = settings_from_mapping({"routing": {"delay_window_seconds": [60, 90]}}).routing.phase_rules()
    assert rules.delay_window_seconds == (60.0, 90.0)


def test_sources_and_response_settings() -> None:
    settings = settings_from_mapping(
        {
            "sources": [{"name": "pacs", "ae_title": "ORTHANC", "host": "h", "port": 4242, "retrieve": "get"}],
            "response": {"window_weeks": [5, 11]},
        }
    )
    assert settings.sources[0].retrieve == "get"
    assert settings.response.window_weeks == (5.0, 11.0)
    with pytest.raises(ConfigError, match=r"sources\.0\.retrieve"):
        settings_from_mapping({"sources": [{"name": "p", "ae_title": "A", "host": "h", "port": 1, "retrieve": "x"}]})
    with pytest.raises(ConfigError, match="min, max"):
        settings_from_mapping({"response": {"window_weeks": [10, 6]}})
