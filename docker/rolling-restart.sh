#!/usr/bin/env bash
# Replace the compose fleet's replicas one at a time (`docker compose --profile fleet up -d`), losing nothing.
#
#   docker/rolling-restart.sh                                # docker compose
#   COMPOSE="podman compose" docker/rolling-restart.sh
#
# For each replica: stop it with SIGTERM (its readiness answers 503 at once, HAProxy takes it out within
# about 1 s, it goes on serving what reaches it for NORMSERVE_DRAIN_S, then finishes what it accepted and
# exits), start it again and wait until its healthcheck passes (its models warm: compose's --wait), and
# give HAProxy time for its two passing checks before the next replica goes. `python -m bench.fleet`
# does the same to replicas on loopback, under load, and reports what it cost.
set -euo pipefail
cd "$(dirname "$0")"
read -r -a compose <<<"${COMPOSE:-docker compose}"
for replica in ${REPLICAS:-normserve-1 normserve-2 normserve-3}; do
    echo "$replica: stopping; it drains first"
    "${compose[@]}" --profile fleet stop --timeout 40 "$replica"
    echo "$replica: starting; waiting until it is healthy"
    "${compose[@]}" --profile fleet up --detach --no-deps --wait "$replica"
    sleep "${SETTLE_S:-2}"  # HAProxy's two passing checks, 500 ms apart
    echo "$replica: back in"
done
