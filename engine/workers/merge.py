"""One engine's control answers from the answers of N worker engines (docs/control.md, "With workers").

With ``[engine] workers = N`` every worker is a whole engine over one TUN queue, and a flow lives in
exactly one of them. The supervisor sends each control request to every live worker and hands their
answers here, so ``ctl``, ``top`` and scripts keep talking to what looks like one engine. Pure functions,
no I/O: :func:`answer` takes the request and a coroutine that asks the workers.

How each command merges, and why:

- ``stats``: every figure is merged by an explicit rule (:data:`SNAPSHOT`): numbers that add (packets,
  bytes, counters, open flows, each plugin's counters) are summed; settings every worker shares (profile,
  mode, mtu, live rules, a plugin's configuration) come from the first worker; figures that do not add are
  handled one by one (uptime and the clock: the largest; latency percentiles: recomputed from the parts
  the snapshots carry; the tracker's size: the largest, since answers are shared and every worker holds
  the same leases). Lists of the busiest flows are merged and cut to one engine's length, the block feed
  is merged by time. A key without a rule is taken from the first worker, never summed blindly: a new
  figure gets its rule when it is added (tests/unit/test_worker_merge.py checks a real snapshot has none
  missing). ``workers`` lists every worker: index, pid, whether it answered, uptime, flows, packets.
- ``flows``: concatenated, busiest first, cut to ``limit``; ``tracker``: the union of the leases;
  ``close``: the one worker that has the flow; ``reload``, ``mode``, ``allow``, ``deny``, ``forget``: ok
  only when every worker that answered applied it; ``rules``: the first worker's (rules are broadcast).
- any other command (a plugin's own): the first worker's ok answer.
"""

from __future__ import annotations

import heapq
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeGuard

import attrs

from engine.logs import RECENT_BLOCKS
from engine.top_flows import TOP_DNS_FLOWS, TOP_FLOWS

#: Entries in ip_tracker's snapshot inside ``stats`` (``IpTracker.snapshot``'s default ``limit``).
TRACKER_SNAPSHOT_ENTRIES = 200
#: Connections in tcp_forward's snapshot, and programs in the programs plugin's tables (their ``[:20]``
#: and ``most_common(20)``).
PLUGIN_TOP = 20
#: What a worker that did not answer in time (or is not running) reports.
NO_ANSWER = "did not answer"
#: Commands every worker applies: ok only when every worker that answered applied it.
BROADCAST = frozenset({"reload", "mode", "allow", "deny", "forget"})


class MergeError(Exception):
    """The workers' answers make an error answer (every worker refused, or some did and some did not)."""


@attrs.frozen
class WorkerAnswer:
    """One worker's answer to one request: ``ok`` with its ``result``, or not with its ``error``;
    ``answered`` is False for a worker that is dead or too slow (its ``error`` then says so)."""

    index: int
    pid: int | None
    ok: bool
    result: Any = None
    error: str | None = None
    answered: bool = True

    @classmethod
    def from_reply(cls, index: int, pid: int | None, reply: Mapping[str, Any]) -> WorkerAnswer:
        """From the worker's protocol answer object (``{"ok": ..., "result" | "error": ...}``)."""
        if reply.get("ok"):
            return cls(index, pid, True, result=reply.get("result"))
        return cls(index, pid, False, error=str(reply.get("error", "unknown error")))

    @classmethod
    def silent(cls, index: int, pid: int | None, why: str = NO_ANSWER) -> WorkerAnswer:
        """A worker that gave no answer: dead, restarting, or past the supervisor's deadline."""
        return cls(index, pid, False, error=why, answered=False)

    def describe(self) -> str:
        """``worker 1 (pid 4242)``: how errors name a worker."""
        return f"worker {self.index}" + (f" (pid {self.pid})" if self.pid is not None else "")


async def answer(request: dict[str, Any],
                 ask_all: Callable[[dict[str, Any]], Awaitable[list[WorkerAnswer]]]) -> dict[str, Any]:
    """The protocol's answer object for ``request`` (its ``id`` kept) from every worker's answer."""
    reply: dict[str, Any] = {"id": request["id"]} if "id" in request else {}
    answers = await ask_all(request)
    try:
        result = merge_answers(request, answers)
    except MergeError as error:
        return {**reply, "ok": False, "error": str(error)}
    return {**reply, "ok": True, "result": result}


