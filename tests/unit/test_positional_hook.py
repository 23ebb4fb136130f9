"""PositionalHook: a positional hook call with pluggy's order and result rules and GuardedPlugin's containment."""

from __future__ import annotations

from typing import Any

import pytest

from engine.hookspecs import delegated, hookimpl, labelled, protocols
from engine.plugin_manager import GuardedPlugin, HookRunner, PositionalHook, new_plugin_manager
from engine.stats import Stats


class AnswerBoth:
    def __init__(self, log: list[Any]) -> None:
        self.log = log

    @hookimpl
    def dnsgate_dns_answer(self, now: float, answer: Any) -> None:  # declared in the other order
        self.log.append(("both", answer, now))


class AnswerOnly:
    def __init__(self, log: list[Any]) -> None:
        self.log = log

    @hookimpl
    def dnsgate_dns_answer(self, answer: Any) -> None:  # a subset of the arguments
        self.log.append(("answer-only", answer))


class Failing:
    @hookimpl
    def dnsgate_dns_answer(self, answer: Any, now: float) -> None:
        raise RuntimeError("boom")


class Verdicts:
    def __init__(self, verdict: Any) -> None:
        self.verdict = verdict

    @hookimpl
    def dnsgate_filter(self, packet: Any, flow: Any, now: float) -> Any:
        return self.verdict


class Watching:
    def __init__(self, log: list[Any]) -> None:
        self.log = log

    @hookimpl(wrapper=True)
    def dnsgate_dns_answer(self, answer: Any, now: float) -> Any:
        self.log.append(("wrapper", answer))
        return (yield)


def _manager(stats: Stats, *plugins: tuple[str, Any]) -> Any:
    pm = new_plugin_manager()
    for name, plugin in reversed(plugins):  # registered in reverse: called in the listed order
        pm.register(GuardedPlugin(plugin, name, stats, "accept"), name=name)
    return pm


def test_arguments_reach_each_implementation_by_name_in_pluggy_order() -> None:
    log: list[Any] = []
    pm = _manager(Stats(), ("both", AnswerBoth(log)), ("only", AnswerOnly(log)))
    call = PositionalHook(pm.hook.dnsgate_dns_answer, "answer", "now")
    assert call("A", 1.5) == []
    assert log == [("both", "A", 1.5), ("answer-only", "A")]


def test_a_failing_implementation_is_counted_and_the_others_still_run() -> None:
    log: list[Any] = []
    stats = Stats()
    pm = _manager(stats, ("failing", Failing()), ("both", AnswerBoth(log)))
    call = PositionalHook(pm.hook.dnsgate_dns_answer, "answer", "now")
    call("A", 1.0)
    call("B", 2.0)
    assert stats.get("plugin_errors.failing") == 2
    assert log == [("both", "A", 1.0), ("both", "B", 2.0)]


def test_firstresult_returns_the_first_answer() -> None:
    pm = _manager(Stats(), ("none", Verdicts(None)), ("first", Verdicts("first")), ("second", Verdicts("second")))
    call = PositionalHook(pm.hook.dnsgate_filter, "packet", "flow", "now")
    assert call(object(), object(), 0.0) == "first"


def test_registration_changes_are_seen_and_a_wrapper_takes_the_pluggy_path() -> None:
    log: list[Any] = []
    stats = Stats()
    pm = _manager(stats, ("only", AnswerOnly(log)))
    call = PositionalHook(pm.hook.dnsgate_dns_answer, "answer", "now")
    call("A", 0.0)
    pm.register(GuardedPlugin(Watching(log), "watching", stats, "accept"), name="watching")
    call("B", 0.0)
    pm.unregister(name="only")
    call("C", 0.0)
    assert log == [("answer-only", "A"), ("wrapper", "B"), ("answer-only", "B"), ("wrapper", "C")]


@pytest.mark.parametrize("through", ["runner", "plain"])
def test_the_plan_follows_registrations_by_generation_or_by_pluggys_list(through: str) -> None:
    """The runner's callers re-plan when the manager's ``generation`` moves (register, unregister,
    add_hookspecs); a caller without the engine's manager compares pluggy's list on every call."""
    log: list[Any] = []
    stats = Stats()
    pm = _manager(stats, ("only", AnswerOnly(log)))
    if through == "runner":
        call = HookRunner(pm, stats).positional("dnsgate_dns_answer", "answer", "now")
    else:
        call = PositionalHook(pm.hook.dnsgate_dns_answer, "answer", "now")
    before = pm.generation
    call("A", 0.0)
    call("A2", 0.0)  # nothing changed: the same plan
    pm.register(GuardedPlugin(AnswerBoth(log), "both", stats, "accept"), name="both")
    assert pm.generation == before + 1
    call("B", 1.0)
    pm.unregister(name="only")
    assert pm.generation == before + 2
    call("C", 2.0)
    assert log == [("answer-only", "A"), ("answer-only", "A2"), ("both", "B", 1.0), ("answer-only", "B"),
                   ("both", "C", 2.0)]


