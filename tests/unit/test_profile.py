"""Profiles: built-ins load, inheritance merges, and every error names file, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.commands.check import resolve
from engine.profile import ProfileError, load_profile, parse_duration


@pytest.mark.parametrize("text,seconds", [("5m", 300), ("30s", 30), ("250ms", 0.25), ("1h30m", 5400), (7, 7.0), ("2d", 172800)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5 minutes", "m5", "", "-3s", True, -1])
def test_bad_durations_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def write(tmp_path: Path, text: str, name: str = "p.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_builtin_profiles_carry_the_seed_defaults() -> None:
    firewall = load_profile("firewall")
    assert firewall.engine.mode == "firewall"
    assert firewall.engine.tun_addresses[0] == "10.0.0.1/24"
    assert firewall.engine.device_addresses[0] == "10.0.0.2/24"
    assert firewall.engine.mtu == 1500
    assert firewall.plugin_tables["ip_tracker"]["ttl"] == "5m"
    assert firewall.plugin_tables["quic_block"]["ports"] == [443, 80]
    dns_only = load_profile("dns-only")
    assert dns_only.engine.mode == "dns-only"
    assert dns_only.engine.plugins == firewall.engine.plugins


def test_extends_merges_tables_and_replaces_lists(tmp_path: Path) -> None:
    path = write(tmp_path, 'extends = "firewall"\n[engine]\nmtu = 9000\nplugins = ["quic_block"]\n[plugins.quic_block]\naction = "reject"\n')
    profile = load_profile(path)
    assert profile.engine.mtu == 9000
    assert profile.engine.mode == "firewall"
    assert profile.engine.plugins == ("quic_block",)
    assert profile.plugin_tables["quic_block"] == {"ports": [443, 80], "action": "reject"}
    assert "ip_tracker" not in profile.plugin_tables  # inherited tables of unlisted plugins are dropped


def test_extends_a_relative_path(tmp_path: Path) -> None:
    write(tmp_path, '[engine]\nplugins = ["quic_block"]\nmtu = 1400\n', "base.toml")
    profile = load_profile(write(tmp_path, 'extends = "base.toml"\n[engine]\nreject_rate = 5\n'))
    assert (profile.engine.mtu, profile.engine.reject_rate) == (1400, 5)


@pytest.mark.parametrize(
    "text,key,reason",
    [
        ('[engine]\nplugins = ["quic_block"]\nmtu = "big"\n', "engine.mtu", "expected an integer"),
        ('[engine]\nplugins = ["quic_block"]\nmtu = 100\n', "engine", "mtu"),
        ('[engine]\nplugins = ["quic_block"]\nmoed = "firewall"\n', "engine.moed", "unknown key"),
        ('[engine]\nplugins = ["quic_block"]\nmode = "fw"\n', "engine.mode", "must be one of"),
        ('[engine]\nplugins = ["quic_block"]\nblocked_flow_ttl = "soon"\n', "engine.blocked_flow_ttl", "duration"),
        ('[engine]\nplugins = ["quic_block"]\ndevice_addresses = ["nope"]\n', "engine", "device_addresses"),
        ('[engine]\nplugins = []\n', "engine.plugins", "no plugins"),
        ('[engine]\nplugins = ["quic_block"]\n[plugins.udp_forward]\nidle_timeout = "1s"\n', "plugins.udp_forward", "does not list"),
        ('colour = 1\n[engine]\nplugins = ["quic_block"]\n', "colour", "unknown top-level key"),
        ('[engine\nplugins = 1', "", "invalid TOML"),
        ('extends = "nowhere.toml"\n', "", "no such profile file"),
        ('[engine]\nplugins = ["quic_block"]\nouter = "${DNSGATE_TEST_UNSET_VAR}"\n', "engine.outer", "DNSGATE_TEST_UNSET_VAR"),
    ],
)
def test_bad_profiles_name_file_key_and_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as caught:
        resolve(path)  # what `dnsgate check` and `run` do: the profile and every plugin config
    message = str(caught.value)
    assert caught.value.file.endswith("nowhere.toml") or caught.value.file == path
    assert caught.value.key == key, message
    assert reason in message


def test_bad_plugin_config_is_refused_with_its_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[engine]\nplugins = ["quic_block"]\n[plugins.quic_block]\nports = ["https"]\n')
    with pytest.raises(ProfileError) as caught:
        resolve(path)
    assert caught.value.key == "plugins.quic_block.ports[0]"


def test_extends_loop_is_refused(tmp_path: Path) -> None:
    write(tmp_path, 'extends = "b.toml"\n', "a.toml")
    write(tmp_path, 'extends = "a.toml"\n', "b.toml")
    with pytest.raises(ProfileError, match="loop"):
        load_profile(str(tmp_path / "a.toml"))


def test_environment_substitution(tmp_path: Path) -> None:
    path = write(tmp_path, '[engine]\nplugins = ["quic_block"]\ntun_name = "${TUN_FOR_TEST:-dg9}"\noutbound_interface = "${OUT_FOR_TEST}"\n')
    profile = load_profile(path, environ={"OUT_FOR_TEST": "eth7"})
    assert (profile.engine.tun_name, profile.engine.outbound_interface) == ("dg9", "eth7")
