"""The relay's decisions alone (plugins/tcp_forward/relay_core.py), command by command, with no socket.

Written as mitmproxy's Playbook tests are: ``pb >> event`` feeds the core one event, each following
``pb << command`` names the next command it must answer with, and the next ``>>`` (or the final ``assert
pb``) fails if it said anything more. Replies to ``SendUpstream`` / ``SendClient`` are events like any
other (``upstream_sent(n)``, ``client_took(n)``), so a short write is just a smaller number.
"""

from __future__ import annotations

from typing import Any

import pytest

from engine.tcp.events import CLOSE_HALF_CLOSE_TIMEOUT, CLOSE_KEEPALIVE, CLOSE_NORMAL, CLOSE_RESET
from plugins.tcp_forward.relay_core import (
    DIAL_CANCELLED,
    DIAL_FAILED,
    DIAL_OK,
    DIAL_TIMEOUT,
    CancelTimer,
    CloseUpstream,
    Command,
    ConsumeClient,
    DialDone,
    Down,
    FinishClient,
    Finished,
    FlushClient,
    Phase,
    RelayCore,
    ResetClient,
    SendClient,
    SendUpstream,
    SetTimer,
    ShutdownUpstream,
    Up,
    WatchUpstream,
)

HIGH, LOW = 100, 40


class Event:
    """One call into the core, by name (``E.client_data(b"x")``), shown as it was written."""

    def __init__(self, name: str, args: tuple[Any, ...]) -> None:
        self.name, self.args = name, args

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(map(repr, self.args))})"


class _Events:
    def __getattr__(self, name: str) -> Any:
        return lambda *args: Event(name, args)


E = _Events()


class Playbook:
    """Feeds events to a core and checks its commands as they come (eagerly: a ``SendUpstream`` may carry
    the core's own buffer, which the next event changes)."""

    def __init__(self, core: RelayCore) -> None:
        self.core = core
        self.queue: list[Command] = []
        self.log: list[str] = []

    def __rshift__(self, event: Event) -> "Playbook":
        self._nothing_left()
        commands = list(getattr(self.core, event.name)(*event.args))
        self.log.append(f">> {event!r}")
        self.queue = commands
        return self

    def __lshift__(self, expected: Command) -> "Playbook":
        if not self.queue:
            raise AssertionError(f"expected {expected!r}, got nothing more\n{self._trace()}")
        actual = self.queue.pop(0)
        if actual != expected:
            raise AssertionError(f"expected {expected!r}, got {actual!r}\n{self._trace()}")
        self.log.append(f"<< {actual!r}")
        return self

    def __bool__(self) -> bool:
        self._nothing_left()
        return True

    def _nothing_left(self) -> None:
        if self.queue:
            raise AssertionError(f"unexpected commands {self.queue!r}\n{self._trace()}")

    def _trace(self) -> str:
        return "\n".join(self.log[-12:] + [f"   state: {self.core!r}"])


def watch(read: bool, write: bool) -> WatchUpstream:
    return WatchUpstream(read, write)


def open_relay(high: int = HIGH, low: int = LOW) -> Playbook:
    """A core whose dial succeeded: reading the upstream, nothing buffered."""
    pb = Playbook(RelayCore(high, low))
    assert (
        pb
        >> E.dial_started(5.0)
        << watch(False, True)
        << SetTimer(5.0)
        >> E.connected()
        << CancelTimer()
        << watch(True, False)
        << DialDone(DIAL_OK)
    )
    assert pb.core.phase is Phase.OPEN and pb.core.up is Up.OPEN and pb.core.down is Down.OPEN
    return pb


# --- dialing ----------------------------------------------------------------------------------------------


def test_a_failed_dial_closes_the_socket_and_reports_the_error() -> None:
    error = ConnectionRefusedError(111, "refused")
    pb = Playbook(RelayCore(HIGH, LOW))
    assert (
        pb
        >> E.dial_started(5.0)
        << watch(False, True)
        << SetTimer(5.0)
        >> E.dial_failed(error)
        << CancelTimer()
        << CloseUpstream(False)
        << DialDone(DIAL_FAILED, error)
        >> E.client_closed("refused")  # the plugin refused the client: its connection ends
        << Finished("refused")
    )
    assert pb.core.phase is Phase.DONE


