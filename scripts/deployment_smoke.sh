#!/usr/bin/env bash
# The deployment path from the shell (CI and users; tests/flows/test_deployment.py does
# the same from pytest): a real Prefect server on 127.0.0.1, a process work pool, the
# `generate_dataset/process` deployment of prefect.yaml, a worker, one run of a tiny
# config, then `pvit verify` on its shards. Every Prefect file goes to a temporary
# PREFECT_HOME; every process started here is stopped on exit.
#
#   scripts/deployment_smoke.sh            # uses .venv/bin/python
#   PYTHON=python3.11 scripts/deployment_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
POOL=pvit-process
DEPLOYMENT=generate_dataset/process
WORK=$(mktemp -d -t pvit-deploy-smoke.XXXXXX)
PIDS=()

cleanup() {
    local status=$?
    for pid in "${PIDS[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null || true   # the process group setsid made
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    if [ "$status" -ne 0 ]; then
        for log in "$WORK"/*.log; do echo "--- $log"; tail -n 40 "$log"; done
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT

port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PREFECT_HOME="$WORK/prefect-home"
export PREFECT_API_URL="http://127.0.0.1:$port/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_UI_ENABLED=false
export PREFECT_WORKER_QUERY_SECONDS=2 TF_CPP_MIN_LOG_LEVEL=3
prefect() { "$PYTHON" -m prefect --no-prompt "$@"; }

echo "server on $PREFECT_API_URL (home $PREFECT_HOME)"
setsid "$PYTHON" -m prefect server start --host 127.0.0.1 --port "$port" --no-ui \
    >"$WORK/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 120); do
    "$PYTHON" -c "import httpx, sys; sys.exit(httpx.get('$PREFECT_API_URL/health').status_code != 200)" \
        2>/dev/null && break
    sleep 1
done
"$PYTHON" -c "import httpx; httpx.get('$PREFECT_API_URL/health').raise_for_status()"

prefect work-pool create "$POOL" --type process
prefect deploy --prefect-file prefect.yaml --name "$DEPLOYMENT"
setsid "$PYTHON" -m prefect worker start --pool "$POOL" --type process --limit 1 \
    >"$WORK/worker.log" 2>&1 &
PIDS+=($!)

out="$WORK/shards"
params=$(printf '{"config": {"out": "%s", "scenes": 2, "scenes_per_shard": 1, "workers": 1, "retries": 0, "scene": {"resolution": 32, "frames": 2, "spp": 4, "min_objects": 3, "max_objects": 4}}}' "$out")
# --watch exits 0 only when the run reaches Completed.
prefect deployment run "$DEPLOYMENT" --params "$params" --watch --watch-timeout 300

ls "$out"/shard-*.tar
"$PYTHON" -m flows.cli verify "$out"
echo "deployment smoke test passed"
