"""The live dashboard (rich): renders engine snapshots, never touches the engine itself.

It works on plain snapshot dicts so the same code serves ``dnsgate run --dashboard`` (snapshots taken in the
engine's loop, rendered in a worker thread, so the packet path never waits for the terminal), ``dnsgate top``
(snapshots fetched over the control socket) and ``dnsgate demo`` (one final summary). Rates (packets/s,
bytes/s, DNS queries/s) are derived here from two consecutive snapshots, so the engine only keeps cumulative
counters.

Snapshot schema (what :meth:`engine.runtime.Engine.snapshot` returns, plus what ``dnsgate run`` adds); every
key is optional, a missing one shows as ``-``::

    profile: str                      mode: "firewall" | "dns-only"
    uptime: float (s)                 now: float (engine monotonic clock, used for rates)
    mtu: int                          offload: bool
    stats: {packets_up, bytes_up,   # device -> world
            packets_down, bytes_down,     # world -> device
            counters: {name: int}}    # e.g. malformed, rst_sent, icmp_unreachable_sent
    flows: {total: int, open: {"tcp": int, "udp": int, "icmp": int}}
    top_flows: [{flow: "10.0.0.2:5000 -> 1.2.3.4:443/tcp", proto, dst, dport, bytes_down, bytes_up, age,
                 name: "example.com" (added by run from the tracker), decision}]   # DNS client flows excluded
    dns_flows: {open: int, by_proto: {"udp": int, "tcp": int}, top: [same entries as top_flows]}
    plugins: {
      dns_filter:  {queries: int (cumulative), servfail: int, blocked: int, pending: int,
                    latency: {p50_ms: float | None, p99_ms: float | None}},
      ip_tracker:  {size: int, expiring_soon: int},
      tcp_forward: {active: int, dialing: int, ...},  udp_forward: {sessions: int, ...}}
    live_rules: [{kind: "allow" | "deny", rule: "new.test:443/tcp", age: float, expires_in: float | None}]
    blocks: {total: int, by_reason: {reason: int}, by_plugin: {plugin: int},
             recent: [{at: wall-clock float, text: "BLOCKED hardcoded IP 10.0.0.2:54322 -> 1.2.3.4:443 (...)"}]}
    routes: {mode, table, fwmark, state_file}

The screen fits the terminal: an 80x24 terminal shows every panel (the block feed and the connection table
get the rows left over, at least two each; a narrow table names connections by destination only, since the
source is the device), and a wide one (200 columns) shows full connection text and longer sparklines. Long
text is cropped with an ellipsis rather than wrapped.
"""

from __future__ import annotations

import collections
import io
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 40
FEED_LINES = 8
TOP_FLOWS = 8
#: Connection rows a tall terminal may show (the snapshot carries the 20 busiest).
MAX_TOP_FLOWS = 20
#: Below this many columns the connection table shows the destination only (``203.0.113.10:443/tcp``).
NARROW = 100
#: From this many columns on the summary panels sit three per row and the block feed beside the blocks.
WIDE = 160


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """Unicode block sparkline of the last ``width`` values, scaled to their maximum (0 -> lowest bar)."""
    tail = list(values)[-width:]
    if not tail:
        return ""
    peak = max(tail)
    if peak <= 0:
        return SPARK[0] * len(tail)
    return "".join(SPARK[min(len(SPARK) - 1, int(value / peak * (len(SPARK) - 1) + 0.5))] for value in tail)


def human_bytes(value: float | None, suffix: str = "B") -> str:
    if value is None:
        return "-"
    for unit in ("", "K", "M", "G", "T"):
        if abs(value) < 1000 or unit == "T":
            return f"{value:.0f} {unit}{suffix}" if unit == "" else f"{value:.1f} {unit}{suffix}"
        value /= 1000
    return f"{value:.1f} T{suffix}"  # pragma: no cover - loop always returns