def test_a_dial_with_no_socket_at_all_fails_without_a_timer() -> None:
    error = OSError(24, "Too many open files")
    assert Playbook(RelayCore(HIGH, LOW)) >> E.dial_failed(error) << CloseUpstream(False) << DialDone(DIAL_FAILED, error)


def test_the_connect_deadline_gives_up_at_its_time_not_before() -> None:
    pb = Playbook(RelayCore(HIGH, LOW))
    assert (
        pb
        >> E.dial_started(5.0)
        << watch(False, True)
        << SetTimer(5.0)
        >> E.timer(4.999)  # early: nothing (the deadline queue never fires early, but the core need not care)
        >> E.timer(5.0)
        << CloseUpstream(False)
        << DialDone(DIAL_TIMEOUT)
        >> E.timer(6.0)  # once only
        >> E.connected()  # a late writability after the give-up changes nothing
    )


def test_a_client_reset_while_dialing_cancels_the_dial() -> None:
    pb = Playbook(RelayCore(HIGH, LOW))
    assert (
        pb
        >> E.dial_started(5.0)
        << watch(False, True)
        << SetTimer(5.0)
        >> E.client_reset()
        << CancelTimer()
        << CloseUpstream(True)
        << DialDone(DIAL_CANCELLED)
        >> E.client_closed(CLOSE_RESET)
        << Finished(CLOSE_RESET)
        >> E.timer(5.0)
    )


def test_the_client_closing_while_dialing_cancels_the_dial() -> None:
    assert (
        Playbook(RelayCore(HIGH, LOW))
        >> E.dial_started(5.0)
        << watch(False, True)
        << SetTimer(5.0)
        >> E.client_closed("closed by engine")
        << CancelTimer()
        << CloseUpstream(False)
        << DialDone(DIAL_CANCELLED)
        << Finished("closed by engine")
    )


# --- the data paths ---------------------------------------------------------------------------------------


def test_data_passes_straight_through_both_ways() -> None:
    pb = open_relay()
    assert (
        pb
        >> E.client_data(b"request")
        << SendUpstream(b"request")
        >> E.upstream_sent(7)
        << ConsumeClient(7)
        >> E.upstream_data(b"response", False)
        << SendClient(b"response", True)
        >> E.client_took(8)
    )
    assert pb.core.bytes_up == 7 and pb.core.bytes_down == 8


def test_the_fast_path_shortcuts_are_the_same_as_the_full_protocol() -> None:
    """What the driver does for speed (send first, tell the core the count) must land where the two-step
    protocol lands."""
    slow, fast = open_relay(), open_relay()
    assert slow >> E.client_data(b"abcdef") << SendUpstream(b"abcdef") >> E.upstream_sent(2) << watch(True, True) << ConsumeClient(6)
    assert fast >> E.client_data(b"abcdef", 2) << watch(True, True) << ConsumeClient(6)
    assert slow >> E.upstream_data(b"xyz", True) << SendClient(b"xyz", False) >> E.client_took(1) << watch(False, True) << FlushClient()
    assert fast >> E.upstream_data(b"xyz", True, 1) << watch(False, True) << FlushClient()
    for core in (slow.core, fast.core):
        assert (core.phase, core.up, core.down, bytes(core.out), bytes(core.pending or b"")) == (
            Phase.OPEN, Up.BUFFERED, Down.EOF_QUEUED, b"cdef", b"yz")
        assert (core.bytes_up, core.bytes_down) == (6, 3)


# --- half-close -------------------------------------------------------------------------------------------


def test_client_half_close_then_the_server_answers_and_finishes() -> None:
    pb = open_relay()
    assert (
        pb
        >> E.client_data(b"request")
        << SendUpstream(b"request")
        >> E.upstream_sent(7)
        << ConsumeClient(7)
        >> E.client_fin()
        << ShutdownUpstream()  # the server sees EOF and may still answer
        >> E.client_data(b"late")  # cannot happen after a FIN in order; ignored if it did
        >> E.upstream_data(b"answer after the FIN", False)
        << SendClient(b"answer after the FIN", True)
        >> E.client_took(20)
        >> E.upstream_eof()
        << watch(False, False)
        << FinishClient()
        >> E.client_closed(CLOSE_NORMAL)
        << CloseUpstream(False)
        << Finished(CLOSE_NORMAL)
    )
    assert pb.core.phase is Phase.DONE and pb.core.up is Up.SHUT and pb.core.down is Down.FINISHED


