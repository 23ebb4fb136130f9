#!/usr/bin/env bash
# run.sh -- the project's benchmark: dnsgate next to the direct path and sing-box's
# gVisor stack, in one run of the shared peer harness (bench/README.md: where it lives, how it runs).
#
#   bash bench/run.sh                                    # every workload, harness defaults
#   bash bench/run.sh --workloads tcp1,tcp1r,http,http1dst --repeat 1 --duration 5
#   ENGINES=direct,project bash bench/run.sh ...         # another engine set
#   ENGINE_TUN_VNET_HDR=0 bash bench/run.sh ...          # without offloads (plain 1500-byte packets)
#   DNSGATE_PROFILE=profiles/firewall.toml bash bench/run.sh ...
# Extra arguments go to peers.sh unchanged. Needs root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEERS="${PEERS_SH:-$ROOT/../shared/bench/peers.sh}"
cd "$ROOT"  # the harness runs ENGINE_CMD from here
export ENGINE_CMD="${ENGINE_CMD:-bench/peers-engine}"
export ENGINE_TUN_VNET_HDR="${ENGINE_TUN_VNET_HDR:-1}"
exec bash "$PEERS" --engines "${ENGINES:-direct,singbox-gvisor,project}" "$@"