def human_count(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    return f"{value:.0f}" if value == int(value) or value >= 100 else f"{value:.1f}"


def human_latency(milliseconds: float | None) -> str:
    """``0.042`` -> ``"42 µs"``, ``1.25`` -> ``"1.2 ms"``, ``1500`` -> ``"1.50 s"``.

    A latency of exactly 0 cannot be measured (the engine clock is CLOCK_MONOTONIC, so only an engine
    driven by a coarse test clock reports it); it reads ``"<1 ms"`` rather than pretend to be instant.
    """
    if milliseconds is None:
        return "-"
    if milliseconds <= 0:
        return "<1 ms"
    if milliseconds < 1:
        return f"{milliseconds * 1000:.0f} µs"
    if milliseconds < 1000:
        return f"{milliseconds:.1f} ms"
    return f"{milliseconds / 1000:.2f} s"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def live_rules_text(rules: Sequence[Any]) -> str:
    """``allow =new.test (1m 30s), deny evil.test``: ``ctl allow``/``ctl deny`` rules, soonest expiry first."""
    parts = []
    for rule in rules:
        if isinstance(rule, Mapping):
            left = _number(rule.get("expires_in"))
            until = f" ({human_duration(left)})" if left is not None else ""
            parts.append(f"{rule.get('kind')} {rule.get('rule')}{until}")
    return ", ".join(parts)


def _get(mapping: Any, *path: str) -> Any:
    """``_get(snap, "plugins", "dns_filter", "queries")`` -> value or None, never KeyError/TypeError."""
    for key in path:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _grid(ratios: Sequence[int], *rows: Sequence[RenderableType]) -> Table:
    """Panels side by side, each column taking its ``ratio`` of the width."""
    grid = Table.grid(expand=True, padding=(0, 1))
    for ratio in ratios:
        grid.add_column(ratio=ratio)
    for row in rows:
        grid.add_row(*row)
    return grid


class Dashboard:
    """Keeps the last snapshot and a short history of rates; :meth:`render` draws the whole screen."""

    def __init__(self, history: int = HISTORY) -> None:
        self.snapshot: Mapping[str, Any] = {}
        self._previous: Mapping[str, Any] | None = None
        self.rates: dict[str, float | None] = {}
        self.history: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=history)
        )

    # -- data --------------------------------------------------------------------------------------

    RATE_SOURCES: dict[str, tuple[str, ...]] = {
        "packets_up": ("stats", "packets_up"),
        "bytes_up": ("stats", "bytes_up"),
        "packets_down": ("stats", "packets_down"),
        "bytes_down": ("stats", "bytes_down"),
        "dns_queries": ("plugins", "dns_filter", "queries"),
    }

    def update(self, snapshot: Mapping[str, Any]) -> None:
        """Take a new snapshot; rates are per second of the engine's clock between the last two."""
        previous = self.snapshot if self.snapshot else None
        self._previous = previous
        self.snapshot = snapshot
        elapsed = None
        if previous is not None:
            now, before = _number(snapshot.get("now")), _number(previous.get("now"))
            if now is not None and before is not None and now > before:
                elapsed = now - before
        for name, path in self.RATE_SOURCES.items():
            current = _number(_get(snapshot, *path))
            earlier = _number(_get(previous, *path)) if previous is not None else None
            if elapsed is None or current is None or earlier is None:
                self.rates[name] = None
                continue
            rate = max(0.0, (current - earlier) / elapsed)
            self.rates[name] = rate
            self.history[name].append(rate)

    # -- rendering ---------------------------------------------------------------------------------

    def render(self, width: int | None = None, height: int | None = None) -> RenderableType:
        """The whole screen for a ``width`` x ``height`` terminal (unknown: the default sizes).

        The summary panels come first, two per row (three, and the block feed beside the blocks, from
        :data:`WIDE` columns on); the block feed and the connection table share the rows that are left,
        so nothing falls off the bottom of a small terminal.
        """
        wide = width is not None and width >= WIDE
        columns = 3 if wide else 2
        spark = 16 if width is None else max(8, min(HISTORY, width // columns - 36))
        traffic, traffic_rows = self._traffic_panel(spark)
        engine, engine_rows = self._engine_panel()
        dns, dns_rows = self._dns_panel(spark, detail=width is None or width // columns >= 60)
        blocks, block_rows = self._blocks_panel(max_rows=max(dns_rows, 4))
        feed_lines, flow_rows = FEED_LINES, TOP_FLOWS
        if height is not None:
            if wide:
                used = 1 + 2 + max(traffic_rows, engine_rows, dns_rows)
                spare = height - used - 2 - 3  # blocks/feed row borders, table borders and header
                feed_lines = max(block_rows, min(FEED_LINES, spare // 2))
            else:
                used = 1 + (2 + max(traffic_rows, engine_rows)) + (2 + max(block_rows, dns_rows))
                spare = height - used - 2 - 3  # feed borders, table borders and header
                feed_lines = max(2, min(FEED_LINES, spare // 2))
            flow_rows = max(2, min(MAX_TOP_FLOWS, spare - feed_lines))
        feed = self._feed_panel(feed_lines)
        flows = self._top_flows_panel(flow_rows, narrow=width is not None and width < NARROW)
        if wide:
            summary = _grid((1, 1, 1), [traffic, engine, dns])
            return Group(self._header(self.snapshot), summary, _grid((1, 2), [blocks, feed]), flows)
        summary = _grid((1, 1), [traffic, engine], [blocks, dns])
        return Group(self._header(self.snapshot), summary, feed, flows)

    def _header(self, snap: Mapping[str, Any]) -> Text:
        mode = str(snap.get("mode") or "-")
        style = "bold white on red" if mode == "firewall" else "bold black on yellow"
        text = Text()
        text.append(" dnsgate ", style="bold white on blue")
        text.append(f" {mode.upper()} ", style=style)
        text.append(f"  profile {snap.get('profile') or '-'}")
        text.append(f"  up {human_duration(_number(snap.get('uptime')))}")
        if snap.get("mtu"):
            text.append(f"  mtu {snap.get('mtu')}")
        if "offload" in snap:
            text.append(f"  offload {'on' if snap.get('offload') else 'off'}")
        text.no_wrap = True
        text.overflow = "ellipsis"
        return text

    def _traffic_panel(self, spark: int) -> tuple[Panel, int]:
        table = Table.grid(padding=(0, 1))
        table.add_column("dir", no_wrap=True)
        table.add_column("pkt/s", justify="right", no_wrap=True)
        table.add_column("bytes/s", justify="right", no_wrap=True)
        table.add_column("spark", no_wrap=True, overflow="crop")
        for label, packets, octets in (("up  ", "packets_up", "bytes_up"), ("down", "packets_down", "bytes_down")):
            table.add_row(
                Text(label, style="bold"),
                f"{human_count(self.rates.get(packets))} pkt/s",
                human_bytes(self.rates.get(octets), "B/s"),
                Text(sparkline(self.history[octets], spark), style="cyan"),
            )
        totals = Text(
            f"total up {human_bytes(_number(_get(self.snapshot, 'stats', 'bytes_up')))}"
            f" / down {human_bytes(_number(_get(self.snapshot, 'stats', 'bytes_down')))}",
            style="dim", no_wrap=True, overflow="ellipsis",
        )
        panel = Panel(Group(table, totals), title="traffic (up = device -> world)", title_align="left")
        return panel, table.row_count + 1

    def _engine_panel(self) -> tuple[Panel, int]:
        snap = self.snapshot
        table = Table.grid(padding=(0, 1))
        table.add_column(no_wrap=True, min_width=9)
        table.add_column(no_wrap=True, overflow="ellipsis")
        open_flows = _get(snap, "flows", "open") or {}
        parts = [f"{proto} {count}" for proto, count in sorted(open_flows.items())] if isinstance(open_flows, Mapping) else []
        table.add_row("flows", f"{_get(snap, 'flows', 'total') or 0} ({', '.join(parts) or 'none open'})")
        relays = _number(_get(snap, "plugins", "tcp_forward", "active"))
        sessions = _number(_get(snap, "plugins", "udp_forward", "sessions"))
        if relays is not None or sessions is not None:
            table.add_row("relays", f"{human_count(relays)} TCP, {human_count(sessions)} UDP sessions")
        tracker = _get(snap, "plugins", "ip_tracker") or {}
        size = _number(_get(tracker, "size"))
        if size is None:
            size = _number(_get(tracker, "entries"))
        soon = _number(_get(tracker, "expiring_soon"))
        table.add_row("tracker", f"{human_count(size)} IPs, {human_count(soon)} expiring soon")
        counters = _get(snap, "stats", "counters") or {}
        malformed = sum(v for k, v in counters.items() if "malformed" in k and isinstance(v, int)) if isinstance(counters, Mapping) else 0
        rst = counters.get("rst_sent", 0) if isinstance(counters, Mapping) else 0
        unreach = counters.get("icmp_unreachable_sent", 0) if isinstance(counters, Mapping) else 0
        table.add_row("rejects", f"{rst} RST, {unreach} ICMP unreachable")
        table.add_row("malformed", str(malformed))
        return Panel(table, title="engine", title_align="left"), table.row_count

    def _dns_panel(self, spark: int, detail: bool = True) -> tuple[Panel, int]:
        dns = _get(self.snapshot, "plugins", "dns_filter") or {}
        table = Table.grid(padding=(0, 1))
        table.add_column(no_wrap=True, min_width=9)
        table.add_column(no_wrap=True, overflow="ellipsis")
        qps = self.rates.get("dns_queries")
        table.add_row("queries/s", f"{human_count(qps)}  {sparkline(self.history['dns_queries'], spark)}")
        p50 = _number(_get(dns, "latency", "p50_ms"))
        p99 = _number(_get(dns, "latency", "p99_ms"))
        latency = f"p50 {human_latency(p50)}, p99 {human_latency(p99)}" if p50 is not None and p99 is not None else "-"
        table.add_row("upstream", latency)
        table.add_row("total", f"{human_count(_number(_get(dns, 'queries')))} queries, "
                               f"{human_count(_number(_get(dns, 'blocked')))} blocked")
        pending = _number(_get(dns, "pending"))
        errors = f"{human_count(_number(_get(dns, 'servfail')))} SERVFAIL"
        table.add_row("errors", errors if pending is None else f"{errors}, {human_count(pending)} pending")
        clients = _get(self.snapshot, "dns_flows")
        if isinstance(clients, Mapping):
            table.add_row("clients", self._dns_clients(clients, detail))
        live = self.snapshot.get("live_rules")
        if isinstance(live, list) and live:
            table.add_row("live", live_rules_text(live))
        return Panel(table, title="dns", title_align="left"), table.row_count

    @staticmethod
    def _dns_clients(clients: Mapping[str, Any], detail: bool) -> str:
        """``3 flows (udp 2, tcp 1), busiest 10.0.0.2:41234``: DNS client flows, kept out of the
        connection table so they do not crowd it (the busiest one only when there is room: ``detail``)."""
        by_proto = clients.get("by_proto") or {}
        parts = ", ".join(f"{proto} {count}" for proto, count in sorted(by_proto.items(), key=lambda item: -item[1])) \
            if isinstance(by_proto, Mapping) else ""
        text = f"{human_count(_number(clients.get('open')) or 0)} flows" + (f" ({parts})" if parts else "")
        busiest = clients.get("top") or []
        if detail and busiest and isinstance(busiest[0], Mapping):
            first = busiest[0]
            text += f", busiest {str(_get(first, 'flow') or '?').split(' -> ')[0]}"
        return text

    def _blocks_panel(self, max_rows: int) -> tuple[Panel, int]:
        """Reasons first, then one line of plugins: at most ``max_rows`` rows, so the panel is never taller
        than the DNS panel beside it."""
        blocks = _get(self.snapshot, "blocks") or {}
        table = Table.grid(padding=(0, 1), expand=True)
        table.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
        table.add_column(justify="right", no_wrap=True)
        by_reason = _get(blocks, "by_reason") or {}
        by_plugin = _get(blocks, "by_plugin") or {}
        if not by_reason and not by_plugin:
            table.add_row(Text("no blocks", style="dim"), "")
        reasons = sorted(by_reason.items(), key=lambda item: -item[1])
        for reason, count in reasons[: max_rows - (1 if by_plugin else 0)]:
            table.add_row(str(reason), str(count))
        if by_plugin:
            plugins = ", ".join(f"{plugin} {count}" for plugin, count in sorted(by_plugin.items(), key=lambda item: -item[1]))
            table.add_row(Text(f"by plugin: {plugins}", style="dim", no_wrap=True, overflow="ellipsis"), "")
        total = _get(blocks, "total")
        panel = Panel(table, title=f"blocks ({total if total is not None else 0})", title_align="left")
        return panel, table.row_count

    def _feed_panel(self, lines_shown: int = FEED_LINES) -> Panel:
        recent = _get(self.snapshot, "blocks", "recent") or []
        lines = []
        for entry in list(recent)[-lines_shown:]:
            at = _number(_get(entry, "at"))
            stamp = time.strftime("%H:%M:%S", time.localtime(at)) if at else "--:--:--"
            line = Text(no_wrap=True, overflow="ellipsis")
            line.append(stamp + " ", style="dim")
            program = _get(entry, "program")
            if program:  # attribution on: who, before what (the line is cut at the right edge)
                line.append(f"{program} ", style="bold")
            line.append(str(_get(entry, "text") or entry), style="red")
            lines.append(line)
        if not lines:
            lines.append(Text("no blocked connections yet", style="dim"))
        return Panel(Group(*lines), title="recent blocks", title_align="left")

    def _top_flows_panel(self, rows: int = TOP_FLOWS, narrow: bool = False) -> Panel:
        table = Table(expand=True, box=None, padding=(0, 1), header_style="bold")
        # The name takes what the numbers leave, so at any width they sit next to the connection they count.
        table.add_column("destination" if narrow else "connection", no_wrap=True, overflow="ellipsis",
                         max_width=48)
        table.add_column("up", justify="right", no_wrap=True, min_width=8)
        table.add_column("down", justify="right", no_wrap=True, min_width=8)
        table.add_column("age", justify="right", no_wrap=True, min_width=5)
        table.add_column("name", no_wrap=True, overflow="ellipsis", ratio=1)
        flows = _get(self.snapshot, "top_flows") or []
        # The program column exists only when attribution is on (flows carry an owner: engine/owner.py).
        attributed = any(_get(flow, "program") for flow in flows)
        if attributed:
            table.add_column("program", no_wrap=True, overflow="ellipsis", max_width=12 if narrow else 24)
        for flow in list(flows)[:rows]:
            text = str(_get(flow, "flow") or "?")
            cells = [
                text.split(" -> ", 1)[-1] if narrow else text,
                human_bytes(_number(_get(flow, "bytes_up"))),
                human_bytes(_number(_get(flow, "bytes_down"))),
                human_duration(_number(_get(flow, "age"))),
                str(_get(flow, "name") or "-"),
            ]
            if attributed:
                cells.append(_program_cell(_get(flow, "program"), narrow))
            table.add_row(*cells)
        if not flows:
            table.add_row(Text("no open connections", style="dim"), "", "", "", "")
        return Panel(table, title="top connections by bytes", title_align="left")


def _program_cell(program: Any, narrow: bool) -> str:
    """``curl[4242]`` (``curl`` when narrow), ``uid 1000`` while the process is not known, ``-`` for none."""
    if not isinstance(program, Mapping):
        return "-"
    name, pid, uid = program.get("program"), program.get("pid"), program.get("uid")
    if name and pid is not None:
        return str(name) if narrow else f"{name}[{pid}]"
    return f"uid {uid}" if uid is not None else "?"


def render_text(snapshots: Sequence[Mapping[str, Any]], width: int = 100, height: int | None = None) -> str:
    """Render the dashboard after feeding ``snapshots`` and return it as plain text (demo summary, tests);
    ``height`` fits it to a terminal of that many rows, as the live screen does."""
    dashboard = Dashboard()
    for snapshot in snapshots:
        dashboard.update(snapshot)
    console = Console(record=True, width=width, force_terminal=False, color_system=None, file=io.StringIO())
    console.print(dashboard.render(width, height))
    return console.export_text()


def run_live(
    fetch: Callable[[], Mapping[str, Any]],
    *,
    interval: float = 1.0,
    console: Console | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    screen: bool = False,
) -> None:
    """Fetch a snapshot every ``interval`` seconds and redraw until ``should_stop()`` or Ctrl-C.

    Blocking by design: ``top`` runs it in the main thread, ``run --dashboard`` in a worker thread whose
    ``fetch`` hands over a snapshot taken by the engine's loop. Each frame is fitted to the terminal's size
    at that moment, so resizing the window re-lays the screen out.
    """
    from rich.live import Live

    dashboard = Dashboard()
    dashboard.update(fetch())
    console = console or Console()
    with Live(dashboard.render(*console.size), console=console, auto_refresh=False, screen=screen,
              redirect_stderr=False, redirect_stdout=False) as live:
        try:
            while not should_stop():
                deadline = time.monotonic() + interval
                while time.monotonic() < deadline and not should_stop():
                    time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                if should_stop():
                    break
                dashboard.update(fetch())
                live.update(dashboard.render(*console.size), refresh=True)
        except KeyboardInterrupt:
            pass
