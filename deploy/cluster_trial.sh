#!/usr/bin/env bash
# The README's "Scale out on a Ray cluster" steps, literally, with both nodes on this machine (loopback): a head and
# a worker with 2 logical GPUs, then `serve deploy` of a profile, a render through it, and a stop of what it started.
#   bash deploy/cluster_trial.sh [profile]        (default serve_config.yaml; prints what each step answered)
# Same-machine only: the worker's metrics port differs from the head's (two raylets cannot share :8080).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-serve_config.yaml}
BIN=.venv/bin
# A private Ray temp dir, and cleanup of only the processes under it, by pid (tests/isolation.py): `ray stop --force`
# would also take down a Ray the user runs beside this trial (their own `make serve`).
export RAY_TMPDIR
RAY_TMPDIR=$(mktemp -d /tmp/prc-XXXXXX)
trap '$BIN/python -c "import sys; from tests.isolation import kill_pids, pids_using; kill_pids(pids_using(sys.argv[1]))" \
  "$RAY_TMPDIR"; rm -rf "$RAY_TMPDIR"' EXIT
# Ray 2.60 token auth: the same mode (and token, ~/.ray/auth_token) on every node and every client.
export RAY_AUTH_MODE=token
t0=$(date +%s)
$BIN/ray start --head --port=6379 --dashboard-host=0.0.0.0 --metrics-export-port=8080 --disable-usage-stats
$BIN/ray start --address=127.0.0.1:6379 --num-gpus=2 --metrics-export-port=8081 --disable-usage-stats
$BIN/ray status
$BIN/serve deploy "$PROFILE" --address http://127.0.0.1:8265
for _ in $(seq 1 180); do
  if $BIN/serve status --address http://127.0.0.1:8265 | grep -q "status: RUNNING"; then break; fi
  sleep 2
done
$BIN/serve status --address http://127.0.0.1:8265 | head -20
curl -sf http://127.0.0.1:8000/healthz; echo
curl -sf http://127.0.0.1:8000/v1/images/generations -H 'content-type: application/json' \
  -d '{"prompt":"a red star on a blue background","size":"128x128"}' \
  | $BIN/python -c 'import sys,json; p=json.load(sys.stdin)["prism"]; print("render:", p["route"], p["model"], p["timings_ms"]["total"], "ms")'
curl -sf http://127.0.0.1:8080/metrics | grep -c '^ray_' | sed 's/^/metrics series lines on :8080: /'
echo "cluster trial: $(( $(date +%s) - t0 )) s from ray start to a render"
