"""The dashboard renders from snapshot dicts: rates from consecutive snapshots, 100 columns stay readable."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from engine.dashboard import Dashboard, human_bytes, human_duration, human_latency, render_text, sparkline


def make_snapshot(now: float, packets: int, octets: int, queries: int, **extra: Any) -> dict[str, Any]:
    snapshot: dict[str, Any] = {
        "profile": "firewall",
        "mode": "firewall",
        "uptime": now - 100.0,
        "now": now,
        "mtu": 1500,
        "offload": True,
        "stats": {"packets_up": packets, "bytes_up": octets, "packets_down": packets * 2, "bytes_down": octets * 3,
                  "counters": {"rst_sent": 4, "icmp_unreachable_sent": 1, "malformed": 2}},
        "flows": {"total": 3, "open": {"tcp": 2, "udp": 1}},
        "top_flows": [
            {"flow": "10.0.0.2:40000 -> 203.0.113.10:443/tcp", "bytes_up": 1_500_000, "bytes_down": 52_000_000,
             "age": 75.0, "name": "www.example.com"},
            {"flow": "10.0.0.2:40001 -> 198.51.100.7:80/tcp", "bytes_up": 800, "bytes_down": 12_000, "age": 3.0},
        ],
        "plugins": {
            "dns_filter": {"queries": queries, "servfail": 3, "blocked": 1, "pending": 0,
                           "latency": {"p50_ms": 1.25, "p99_ms": 48.0, "samples": 10}},
            "tcp_forward": {"active": 2}, "udp_forward": {"sessions": 1},
            "ip_tracker": {"size": 42, "expiring_soon": 5},
        },
        "blocks": {
            "total": 7,
            "by_reason": {"hardcoded IP": 5, "QUIC": 2},
            "by_plugin": {"ip_tracker": 5, "quic_block": 2},
            "recent": [{"at": 1_700_000_000.0,
                        "text": "BLOCKED hardcoded IP 10.0.0.2:54322 -> 1.2.3.4:443 (was example.com, expired 12 s ago)"}],
        },
    }
    snapshot.update(extra)
    return snapshot


def test_rates_come_from_two_snapshots() -> None:
    dashboard = Dashboard()
    dashboard.update(make_snapshot(200.0, 1000, 100_000, 10))
    assert dashboard.rates["bytes_up"] is None  # one snapshot: no rate yet
    dashboard.update(make_snapshot(202.0, 3000, 300_000, 30))
    assert dashboard.rates["packets_up"] == 1000.0
    assert dashboard.rates["bytes_up"] == 100_000.0
    assert dashboard.rates["bytes_down"] == 300_000.0
    assert dashboard.rates["dns_queries"] == 10.0
    assert list(dashboard.history["bytes_up"]) == [100_000.0]


def test_counter_reset_never_shows_negative_rate() -> None:
    dashboard = Dashboard()
    dashboard.update(make_snapshot(200.0, 5000, 500_000, 50))
    dashboard.update(make_snapshot(201.0, 10, 1000, 1))  # engine restarted under `top`
    assert dashboard.rates["bytes_up"] == 0.0


def test_renders_every_section_at_100_columns() -> None:
    text = render_text([make_snapshot(200.0, 1000, 100_000, 10), make_snapshot(201.0, 2000, 1_100_000, 25)])
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert "FIREWALL" in lines[0] and "profile firewall" in lines[0] and "up 1m41s" in lines[0]
    assert "1000 pkt/s 1.0 MB/s" in text  # device -> world per second
    assert "tcp 2" in text and "udp 1" in text
    assert "42 IPs" in text and "5 expiring soon" in text
    assert "p50 1.2 ms" in text or "p50 1.3 ms" in text
    assert "p99 48.0 ms" in text and "25 queries, 1 blocked" in text and "3 SERVFAIL, 0 pending" in text
    assert "2 TCP, 1 UDP sessions" in text and "queries/s 15 " in text
    assert "hardcoded IP" in text and "quic_block" in text
    assert "BLOCKED hardcoded IP 10.0.0.2:54322 -> 1.2.3.4:443" in text
    assert "www.example.com" in text and "52.0 MB" in text


def test_long_feed_lines_are_cropped_not_wrapped() -> None:
    long_text = "BLOCKED hardcoded IP 10.0.0.2:54322 -> 1.2.3.4:443 (" + "x" * 200 + ")"
    snap = make_snapshot(200.0, 1, 1, 1, blocks={"total": 1, "recent": [{"at": 0, "text": long_text}]})
    text = render_text([snap])
    feed = [line for line in text.splitlines() if "BLOCKED" in line]
    assert len(feed) == 1 and feed[0].rstrip().endswith("… │")


def test_empty_and_partial_snapshots_render() -> None:
    for snap in ({}, {"mode": "dns-only"}, {"plugins": {"dns_filter": "garbage"}, "flows": None, "top_flows": []}):
        text = render_text([snap])
        assert "dnsgate" in text
        assert "no blocked connections yet" in text
        assert "no open connections" in text


def test_recording_console_with_colour() -> None:
    dashboard = Dashboard()
    dashboard.update(make_snapshot(1.0, 1, 1, 1, mode="dns-only"))
    console = Console(record=True, width=100, force_terminal=True, color_system="truecolor", file=io.StringIO())
    console.print(dashboard.render())
    assert "DNS-ONLY" in console.export_text(clear=False)
    assert "\x1b[" in console.export_text(styles=True)


def test_formatting_helpers() -> None:
    assert sparkline([0, 0]) == "▁▁"
    assert sparkline([1, 2, 4, 8]) == "▂▃▅█"
    assert sparkline([]) == ""
    assert human_bytes(999) == "999 B"
    assert human_bytes(1_500_000, "B/s") == "1.5 MB/s"
    assert human_duration(3725) == "1h02m"
    assert human_duration(None) == "-"


def busy_snapshot(now: float, count: int) -> dict[str, Any]:
    """A snapshot with more blocks, feed lines and connections than a small terminal can show."""
    blocks = {
        "total": 30,
        "by_reason": {"hardcoded IP": 20, "QUIC": 6, "TUN subnet not forwarded": 3, "gateway port not served": 1},
        "by_plugin": {"ip_tracker": 20, "quic_block": 6, "engine": 4},
        "recent": [{"at": 1_700_000_000.0 + i, "text": f"BLOCKED hardcoded IP 10.0.0.2:{54320 + i} -> 1.2.3.{i}:443 "
                    "(was example.com, expired 12 s ago)"} for i in range(12)],
    }
    flows = [{"flow": f"10.0.0.2:{40000 + i} -> 203.0.113.{100 + i}:443/tcp", "bytes_up": 1000 * (20 - i),
              "bytes_down": 52_000 * (20 - i), "age": 75.0, "name": f"www{i}.example.com"} for i in range(20)]
    dns_flows = {"open": 7, "by_proto": {"udp": 6, "tcp": 1},
                 "top": [{"flow": "10.0.0.2:53211 -> 10.0.0.1:53/udp", "bytes_down": 900, "bytes_up": 300}]}
    snapshot = make_snapshot(now, count * 1000, count * 100_000, count * 10, blocks=blocks, top_flows=flows,
                             dns_flows=dns_flows)
    snapshot["plugins"]["dns_filter"]["latency"] = {"p50_ms": 0.183, "p99_ms": 2.4, "samples": 50}
    return snapshot


def test_latency_below_a_millisecond_reads_in_microseconds() -> None:
    assert human_latency(0.183) == "183 µs"
    assert human_latency(0.0415) == "42 µs"
    assert human_latency(0.0) == "<1 ms"  # unmeasurable (only a coarse test clock gives 0)
    assert human_latency(1.25) == "1.2 ms" and human_latency(48.0) == "48.0 ms"
    assert human_latency(2500.0) == "2.50 s" and human_latency(None) == "-"
    text = render_text([busy_snapshot(200.0, 1), busy_snapshot(201.0, 2)])
    assert "p50 183 µs, p99 2.4 ms" in text and "0.2 ms" not in text


def test_80x24_shows_every_panel_without_overflow() -> None:
    text = render_text([busy_snapshot(200.0, 1), busy_snapshot(201.0, 2)], width=80, height=24)
    lines = text.rstrip("\n").splitlines()
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80
    for title in ("traffic", "engine", "blocks (30)", "dns", "recent blocks", "top connections"):
        assert title in text, title
    # the connection table names destinations whole (the source is the device) and shows at least two
    assert "destination" in text and "203.0.113.100:443/tcp" in text and "203.0.113.101:443/tcp" in text
    assert sum("BLOCKED" in line for line in lines) >= 2
    assert "7 flows (udp 6, tcp 1)" in text  # DNS client flows in the DNS panel
    assert "10.0.0.1:53" not in text  # ...not in the connection table


def test_200_columns_use_the_width() -> None:
    text = render_text([busy_snapshot(200.0, 1), busy_snapshot(201.0, 2)], width=200, height=50)
    lines = text.rstrip("\n").splitlines()
    assert len(lines) <= 50 and max(len(line) for line in lines) <= 200
    titles = lines[1]
    assert "traffic" in titles and "engine" in titles and "dns" in titles  # three summary panels per row
    assert any("blocks (30)" in line and "recent blocks" in line for line in lines)  # feed beside the blocks
    assert "10.0.0.2:40000 -> 203.0.113.100:443/tcp" in text  # full connection text
    assert "by plugin: ip_tracker 20, quic_block 6, engine 4" in text
    assert "busiest 10.0.0.2:53211" in text
    assert sum("443/tcp" in line for line in lines) > 8  # a tall terminal shows more than the default 8 rows
    row = next(line for line in lines if "203.0.113.100:443/tcp" in line)
    assert row.index("20.0 KB") - row.index("/tcp") < 20  # the numbers sit next to their connection


def test_every_size_between_fits() -> None:
    snaps = [busy_snapshot(200.0, 1), busy_snapshot(201.0, 2)]
    for width, height in ((80, 24), (80, 30), (100, 30), (120, 40), (159, 40), (160, 40), (240, 60)):
        lines = render_text(snaps, width=width, height=height).rstrip("\n").splitlines()
        assert len(lines) <= height and max(len(line) for line in lines) <= width, (width, height, len(lines))


def attributed_snapshot(now: float, count: int) -> dict[str, Any]:
    """busy_snapshot with attribution on: flows and feed entries carry their program (engine/owner.py)."""
    snapshot = busy_snapshot(now, count)
    for i, flow in enumerate(snapshot["top_flows"]):
        flow["program"] = {"via": "socket", "program": "firefox-esr" if i % 2 else "curl", "pid": 4242 + i,
                           "uid": 1000, "exe": "/usr/bin/curl", "cgroup": "", "unit": ""}
    snapshot["top_flows"][-1]["program"] = {"via": "socket", "program": "", "pid": None, "uid": 1000}
    for entry in snapshot["blocks"]["recent"]:
        entry["program"] = "curl[4242]"
    return snapshot


def test_program_column_only_with_attribution() -> None:
    assert "program" not in render_text([busy_snapshot(200.0, 1), busy_snapshot(201.0, 2)], width=200, height=50)
    snaps = [attributed_snapshot(200.0, 1), attributed_snapshot(201.0, 2)]
    wide = render_text(snaps, width=200, height=50).rstrip("\n").splitlines()
    assert len(wide) <= 50 and max(len(line) for line in wide) <= 200
    row = next(line for line in wide if "203.0.113.100:443/tcp" in line)
    assert "curl[4242]" in row and "www0.example.com" in row
    assert any("firefox-esr[4243]" in line for line in wide) and any("uid 1000" in line for line in wide)
    assert any("curl[4242] BLOCKED hardcoded IP" in line for line in wide)  # the feed names the program first
    small = render_text(snaps, width=80, height=24).rstrip("\n").splitlines()
    assert len(small) <= 24 and max(len(line) for line in small) <= 80
    row = next(line for line in small if "203.0.113.100:443/tcp" in line)
    assert "curl" in row and "20.0 KB" in row  # narrow: the program's name without the pid, numbers kept
    assert any("curl[4242] BLOCKED" in line for line in small)
