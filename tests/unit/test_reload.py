"""``Engine.reload``: changed plugins are rebuilt, unchanged ones keep running with their flows."""

from __future__ import annotations

import pytest

from engine.decision import Verdict
from engine.plugin_manager import PluginLoadError
from engine.profile import Profile, profile_from_dict
from engine.testing import PluginHarness, udp

RECORDER = "tests.unit.sample_plugins:Recorder"
BLOCKER = "tests.unit.sample_plugins:PortBlocker"


def profile(plugins: list[str], port: int = 443, **engine: object) -> Profile:
    tables = {"port_blocker": {"port": port}} if BLOCKER in plugins else {}
    return profile_from_dict({"engine": {"plugins": plugins, **engine}, "plugins": tables}, file="<reload-test>")


def test_reload_rebuilds_changed_plugins_and_keeps_the_rest() -> None:
    with PluginHarness(BLOCKER, {"port": 443}, others=[(RECORDER, {})]) as harness:
        engine = harness.engine
        recorder = engine.plugins["recorder"]
        blocker = engine.plugins["port_blocker"]
        open_flow = harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 80, b"a")).flow
        assert open_flow is not None and open_flow.handler is not None

        result = harness.loop.run_until_complete(engine.reload(profile([BLOCKER, RECORDER], port=80, reject_rate=7)))
        assert result["rebuilt"] == ["port_blocker"] and result["kept"] == ["recorder"]
        assert result["restart_required"] == []
        assert engine.plugins["recorder"] is recorder and engine.plugins["port_blocker"] is not blocker
        # The kept plugin's flow lives on; the new config is in force for new flows, in profile order.
        harness.feed(udp("10.0.0.2", 5000, "192.0.2.7", 80, b"bb"))
        assert recorder.handlers[0].packets == [2]
        assert harness.feed(udp("10.0.0.2", 5001, "192.0.2.7", 80, b"c")).decision.verdict is Verdict.REJECT  # type: ignore[union-attr]
        assert harness.feed(udp("10.0.0.2", 5002, "192.0.2.7", 443, b"c")).decision.verdict is Verdict.ACCEPT  # type: ignore[union-attr]
        assert engine.config.engine.reject_rate == 7


def test_reload_adds_and_removes_plugins_and_reports_restart_keys() -> None:
    with PluginHarness(RECORDER) as harness:
        engine = harness.engine
        result = harness.loop.run_until_complete(engine.reload(profile([BLOCKER, RECORDER], mtu=1400)))
        assert result["added"] == ["port_blocker"] and result["restart_required"] == ["mtu"]
        result = harness.loop.run_until_complete(engine.reload(profile([RECORDER])))
        assert result["removed"] == ["port_blocker"] and list(engine.plugins) == ["recorder"]


def test_a_failing_reload_changes_nothing() -> None:
    with PluginHarness(BLOCKER, {"port": 443}, others=[(RECORDER, {})]) as harness:
        engine = harness.engine
        before = dict(engine.plugins)
        with pytest.raises(PluginLoadError):
            harness.loop.run_until_complete(engine.reload(profile([BLOCKER, "no_such_plugin"])))
        with pytest.raises(PluginLoadError):
            harness.loop.run_until_complete(engine.reload(profile([BLOCKER, "tests.unit.sample_plugins:Misspelled"])))
        assert engine.plugins == before
        assert harness.feed(udp("10.0.0.2", 5003, "192.0.2.7", 443, b"c")).decision.verdict is Verdict.REJECT  # type: ignore[union-attr]
