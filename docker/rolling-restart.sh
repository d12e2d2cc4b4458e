#!/usr/bin/env bash
# Replace the compose fleet's replicas one at a time (`docker compose --profile fleet up -d`), losing nothing.
#
#   docker/rolling-restart.sh                                # docker compose
#   COMPOSE="podman compose" docker/rolling-restart.sh
#
# For each replica: stop it with SIGTERM (its readiness answers 503 at once, HAProxy takes it out within
# about 1 s, it goes on serving what reaches it for NORMSERVE_DRAIN_S, then finishes what it accepted and
# exits), start it again and wait until its healthcheck passes (its models loaded and warm), and give
# HAProxy time for its two passing checks before the next replica goes. The healthcheck is run in the
# container here rather than read from compose's health state, which podman updates only where a timer
# runs it. `python -m bench.fleet` does the same to replicas on loopback, under load, and reports what it cost.
set -euo pipefail
cd "$(dirname "$0")"
read -r -a compose <<<"${COMPOSE:-docker compose}"
for replica in ${REPLICAS:-normserve-1 normserve-2 normserve-3}; do
    echo "$replica: stopping; it drains first"
    "${compose[@]}" --profile fleet stop --timeout 40 "$replica"
    echo "$replica: stopped; starting it again"
    "${compose[@]}" --profile fleet up --detach --no-deps "$replica"
    deadline=$((SECONDS + ${READY_TIMEOUT_S:-120}))
    until "${compose[@]}" --profile fleet exec -T "$replica" python -m service.healthcheck >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "$replica: not ready after ${READY_TIMEOUT_S:-120} s; stopping the rolling restart" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "$replica: ready"
    sleep "${SETTLE_S:-2}"  # HAProxy's two passing checks, 500 ms apart
    echo "$replica: back in"
done
