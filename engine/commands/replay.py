"""``dnsgate replay --profile P capture.pcap``: what would the profile decide for each flow?

Packets from the device's addresses go through the real pipeline with the capture's timestamps as the
clock, in dry-run mode (nothing is forwarded: a capture must never make the engine dial anything). DNS
answers travelling *to* the device in the capture are fed to ``dnsgate_dns_answer`` as if our own
upstream had given them, so the DNS-first policy can be evaluated offline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from engine.events import DnsAnswer
from engine.io.memory import MemoryDevice
from engine.io.pcap import CaptureError, PcapPacketReader, PcapRecorder
from engine.packet import PROTO_UDP, PacketError, parse
from engine.profile import ProfileError, load_profile
from engine.runtime import Engine


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("replay", help="replay a pcap through a profile and print the verdict per flow")
    parser.add_argument("capture", help="pcap/pcapng file (raw IP, Ethernet or Linux cooked)")
    parser.add_argument("--profile", default="firewall", help="built-in name or path (default: firewall)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument("--write", metavar="PCAP", help="record the packets the engine would send back (RSTs, ICMP)")
    parser.set_defaults(func=run)


class ReplayClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def dns_answer_from(payload: bytes, client: bytes, upstream: str) -> DnsAnswer | None:
    """Read a DNS response from a capture into the event the tracker consumes (None if not one)."""
    import dns.message
    import dns.rdatatype

    try:
        message = dns.message.from_wire(payload)
    except Exception:
        return None
    if not message.flags & 0x8000 or not message.question:
        return None
    question = message.question[0]
    cnames: list[str] = []
    addresses: list[tuple[bytes, int]] = []
    for rrset in message.answer:
        for rdata in rrset:
            if rrset.rdtype == dns.rdatatype.CNAME:
                cnames.append(str(rdata.target).rstrip(".").lower())
            elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                import ipaddress

                addresses.append((ipaddress.ip_address(rdata.address).packed, rrset.ttl))
    return DnsAnswer(
        qname=str(question.name).rstrip(".").lower(), qtype=int(question.rdtype), rcode=message.rcode(),
        cnames=tuple(cnames), addresses=tuple(addresses), client=client, upstream=upstream,
    )


def replay(profile_name: str, capture: str, write: str | None = None) -> list[dict[str, Any]]:
    profile = load_profile(profile_name)
    loop = asyncio.new_event_loop()
    clock = ReplayClock()
    device = MemoryDevice(mtu=profile.engine.mtu)
    engine = Engine(profile, device, loop=loop, clock=clock)
    engine.pipeline.dry_run = True
    guard = engine.pipeline.guard
    recorder = PcapRecorder(write) if write else None
    seen = 0
    try:
        with PcapPacketReader(capture) as reader:
            for timestamp, data in reader:
                clock.now = timestamp
                try:
                    packet = parse(data)
                except PacketError:
                    engine.stats.incr("malformed")
                    continue
                if packet.proto == PROTO_UDP and packet.sport == 53 and guard.allows(packet.dst):
                    # An answer travelling to the device (checked first: the resolver may sit inside
                    # the device's subnet, like the TUN gateway 10.0.0.1).
                    answer = dns_answer_from(bytes(packet.payload), packet.dst, str(packet.src_ip))
                    if answer is not None:
                        engine.hooks.call("dnsgate_dns_answer", answer, timestamp)
                elif guard.allows(packet.src):
                    device.inject(data)
                if recorder is not None:
                    for out in device.written[seen:]:
                        recorder.record(out, timestamp)
                seen = len(device.written)
        rows = []
        for flow in engine.flows:
            row = flow.as_dict(clock.now)
            row["verdict"] = flow.decision.verdict.value if flow.decision else "?"
            row["plugin"] = flow.decision.plugin if flow.decision else ""
            row["reason"] = (flow.decision.reason + (" " + flow.decision.detail if flow.decision.detail else "")) if flow.decision else ""
            rows.append(row)
        return rows
    finally:
        if recorder is not None:
            recorder.close()
        loop.close()


def run(args: argparse.Namespace) -> int:
    try:
        rows = replay(args.profile, args.capture, args.write)
    except ProfileError as error:
        print(f"dnsgate: invalid profile: {error}", file=sys.stderr)
        return 2
    except (CaptureError, OSError) as error:
        print(f"dnsgate: cannot read capture {args.capture}: {error}", file=sys.stderr)
        return 2
    if args.json:
        for row in rows:
            print(json.dumps({k: row[k] for k in ("flow", "verdict", "plugin", "reason", "labels", "packets_up", "bytes_up")}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"replay of {args.capture} through {args.profile}")
    for column in ("flow", "verdict", "by", "reason", "labels", "packets", "bytes"):
        table.add_column(column, overflow="fold")
    colors = {"accept": "green", "drop": "yellow", "reject": "red"}
    for row in rows:
        verdict = row["verdict"]
        table.add_row(row["flow"], f"[{colors.get(verdict, 'white')}]{verdict}[/]", row["plugin"], row["reason"],
                      ",".join(row["labels"]), str(row["packets_up"]), str(row["bytes_up"]))
    Console().print(table)
    return 0