def merge_answers(request: Mapping[str, Any], answers: Sequence[WorkerAnswer]) -> Any:
    """The merged ``result`` of one command, or :class:`MergeError` with the error answer's text."""
    answers = sorted(answers, key=lambda worker: worker.index)
    command = request.get("cmd")
    if command == "close":
        return _close(answers)
    if command in BROADCAST:
        return _broadcast(str(command), answers)
    ok = _ok_results(answers)
    if command == "stats":
        return merge_stats(answers)
    if command == "flows":
        return merge_flows([_with_worker(answer) for answer in answers if answer.ok], _limit(request))
    if command == "tracker":
        return merge_tracker(ok, _limit(request))
    return ok[0]  # ping, rules, a plugin's own command: the first worker's answer


def _with_worker(answer: WorkerAnswer) -> Any:
    """A worker's flow list with each flow's ``worker`` index (which process carries it: ``ctl flows``
    shows it, and a flow's id alone would need the worker count to tell)."""
    if not isinstance(answer.result, list):
        return answer.result
    return [{**entry, "worker": answer.index} if isinstance(entry, dict) else entry for entry in answer.result]


def _limit(request: Mapping[str, Any]) -> int:
    """``limit`` as the engine reads it (the workers accepted it, so it is a number)."""
    try:
        return int(request.get("limit", 1000))
    except (TypeError, ValueError):
        raise MergeError(f"limit: not a number: {request.get('limit')!r}") from None


def _ok_results(answers: Sequence[WorkerAnswer]) -> list[Any]:
    """The results of the workers that answered ok; none: the error every worker gave."""
    results = [worker.result for worker in answers if worker.ok]
    if not results:
        raise MergeError(_no_result(answers))
    return results


def _no_result(answers: Sequence[WorkerAnswer]) -> str:
    """One engine's error when every worker gave it, else each worker's error by name."""
    if not answers:
        return "no worker is running"
    errors = {worker.error for worker in answers if worker.answered}
    if len(errors) == 1 and all(worker.answered for worker in answers):
        return str(errors.pop())
    if not any(worker.answered for worker in answers):
        return "no worker answered: " + ", ".join(worker.describe() for worker in answers) + f" {NO_ANSWER}"
    return "; ".join(f"{worker.describe()}: {worker.error}" for worker in answers)


def _close(answers: Sequence[WorkerAnswer]) -> Any:
    """A flow lives in one worker (ids are unique across workers, a 5-tuple is steered to one queue):
    that worker's answer. None had it: the engine's "no open flow" error, naming any worker that could
    not be asked (the flow may be there)."""
    for worker in answers:
        if worker.ok:
            return worker.result
    refusals = [worker for worker in answers if worker.answered]
    silent = [worker for worker in answers if not worker.answered]
    if not refusals:
        raise MergeError(_no_result(answers))
    message = str(refusals[0].error)
    different = [worker for worker in refusals if worker.error != message]
    if different:
        message = "; ".join(f"{worker.describe()}: {worker.error}" for worker in refusals)
    if silent:
        message += " (" + ", ".join(worker.describe() for worker in silent) + f" {NO_ANSWER})"
    raise MergeError(message)


def _broadcast(command: str, answers: Sequence[WorkerAnswer]) -> Any:
    """Every worker that answered applied it: the first one's result (for ``deny``, with every worker's
    ``ended_flows``). A worker that did not answer is listed in ``not_answered`` (a result object gets the
    key): it missed the change. Any refusal is an error: the same one from every worker reads as one
    engine's; otherwise it names who applied it and who refused, and why."""
    applied = [worker for worker in answers if worker.ok]
    refused = [worker for worker in answers if worker.answered and not worker.ok]
    silent = [worker for worker in answers if not worker.answered]
    if refused:
        errors = {worker.error for worker in refused}
        if not applied and len(errors) == 1:
            message = str(errors.pop())
        else:
            message = "; ".join(f"{worker.describe()} refused: {worker.error}" for worker in refused)
            if applied:
                message += (f" ({command} applied by " + ", ".join(worker.describe() for worker in applied)
                            + ": the workers now differ)")
        if silent:
            message += "; " + ", ".join(worker.describe() for worker in silent) + f" {NO_ANSWER}"
        raise MergeError(message)
    if not applied:
        raise MergeError(_no_result(answers))
    result = applied[0].result
    if isinstance(result, Mapping):
        merged = dict(result)
        if command == "deny":
            merged["ended_flows"] = [flow for worker in applied if isinstance(worker.result, Mapping)
                                     for flow in worker.result.get("ended_flows") or []]
        if silent:
            merged["not_answered"] = [worker.index for worker in silent]
        return merged
    return result