def test_client_fin_waits_for_the_buffered_bytes() -> None:
    pb = open_relay()
    assert (
        pb
        >> E.client_data(b"0123456789")
        << SendUpstream(b"0123456789")
        >> E.upstream_sent(4)
        << watch(True, True)
        << ConsumeClient(10)
        >> E.client_fin()  # six bytes still to go: the FIN waits behind them
        >> E.upstream_writable()
        << SendUpstream(b"456789")
        >> E.upstream_sent(6)
        << watch(True, False)
        << ShutdownUpstream()
    )
    assert pb.core.up is Up.SHUT and pb.core.down is Down.OPEN  # the other direction carries on


def test_server_half_close_first_then_the_client_finishes() -> None:
    """HTTP/1.0: the server answers and closes; the client still sends (here a last chunk), then its FIN
    closes the socket outright (both directions are done: no SHUT_WR first)."""
    pb = open_relay()
    assert (
        pb
        >> E.upstream_data(b"HTTP/1.0 200 OK", True)  # the FIN was already queued behind the answer
        << SendClient(b"HTTP/1.0 200 OK", False)
        >> E.client_took(15)
        << watch(False, False)
        << FinishClient()  # rides on the data segment
        >> E.client_data(b"bye")
        << SendUpstream(b"bye")
        >> E.upstream_sent(3)
        << ConsumeClient(3)
        >> E.client_fin()
        << CloseUpstream(False)
        >> E.client_closed(CLOSE_NORMAL)
        << Finished(CLOSE_NORMAL)
    )


def test_server_fin_after_a_plain_read() -> None:
    assert open_relay() >> E.upstream_eof() << watch(False, False) << FinishClient() >> E.upstream_eof()


def test_a_normal_close_with_bytes_still_buffered_drains_them_first() -> None:
    pb = open_relay()
    assert (
        pb
        >> E.client_data(b"last words")
        << SendUpstream(b"last words")
        >> E.upstream_sent(0)  # EAGAIN
        << watch(True, True)
        << ConsumeClient(10)
        >> E.client_closed(CLOSE_NORMAL)
        << watch(False, True)  # no more reading; the buffer still goes out
        << Finished(CLOSE_NORMAL)
        >> E.upstream_writable()
        << SendUpstream(b"last words")
        >> E.upstream_sent(10)
        << CloseUpstream(False)
    )
    assert pb.core.phase is Phase.DONE


# --- backpressure -----------------------------------------------------------------------------------------


def test_client_to_upstream_backpressure_at_the_watermarks() -> None:
    """Above ``high`` buffered bytes the client's bytes are no longer consumed (its window closes); they
    are consumed, all at once, when the buffer is down to ``low``. Exactly ``high`` is not above it."""
    pb = open_relay(high=100, low=40)
    assert (
        pb
        >> E.client_data(bytes(60))
        << SendUpstream(bytes(60))
        >> E.upstream_sent(0)
        << watch(True, True)
        << ConsumeClient(60)  # 60 buffered: below the mark
        >> E.client_data(bytes(40))
        << ConsumeClient(40)  # 100: at the mark, not above it
        >> E.client_data(bytes(1))  # 101: above; withheld
        >> E.client_data(bytes(30))  # still throttled, whatever the level
    )
    assert pb.core.up is Up.THROTTLED and pb.core.withheld == 31 and len(pb.core.out) == 131
    assert (
        pb
        >> E.upstream_writable()
        << SendUpstream(bytes(131))
        >> E.upstream_sent(90)  # 41 left: above low, still throttled
        >> E.client_data(bytes(5))
        >> E.upstream_writable()
        << SendUpstream(bytes(46))
        >> E.upstream_sent(6)  # 40 left: at low, the window reopens
        << ConsumeClient(36)
        >> E.client_data(bytes(2))
        << ConsumeClient(2)  # buffered but no longer throttled
        >> E.upstream_writable()
        << SendUpstream(bytes(42))
        >> E.upstream_sent(42)
        << watch(True, False)
    )
    assert pb.core.up is Up.OPEN and pb.core.withheld == 0 and not pb.core.out