def test_argument_names_must_match_the_hook() -> None:
    pm = _manager(Stats())
    with pytest.raises(TypeError, match="dnsgate_dns_answer"):
        PositionalHook(pm.hook.dnsgate_dns_answer, "answer")


class UdpOnly:
    def __init__(self, log: list[Any]) -> None:
        self.log = log

    @protocols(17)
    @hookimpl
    def dnsgate_filter(self, packet: Any, flow: Any, now: float) -> Any:
        self.log.append(("udp-only", packet))
        return None


class Everything:
    def __init__(self, log: list[Any]) -> None:
        self.log = log

    @hookimpl
    def dnsgate_filter(self, packet: Any, flow: Any, now: float) -> Any:
        self.log.append(("everything", packet))
        return "verdict" if packet == "last" else None


def test_an_implementation_marked_for_some_protocols_is_skipped_for_the_others() -> None:
    log: list[Any] = []
    stats = Stats()
    pm = _manager(stats, ("udp", UdpOnly(log)), ("all", Everything(log)))
    runner = HookRunner(pm, stats)
    assert runner.call_for(6, "dnsgate_filter", "tcp", None, 0.0) is None
    assert runner.call_for(17, "dnsgate_filter", "udp", None, 0.0) is None
    assert runner.call_for(6, "dnsgate_filter", "last", None, 0.0) == "verdict"
    runner.call("dnsgate_filter", "unscoped", None, 0.0)  # a call without a protocol calls everyone
    assert log == [("everything", "tcp"), ("udp-only", "udp"), ("everything", "udp"), ("everything", "last"),
                   ("udp-only", "unscoped"), ("everything", "unscoped")]
    pm.unregister(name="all")  # a registration change re-plans every protocol's list
    runner.call_for(6, "dnsgate_filter", "tcp again", None, 0.0)
    runner.call_for(17, "dnsgate_filter", "udp again", None, 0.0)
    assert log[-1:] == [("udp-only", "udp again")]


@pytest.mark.parametrize("numbers", [(), (256,), ("udp",)])
def test_protocols_takes_ip_protocol_numbers(numbers: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError, match="IP protocol numbers"):
        protocols(*numbers)


class DnsOnly:
    """Answers DNS flows only, and says so twice: the mark (the runner's skip) and its own check."""

    def __init__(self, log: list[Any]) -> None:
        self.log = log

    @labelled("dns")
    @hookimpl
    def dnsgate_filter(self, packet: Any, flow: Any, now: float) -> Any:
        self.log.append(("dns-only", packet))
        return "dns verdict" if "dns" in flow.labels else None


class Labels:
    def __init__(self, *labels: str) -> None:
        self.labels = set(labels)


def test_an_implementation_marked_for_a_label_is_skipped_for_flows_without_it() -> None:
    log: list[Any] = []
    stats = Stats()
    pm = _manager(stats, ("dns", DnsOnly(log)), ("all", Everything(log)))
    runner = HookRunner(pm, stats)
    assert runner.call_for(6, "dnsgate_filter", "http", Labels(), 0.0) is None
    assert runner.call_for(17, "dnsgate_filter", "query", Labels("dns", "x"), 0.0) == "dns verdict"
    assert runner.call("dnsgate_filter", "quic", Labels("quic"), 0.0) is None  # call() honours labels too
    assert log == [("everything", "http"), ("dns-only", "query"), ("everything", "quic")]
    assert stats.counters == {}  # a skip is not a failure


def test_a_guarded_plugin_keeps_its_label_mark_and_a_wrapper_calls_everyone() -> None:
    log: list[Any] = []
    stats = Stats()
    pm = _manager(stats, ("dns", DnsOnly(log)))

    class Wrapper:
        @hookimpl(wrapper=True)
        def dnsgate_filter(self, packet: Any, flow: Any, now: float) -> Any:
            return (yield)

    runner = HookRunner(pm, stats)
    runner.call_for(6, "dnsgate_filter", "skipped", Labels(), 0.0)
    pm.register(Wrapper(), name="wrapper")  # pluggy's own call from now on: the marks are not consulted
    assert runner.call_for(6, "dnsgate_filter", "called", Labels(), 0.0) is None
    assert log == [("dns-only", "called")]


