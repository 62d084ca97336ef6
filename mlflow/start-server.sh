#!/usr/bin/env bash
# Start an MLflow tracking server over the project's store (for a pod, or a shared box).
#
#   mlflow/start-server.sh [--host HOST] [--port PORT] [--dry-run] [-- extra mlflow server args]
#
# Binds to 127.0.0.1 unless told otherwise: --host / MLFLOW_HOST (0.0.0.0 inside a pod).
# Environment (all optional):
#   MLFLOW_HOST                   interface to bind (default 127.0.0.1)
#   MLFLOW_PORT                   port (default 5000)
#   MLFLOW_BACKEND_STORE_URI      run/experiment store (default sqlite:///<root>/mlflow/mlflow.db)
#   MLFLOW_ARTIFACTS_DESTINATION  where proxied artifacts go (default <root>/mlflow/artifacts)
#   MLFLOW_WORKERS                server worker processes (default 2)
#   MLFLOW_ALLOWED_HOSTS          Host headers to accept when reached by a name (e.g. a Service DNS
#                                 name); MLflow accepts localhost and private IPs by default
#   MLFLOW_BIN                    the mlflow executable (default: mlflow on PATH)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's GenAI job runner (eight extra processes); default
#                                 false here, training does not use it
# Artifacts are proxied (--serve-artifacts): clients on other machines upload through the server,
# so new experiments get mlflow-artifacts:/ locations and workers need no access to this disk.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) host="$2"; shift 2 ;;
    --host=*) host="${1#*=}"; shift ;;
    --port) port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra+=("$@"); break ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "start-server.sh: unknown argument '$1' (use -- before extra mlflow server args)" >&2; exit 2 ;;
  esac
done

backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///${root}/mlflow/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-${root}/mlflow/artifacts}"
mkdir -p "${root}/mlflow"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

cmd=("${MLFLOW_BIN:-mlflow}" server
  --backend-store-uri "$backend"
  --serve-artifacts --artifacts-destination "$artifacts"
  --host "$host" --port "$port"
  --workers "${MLFLOW_WORKERS:-2}")
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  cmd+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
cmd+=(${extra[@]+"${extra[@]}"})

if [[ "$dry_run" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