def test_a_fin_behind_a_throttled_buffer_releases_the_window_then_shuts_down() -> None:
    pb = open_relay(high=10, low=0)
    assert (
        pb
        >> E.client_data(bytes(20))
        << SendUpstream(bytes(20))
        >> E.upstream_sent(5)  # 15 left: above high at once
        << watch(True, True)
        >> E.client_fin()
        >> E.upstream_writable()
        << SendUpstream(bytes(15))
        >> E.upstream_sent(15)
        << ConsumeClient(20)
        << watch(True, False)
        << ShutdownUpstream()
    )


def test_upstream_to_client_backpressure_pauses_reading_until_send_space() -> None:
    pb = open_relay()
    assert (
        pb
        >> E.upstream_data(b"0123456789", False)
        << SendClient(b"0123456789", True)
        >> E.client_took(4)  # the client's send buffer is full
        << watch(False, False)  # stop reading: the server sees a full window
        >> E.client_space()
        << SendClient(b"456789", True)
        >> E.client_took(3)  # still not all
        >> E.client_space()
        << SendClient(b"789", True)
        >> E.client_took(3)
        << watch(True, False)  # everything delivered: read again
        >> E.client_space()  # nothing pending: nothing to do
    )
    assert pb.core.down is Down.OPEN and pb.core.pending is None and pb.core.bytes_down == 10


def test_the_servers_fin_waits_for_the_pending_bytes() -> None:
    pb = open_relay()
    assert (
        pb
        >> E.upstream_data(b"0123456789", True)
        << SendClient(b"0123456789", False)
        >> E.client_took(6)
        << watch(False, False)
        << FlushClient()  # what was taken goes out now; the FIN waits
        >> E.client_space()
        << SendClient(b"6789", True)
        >> E.client_took(4)
        << FinishClient()
    )
    assert pb.core.down is Down.FINISHED


# --- resets and timeouts ----------------------------------------------------------------------------------


def test_upstream_reset_resets_the_client() -> None:
    pb = open_relay()
    assert (
        pb
        >> E.upstream_data(b"partial", False)
        << SendClient(b"partial", True)
        >> E.client_took(3)
        << watch(False, False)
        >> E.upstream_error(ConnectionResetError(104, "reset"))
        << CloseUpstream(False)  # the kernel already reset it
        << ResetClient()
        >> E.client_space()  # the pending bytes went with the upstream
        >> E.client_closed("aborted")
        << Finished("aborted")
    )
    assert pb.core.phase is Phase.DONE and pb.core.pending is None


def test_a_failed_send_resets_the_client() -> None:
    pb = open_relay()
    assert (
        pb
        >> E.client_data(b"x")
        << SendUpstream(b"x")
        >> E.upstream_error(BrokenPipeError(32, "broken pipe"))
        << CloseUpstream(False)
        << ResetClient()
        >> E.upstream_sent(1)  # a stale reply changes nothing
        >> E.client_data(b"more")
    )


def test_client_reset_resets_the_upstream() -> None:
    pb = open_relay()
    assert (
        pb
        >> E.client_data(b"abc")
        << SendUpstream(b"abc")
        >> E.upstream_sent(1)
        << watch(True, True)
        << ConsumeClient(3)
        >> E.client_reset()
        << CloseUpstream(True)  # RST, not FIN: a reset stays a reset
        >> E.upstream_writable()
        >> E.client_closed(CLOSE_RESET)
        << Finished(CLOSE_RESET)
    )
    assert not pb.core.out