def test_a_label_mark_on_a_hook_without_a_flow_is_refused_when_planned() -> None:
    class Misplaced:
        @labelled("dns")
        @hookimpl
        def dnsgate_dns_answer(self, answer: Any, now: float) -> None: ...

    stats = Stats()
    pm = _manager(stats, ("misplaced", Misplaced()))
    with pytest.raises(TypeError, match="takes no flow"):
        PositionalHook(pm.hook.dnsgate_dns_answer, "answer", "now")("A", 1.0)


@pytest.mark.parametrize("label", ["", 7, None])
def test_labelled_takes_a_label(label: Any) -> None:
    with pytest.raises(ValueError, match="flow label"):
        labelled(label)


class Delegating:
    """A filter whose body only calls ``self.judge``; ``judge`` None means the hook has nothing to do."""

    def __init__(self, log: list[Any], judge: Any) -> None:
        self.log = log
        self.judge = judge

    @delegated("judge")
    @hookimpl
    def dnsgate_filter(self, packet: Any, flow: Any, now: float) -> Any:
        self.log.append(("body", packet))
        return None if self.judge is None else self.judge(packet, flow, now)


def test_a_delegated_implementation_calls_its_attribute_in_place_of_its_body() -> None:
    log: list[Any] = []
    stats = Stats()

    def judge(packet: Any, flow: Any, now: float) -> Any:
        log.append(("judge", packet, now))
        return "judged" if packet == "mine" else None

    pm = _manager(stats, ("delegating", Delegating(log, judge)), ("all", Everything(log)))
    runner = HookRunner(pm, stats)
    assert runner.call_for(6, "dnsgate_filter", "other", Labels(), 1.0) is None
    assert runner.call("dnsgate_filter", "mine", Labels(), 2.0) == "judged"
    assert log == [("judge", "other", 1.0), ("everything", "other"), ("judge", "mine", 2.0)]  # never the body


def test_a_delegated_implementation_set_to_none_is_skipped() -> None:
    log: list[Any] = []
    stats = Stats()
    pm = _manager(stats, ("idle", Delegating(log, None)), ("all", Everything(log)))
    runner = HookRunner(pm, stats)
    assert runner.call_for(6, "dnsgate_filter", "last", Labels(), 0.0) == "verdict"
    assert log == [("everything", "last")]


def test_a_failing_delegate_is_contained_by_its_plugin_guard() -> None:
    log: list[Any] = []
    stats = Stats()

    def judge(packet: Any, flow: Any, now: float) -> Any:
        raise RuntimeError("compiled gate bug")

    pm = _manager(stats, ("delegating", Delegating(log, judge)), ("all", Everything(log)))
    assert HookRunner(pm, stats).call_for(6, "dnsgate_filter", "last", Labels(), 0.0) == "verdict"
    assert stats.counters["plugin_errors.delegating"] == 1 and log == [("everything", "last")]


def test_with_a_wrapper_the_delegated_body_runs() -> None:
    log: list[Any] = []
    stats = Stats()
    pm = _manager(stats, ("delegating", Delegating(log, lambda packet, flow, now: "judged")))

    class Wrapper:
        @hookimpl(wrapper=True)
        def dnsgate_filter(self, packet: Any, flow: Any, now: float) -> Any:
            return (yield)

    pm.register(Wrapper(), name="wrapper")
    assert HookRunner(pm, stats).call_for(6, "dnsgate_filter", "p", Labels(), 0.0) == "judged"
    assert log == [("body", "p")]


def test_a_delegate_that_is_not_callable_is_refused_when_planned() -> None:
    stats = Stats()
    for judge, missing in (("not callable", False), (None, True)):
        plugin = Delegating([], judge)
        if missing:
            del plugin.judge
        pm = _manager(stats, ("delegating", plugin))
        with pytest.raises(TypeError, match="callable or None"):
            PositionalHook(pm.hook.dnsgate_filter, "packet", "flow", "now")("p", Labels(), 0.0)


@pytest.mark.parametrize("attribute", ["", "a.b", 3])
def test_delegated_takes_an_attribute_name(attribute: Any) -> None:
    with pytest.raises(ValueError, match="attribute name"):
        delegated(attribute)
