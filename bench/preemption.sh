#!/usr/bin/env bash
# preemption.sh -- where a worker's CPU per connection goes: sleeps, preemptions, user and system time.
#
#   bash bench/preemption.sh 1        # one worker
#   bash bench/preemption.sh 2        # two workers (ENGINE_TUN=self: the engine opens the multi-queue TUN)
#   AB_KEEPALIVE=1 bash bench/preemption.sh 1   # keep-alive (ab -k): figures per request, not per connection
#
# Why: the side-by-side harness gives an engine's CPU per connection but not why two workers cost more
# per connection than one on a small machine. This holds the `project` slot up with the shared harness
# (`peers.py up project`, the same namespaces, servers and bench/peers.toml as bench/run.sh), runs the
# http workload's load (8 `ab` processes, 2 connections each, HTTP/1.0, 8 s) from the client namespace and
# reads each engine process's /proc counters before and after: voluntary context switches (the engine
# slept: nothing to read), involuntary ones (the scheduler took the core for `ab`, nginx or the other
# worker) and user / system time, each per completed connection. Traffic stays in the harness's
# namespaces; everything it set up is torn down on exit. Needs root and the harness's dependencies
# (`bash $PEERS_SH` once, or its install-deps.sh).
set -euo pipefail
WORKERS="${1:?usage: preemption.sh WORKERS}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEERS_PY="$(dirname "${PEERS_SH:-$ROOT/../shared/bench/peers.sh}")/peers.py"
SECONDS_OF_LOAD="${LOAD_SECONDS:-8}"
KEEPALIVE=()
UNIT=connection
if [ "${AB_KEEPALIVE:-0}" = 1 ]; then KEEPALIVE=(-k); UNIT=request; fi
LOG="$(mktemp)"
AB_DIR="$(mktemp -d)"
cd "$ROOT"
ENGINE_TUN=self DNSGATE_WORKERS="$WORKERS" ENGINE_CMD=bench/peers-engine ENGINE_TUN_VNET_HDR=1 \
  python3 "$PEERS_PY" up project --hold $((SECONDS_OF_LOAD + 120)) >"$LOG" 2>&1 &
UP=$!
finish() {
  kill -TERM "$UP" 2>/dev/null || true
  wait "$UP" 2>/dev/null || true
  rm -rf "$LOG" "$AB_DIR"
}
trap finish EXIT INT TERM
for _ in $(seq 90); do grep -q '"engine"' "$LOG" && break; kill -0 "$UP" 2>/dev/null || { cat "$LOG" >&2; exit 1; }; sleep 1; done
grep -q '"engine"' "$LOG" || { echo "the project slot did not come up" >&2; cat "$LOG" >&2; exit 1; }
sleep 2
descendants() { local c; for c in $(pgrep -P "$1" || true); do echo "$c"; descendants "$c"; done; }
# the engine's processes: the `engine.cli serve` below the harness started here and its workers (forked
# children, which need not carry that command line); another dnsgate running on the host is not counted
ENGINE_PIDS="$(for p in $(descendants "$UP"); do
  if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q 'engine.cli serve'; then echo "$p"; pgrep -P "$p" || true; fi
done | sort -un | tr '\n' ' ')"
[ -n "$ENGINE_PIDS" ] || { echo "no engine process under the harness" >&2; exit 1; }
snapshot() {  # one line per process: pid voluntary involuntary utime stime (clock ticks)
  for p in $ENGINE_PIDS; do
    printf '%s %s %s\n' "$p" \
      "$(awk '/^voluntary_ctxt_switches/ {v=$2} /^nonvoluntary_ctxt_switches/ {n=$2} END {print v, n}' "/proc/$p/status")" \
      "$(awk '{print $14, $15}' "/proc/$p/stat")"
  done
}
BEFORE="$(snapshot)"
AB=()
for i in $(seq 10 17); do
  ip netns exec cli ab "${KEEPALIVE[@]}" -q -r -s 10 -c 2 -t "$SECONDS_OF_LOAD" -n 5000000 "http://198.51.100.$i/" \
    >"$AB_DIR/$i.txt" 2>&1 &
  AB+=($!)
done
wait "${AB[@]}"
AFTER="$(snapshot)"
CONNS="$(cat "$AB_DIR"/*.txt | awk '/Complete requests/ {s+=$3} END {print s+0}')"
python3 - "$WORKERS" "$CONNS" "$SECONDS_OF_LOAD" "$BEFORE" "$AFTER" "$UNIT" <<'PY'
import os
import sys

workers, conns, seconds, unit = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[6]
if conns == 0:
    sys.exit(f"no {unit} completed")
hz = os.sysconf("SC_CLK_TCK")
before = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in sys.argv[4].splitlines()}
print(f"workers {workers}: {conns} {unit}s, {conns / seconds:.0f}/s")
total = 0.0
for line in sys.argv[5].splitlines():
    pid, *after = line.split()
    sleeps, preempted, user, system = (int(a) - b for a, b in zip(after, before[pid]))
    if user + system == 0:
        continue  # the supervisor of several workers: it only watches them
    total += (user + system) / hz
    print(f"  pid {pid}: {sleeps / conns:.2f} sleeps and {preempted / conns:.2f} preemptions per {unit}, "
          f"user {user / hz * 1e6 / conns:.1f} + system {system / hz * 1e6 / conns:.1f} µs per {unit}")
print(f"  engine CPU per {unit}: {total * 1e6 / conns:.1f} µs")
PY