# -- rules for merging values ------------------------------------------------------------------------

Merger = Callable[[list[Any]], Any]
"""Merges one key's values, one per worker that has the key (in worker order)."""


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def first(values: list[Any]) -> Any:
    """A setting every worker shares (the profile, the mode, a plugin's configuration): the first's."""
    return values[0]


def total(values: list[Any]) -> Any:
    """A number that adds (packets, bytes, a counter): the sum. No numbers: the first value."""
    numbers = [value for value in values if _is_number(value)]
    return sum(numbers) if numbers else values[0]


def largest(values: list[Any]) -> Any:
    """A figure every worker sees the same way, or one that is a bound (uptime, the clock, the tracker's
    size: every worker holds the same leases): the largest."""
    numbers = [value for value in values if _is_number(value)]
    return max(numbers) if numbers else values[0]


def any_true(values: list[Any]) -> bool:
    return any(bool(value) for value in values)


def first_set(values: list[Any]) -> Any:
    """The first worker's non-empty value (an error text): the one to look at."""
    return next((value for value in values if value), values[0])


def counts(values: list[Any]) -> dict[str, Any]:
    """``{name: count}`` tables: summed name by name, in order of first appearance."""
    merged: dict[str, Any] = {}
    for table in values:
        if not isinstance(table, Mapping):
            continue
        for name, count in table.items():
            if name not in merged:
                merged[name] = count
            elif _is_number(merged[name]) and _is_number(count):
                merged[name] += count
    return merged


def top_counts(limit: int) -> Merger:
    """``{name: count}`` tables each cut to their ``limit`` largest: summed, then cut again."""
    def merge(values: list[Any]) -> dict[str, Any]:
        summed = counts(values)
        best = heapq.nlargest(limit, summed.items(), key=lambda item: item[1] if _is_number(item[1]) else 0)
        return dict(best)
    return merge


def _bytes(entry: Any) -> float:
    if not isinstance(entry, Mapping):
        return 0
    return sum(value for value in (entry.get("bytes_down"), entry.get("bytes_up")) if _is_number(value))


def busiest(limit: int) -> Merger:
    """Lists of flows or connections, busiest (bytes both ways) first: merged, re-sorted, cut to ``limit``
    (ties keep worker order)."""
    def merge(values: list[Any]) -> list[Any]:
        entries = [entry for listing in values if isinstance(listing, list) for entry in listing]
        return sorted(entries, key=_bytes, reverse=True)[:limit]
    return merge


def recent_blocks(values: list[Any]) -> list[Any]:
    """The block feeds, oldest first as one engine keeps it, merged by wall-clock time and cut to the
    engine's length."""
    entries = [entry for feed in values if isinstance(feed, list) for entry in feed]

    def at(entry: Any) -> float:
        stamp = entry.get("at") if isinstance(entry, Mapping) else None
        return float(stamp) if _is_number(stamp) else 0.0

    return sorted(entries, key=at)[-RECENT_BLOCKS:]


@attrs.frozen
class Fields:
    """Merges dicts key by key: each key by its rule in ``rules``, a key without one from the first
    worker (so a figure nobody decided about is never summed by accident)."""

    rules: Mapping[str, Merger]

    def __call__(self, values: list[Any]) -> Any:
        tables = [value for value in values if isinstance(value, Mapping)]
        if not tables:
            return values[0]
        keys: dict[str, None] = {}
        for table in tables:
            keys.update(dict.fromkeys(table))
        return {key: self.rules.get(key, first)([table[key] for table in tables if key in table])
                for key in keys}


