#!/usr/bin/env bash
# run.sh -- the project's benchmark: dnsgate next to the direct path and sing-box's
# gVisor stack, in one run of the shared peer harness (bench/README.md: where it lives, how it runs).
#
#   bash bench/run.sh                                    # every workload, harness defaults
#   bash bench/run.sh --workloads tcp1,tcp1r,http,http1dst --repeat 1 --duration 5
#   ENGINES=direct,project bash bench/run.sh ...         # another engine set
#   ENGINE_TUN_VNET_HDR=0 bash bench/run.sh ...          # without offloads (plain 1500-byte packets)
#   DNSGATE_PROFILE=profiles/firewall.toml bash bench/run.sh ...
#   DNSGATE_BUILD=pure bash bench/run.sh ...             # measure the pure-Python build
# Extra arguments go to peers.sh unchanged. Needs root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEERS="${PEERS_SH:-$ROOT/../shared/bench/peers.sh}"
cd "$ROOT"  # the harness runs ENGINE_CMD from here
# The compiled build, unless DNSGATE_BUILD says otherwise: refuse to start when it is missing or stale, and
# pin it for the whole run, so a source edited mid-run makes the project's cells fail loudly instead of
# quietly measuring pure Python (which costs about twice the CPU per connection).
if [[ -z "${DNSGATE_BUILD:-}" ]]; then
  if ! build="$(python3 -c 'import engine.compiled as c; s = c.status(); print(s.describe()); raise SystemExit(0 if s.modules else 1)')"; then
    echo "bench/run.sh: the compiled build is not usable ($build)." >&2
    echo "  build it: python3 -m engine.compiled_build   (or DNSGATE_BUILD=pure bash bench/run.sh ... to measure pure Python)" >&2
    exit 2
  fi
  export DNSGATE_BUILD=compiled
fi
export ENGINE_CMD="${ENGINE_CMD:-bench/peers-engine}"
export ENGINE_TUN_VNET_HDR="${ENGINE_TUN_VNET_HDR:-1}"
exec bash "$PEERS" --engines "${ENGINES:-direct,singbox-gvisor,project}" "$@"
