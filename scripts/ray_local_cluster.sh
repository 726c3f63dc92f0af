#!/usr/bin/env bash
# A Ray cluster of one machine, to try the ray backend (docs/RAY.md):
#   scripts/ray_local_cluster.sh start [NUM_CPUS] [NUM_GPUS]   head node of this machine (defaults: every core, every GPU)
#   DASH_BACKEND=ray DASH_RAY_ADDRESS=auto make run            the app joins it and deploys each model on first use
#   scripts/ray_local_cluster.sh status                        nodes, resources, and the Serve applications
#   scripts/ray_local_cluster.sh stop                          stops Ray (and every replica) on this machine
# A multi-node cluster is the same `ray start`, with `--address=<head>:6379` on the other nodes (docs/RAY.md).
set -euo pipefail
cd "$(dirname "$0")/.."
RAY="${RAY:-.venv/bin/ray}"
PORT="${RAY_PORT:-6379}"

case "${1:-}" in
  start)
    resources=()
    [ -n "${2:-}" ] && resources+=(--num-cpus "$2")
    [ -n "${3:-}" ] && resources+=(--num-gpus "$3")
    # No dashboard: it is not needed to serve, and `ray status` says what runs where.
    "$RAY" start --head --port "$PORT" --include-dashboard=false --disable-usage-stats "${resources[@]}"
    echo "Ray is up: run the app with DASH_BACKEND=ray DASH_RAY_ADDRESS=auto"
    ;;
  status)
    "$RAY" status
    .venv/bin/serve status 2>/dev/null || echo "(Serve is not running: no model deployed yet)"
    ;;
  stop)
    "$RAY" stop
    ;;
  *)
    echo "usage: $0 start [NUM_CPUS] [NUM_GPUS] | status | stop" >&2
    exit 2
    ;;
esac