def dns_latency(values: list[Any]) -> dict[str, Any]:
    """Upstream latency percentiles. The snapshots carry each worker's p50, p99 and sample count, not the
    samples, so: the count is summed; p99 is the largest (the pooled p99 cannot exceed every worker's);
    p50 is the sample-weighted mean of the workers' p50s (the pooled median lies between the smallest
    and the largest, and so does this). Workers without samples do not count."""
    tables = [value for value in values if isinstance(value, Mapping)]
    measured = [table for table in tables if _is_number(table.get("samples")) and table["samples"] > 0
                and _is_number(table.get("p50_ms")) and _is_number(table.get("p99_ms"))]
    if not measured:
        return dict(tables[0]) if tables else {}
    samples = sum(table["samples"] for table in measured)
    p50 = sum(table["p50_ms"] * table["samples"] for table in measured) / samples
    return {"p50_ms": round(p50, 3), "p99_ms": max(table["p99_ms"] for table in measured), "samples": samples}


def dns_upstreams(values: list[Any]) -> list[Any]:
    """Each upstream (by URL) with its answers and failures summed; ``healthy`` (the one a worker uses
    now) when any worker uses it."""
    merged: dict[str, dict[str, Any]] = {}
    rules = Fields({"url": first, "healthy": any_true, "answers": total, "failures": total})
    for listing in values:
        for upstream in listing if isinstance(listing, list) else []:
            if isinstance(upstream, Mapping):
                url = str(upstream.get("url"))
                merged[url] = rules([merged[url], upstream]) if url in merged else dict(upstream)
    return list(merged.values())


def tracker_entries(limit: int) -> Merger:
    """Leases, the union by ``(address, client)``: the latest expiry, open flows summed (each worker
    counts its own flows), names in order of first appearance; soonest expiry first, cut to ``limit``."""
    def merge(values: list[Any]) -> list[Any]:
        union: dict[tuple[Any, Any], dict[str, Any]] = {}
        for listing in values:
            for entry in listing if isinstance(listing, list) else []:
                if not isinstance(entry, Mapping):
                    continue
                key = (entry.get("address"), entry.get("client"))
                known = union.get(key)
                if known is None:
                    union[key] = {**entry, "names": list(entry.get("names") or [])}
                    continue
                for name in entry.get("names") or []:
                    if name not in known["names"]:
                        known["names"].append(name)
                known["expires_in"] = largest([known.get("expires_in"), entry.get("expires_in")])
                known["open_flows"] = total([known.get("open_flows", 0), entry.get("open_flows", 0)])

        def expiry(entry: Mapping[str, Any]) -> float:
            value = entry.get("expires_in")
            return float(value) if _is_number(value) else 0.0

        return heapq.nsmallest(limit, union.values(), key=expiry)
    return merge


def tracker_fields(limit: int) -> Fields:
    """ip_tracker's snapshot (also the ``tracker`` command's answer). Answers are shared, so every worker
    holds the same leases: ``size``, ``expiring_soon``, ``expired`` and ``evicted`` are per-worker views of
    those leases (the largest), while ``learned`` (each worker counts its own answers only) and
    ``blocked`` (its own flows) add."""
    return Fields({
        "size": largest, "expiring_soon": largest, "expired": largest, "evicted": largest,
        "learned": total, "blocked": total, "destinations": first, "entries": tracker_entries(limit),
    })


#: Each built-in plugin's snapshot (plugins/*/plugin.py ``snapshot``); another plugin's comes from the
#: first worker.
PLUGINS: dict[str, Merger] = {
    "dns_filter": Fields({
        **dict.fromkeys(("queries", "answers", "servfail", "blocked", "blocked_cname", "denied", "malformed",
                         "duplicates", "overload", "bad_replies", "unanswered", "event_errors",
                         "tcp_connections", "pending", "timeouts", "tcp_retries"), total),
        "latency": dns_latency,
        "upstreams": dns_upstreams,
        "block_rules": first, "allow_rules": first, "default": first,
        "denied_names": Fields({"names": counts, "reasons": Fields({}), "forgotten": total}),
    }),
    "ip_tracker": tracker_fields(TRACKER_SNAPSHOT_ENTRIES),
    "tcp_forward": Fields({
        **dict.fromkeys(("active", "dialing", "dials_ok", "dials_failed", "dial_timeouts", "refused_by_policy",
                         "refused_full", "closed", "bytes_up", "bytes_down"), total),
        "connections": busiest(PLUGIN_TOP),
    }),
    # max_sessions is each worker's bound: N workers hold N times as many sessions, so it adds like them.
    "udp_forward": Fields({"sessions": total, "max_sessions": total, "evicted": total, "expired": total}),
    "icmp_echo": Fields({"sessions": total, "channels": first}),
    "sni_check": Fields(dict.fromkeys(("checked", "matched", "mismatched", "no_name"), total)),
    "programs": Fields({
        "attribution": first, "source": first, "rules": first,
        "flows_by_program": top_counts(PLUGIN_TOP), "queries_by_program": top_counts(PLUGIN_TOP),
        "matched": counts, "undecided": total,
    }),
}