@pytest.mark.parametrize("reason", [CLOSE_HALF_CLOSE_TIMEOUT, CLOSE_KEEPALIVE, "aborted", "closed by engine"])
def test_a_client_side_timeout_or_abort_resets_the_upstream(reason: str) -> None:
    """The endpoint's timers (half-close, keepalive, retransmissions) end the client side with their own
    reason; anything but a normal close resets the server too, even with bytes still buffered."""
    pb = open_relay()
    assert (
        pb
        >> E.client_fin()
        << ShutdownUpstream()
        >> E.client_closed(reason)
        << CloseUpstream(True)
        << Finished(reason)
        >> E.upstream_eof()
        >> E.upstream_writable()
    )


def test_the_upstream_failing_while_draining_just_closes() -> None:
    pb = open_relay()
    assert (
        pb
        >> E.client_data(b"tail")
        << SendUpstream(b"tail")
        >> E.upstream_sent(0)
        << watch(True, True)
        << ConsumeClient(4)
        >> E.client_closed(CLOSE_NORMAL)
        << watch(False, True)
        << Finished(CLOSE_NORMAL)
        >> E.upstream_writable()
        << SendUpstream(b"tail")
        >> E.upstream_error(ConnectionResetError(104, "reset"))
        << CloseUpstream(False)  # the client is gone already: nobody to reset
    )
    assert pb.core.phase is Phase.DONE


def test_events_after_the_end_are_ignored() -> None:
    pb = open_relay()
    assert pb >> E.client_closed(CLOSE_NORMAL) << CloseUpstream(False) << Finished(CLOSE_NORMAL)
    for event in (E.client_data(b"x"), E.client_fin(), E.client_reset(), E.client_space(), E.client_closed("x"),
                  E.upstream_data(b"y", False), E.upstream_eof(), E.upstream_writable(), E.upstream_sent(1),
                  E.client_took(1), E.upstream_error(OSError()), E.timer(1e9), E.connected()):
        assert pb >> event


def test_commands_compare_by_value() -> None:
    assert SendUpstream(bytearray(b"ab")) == SendUpstream(memoryview(b"ab")) == SendUpstream(b"ab")
    assert SendClient(b"a", True) != SendClient(b"a", False)
    assert watch(True, False) != watch(False, True) and CloseUpstream(True) != CloseUpstream(False)
    assert repr(ConsumeClient(3)) == "ConsumeClient(3)" and repr(FinishClient()) == "FinishClient()"


# --- the first bytes' gate (dnsgate_first_bytes) ------------------------------------------------------------


def test_held_first_bytes_send_nothing_upstream_until_released() -> None:
    pb = open_relay()
    assert pb >> E.hold()
    assert pb.core.up is Up.HELD
    assert pb >> E.client_data(b"\x16\x03\x01")  # the driver keeps held bytes: the core ignores them
    assert pb >> E.client_fin()
    assert pb.core.bytes_up == 0 and not pb.core.out
    assert pb >> E.release()
    assert pb.core.up is Up.OPEN
    assert pb >> E.client_data(b"hello") << SendUpstream(b"hello") >> E.upstream_sent(5) << ConsumeClient(5)


def test_a_refused_flow_resets_both_sides() -> None:
    pb = open_relay()
    assert pb >> E.hold() >> E.refuse() << CloseUpstream(True) << ResetClient()
    assert pb.core.phase is Phase.CLIENT_ONLY and pb.core.up is Up.SHUT
    assert pb >> E.client_closed(CLOSE_RESET) << Finished(CLOSE_RESET)
    assert pb.core.phase is Phase.DONE


def test_hold_only_before_the_first_byte_and_refuse_only_while_held() -> None:
    pb = open_relay()
    assert pb >> E.refuse()  # not held: nothing
    assert pb >> E.client_data(b"x") << SendUpstream(b"x") >> E.upstream_sent(1) << ConsumeClient(1)
    assert pb >> E.hold()
    assert pb.core.up is Up.OPEN  # bytes went up already: too late to hold


def test_the_server_may_still_talk_while_the_client_is_held() -> None:
    pb = open_relay()
    assert pb >> E.hold() >> E.upstream_data(b"banner", False) << SendClient(b"banner", True) >> E.client_took(6)
    assert pb >> E.upstream_error(ConnectionResetError()) << CloseUpstream(False) << ResetClient()
    assert pb >> E.release()
    assert pb.core.up is Up.SHUT