def plugin_snapshots(values: list[Any]) -> dict[str, Any]:
    """``plugins``: each plugin's snapshots merged by its rules in :data:`PLUGINS`."""
    tables = [value for value in values if isinstance(value, Mapping)]
    names: dict[str, None] = {}
    for table in tables:
        names.update(dict.fromkeys(table))
    return {name: PLUGINS.get(name, first)([table[name] for table in tables if name in table]) for name in names}


_TRAFFIC = ("packets_up", "bytes_up", "packets_down", "bytes_down", "fast_lane_datagrams",
            "packets_out", "bytes_out", "packets_in", "bytes_in")  # the last four: protocol v1's names

#: ``stats``: the whole ``full_snapshot`` (engine/control.py), key by key.
SNAPSHOT = Fields({
    "profile": first, "mode": first, "offload": first, "mtu": first, "control_version": first,
    "live_rules": first,  # broadcast to every worker: the same rules (their ages differ by the ask's spread)
    "routes": first,
    "uptime": largest, "now": largest,
    "stats": Fields({**dict.fromkeys(_TRAFFIC, total), "counters": counts}),
    "flows": Fields({"total": total, "open": counts}),
    "top_flows": busiest(TOP_FLOWS),
    "dns_flows": Fields({"open": total, "by_proto": counts, "top": busiest(TOP_DNS_FLOWS)}),
    "plugins": plugin_snapshots,
    "device": Fields({**dict.fromkeys(("rx_packets", "rx_bytes", "rx_batches", "rx_errors", "tx_packets",
                                       "tx_bytes", "tx_gso_packets", "tx_dropped", "tx_errors"), total),
                      "last_tx_error": first_set}),
    "blocks": Fields({"total": total, "by_reason": counts, "by_plugin": counts,
                      "by_program": top_counts(PLUGIN_TOP), "recent": recent_blocks}),
})


def merge_stats(answers: Sequence[WorkerAnswer]) -> dict[str, Any]:
    """The ``stats`` answer: the snapshots of the workers that answered, merged by :data:`SNAPSHOT`, and
    ``workers``: each worker's index, pid, whether it answered (and why not), uptime, open flows and
    packets both ways."""
    snapshots = [worker.result for worker in answers if worker.ok and isinstance(worker.result, Mapping)]
    if not snapshots:
        raise MergeError(_no_result(answers))
    merged = SNAPSHOT(snapshots)
    merged["workers"] = [_worker_row(worker) for worker in answers]
    return dict(merged)


def _worker_row(worker: WorkerAnswer) -> dict[str, Any]:
    row: dict[str, Any] = {"index": worker.index, "pid": worker.pid, "answered": worker.ok}
    snapshot = worker.result if worker.ok and isinstance(worker.result, Mapping) else None
    if snapshot is None:
        row["error"] = worker.error
        return row
    flows = snapshot.get("flows")
    stats = snapshot.get("stats")
    traffic = stats if isinstance(stats, Mapping) else {}
    row["uptime"] = snapshot.get("uptime")
    row["flows"] = flows.get("total") if isinstance(flows, Mapping) else None
    row["packets"] = total([traffic.get("packets_up", 0), traffic.get("packets_down", 0)])
    return row


def merge_flows(results: Iterable[Any], limit: int) -> list[Any]:
    """``flows``: every worker's open flows, busiest first as one engine sorts them, cut to ``limit``."""
    return busiest(limit)(list(results))


def merge_tracker(results: Iterable[Any], limit: int) -> Any:
    """``tracker``: the union of the workers' leases (:func:`tracker_fields`)."""
    return tracker_fields(limit)(list(results))
