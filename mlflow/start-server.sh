#!/usr/bin/env bash
# Start an MLflow tracking server over the project's store (for a pod, or a shared box).
#
#   mlflow/start-server.sh [--host HOST] [--port PORT] [--auth] [--dry-run] [-- extra mlflow server args]
#
# Binds to 127.0.0.1 unless told otherwise: --host / MLFLOW_HOST (0.0.0.0 inside a pod).
# --auth (or MLFLOW_AUTH=1) turns MLflow's basic auth on (`--app-name basic-auth`): every request
# needs a user and password (clients set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD). Open a
# server beyond 127.0.0.1 only with it on.
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
# With --auth (secrets come from the environment, e.g. a Kubernetes Secret; never from this repo):
#   MLFLOW_AUTH_ADMIN_PASSWORD    required: the admin user's password, used when the user store is new
#   MLFLOW_AUTH_ADMIN_USERNAME    the admin user (default admin)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  required: signs the UI's CSRF tokens; the same on every worker/replica
#   MLFLOW_AUTH_DATABASE_URI      the user/permission store (default sqlite:///<root>/mlflow/basic_auth.db;
#                                 postgresql://... on Kubernetes)
#   MLFLOW_AUTH_DEFAULT_PERMISSION  what a user may do on what others made: READ (default), EDIT,
#                                 MANAGE or NO_PERMISSIONS
#   MLFLOW_AUTH_CONFIG_PATH       a basic_auth.ini of your own instead of the one generated from the above
# Artifacts are proxied (--serve-artifacts): clients on other machines upload through the server,
# so new experiments get mlflow-artifacts:/ locations and workers need no access to this disk.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
dry_run=0
auth="${MLFLOW_AUTH:-0}"
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) host="$2"; shift 2 ;;
    --host=*) host="${1#*=}"; shift ;;
    --port) port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    --auth) auth=1; shift ;;
    --) shift; extra+=("$@"); break ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
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
if [[ "$auth" == 1 ]]; then
  missing=()
  [[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]] || missing+=(MLFLOW_AUTH_ADMIN_PASSWORD)
  [[ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]] || missing+=(MLFLOW_FLASK_SERVER_SECRET_KEY)
  if [[ ${#missing[@]} -gt 0 && "$dry_run" != 1 ]]; then
    echo "start-server.sh: --auth needs ${missing[*]} in the environment (from a secret store, never the repo)" >&2
    exit 2
  fi
  if [[ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]]; then
    # MLflow reads the auth settings from an ini file only; this one is made from the environment.
    # Its database_uri may carry a password (postgresql://user:p%40ss@...), so it lives in a
    # private directory (0700, file 0600) removed when the server exits, and every % is doubled:
    # MLflow reads it with configparser's interpolation, which rejects a lone % (p%40ss).
    auth_dir="$(mktemp -d "${TMPDIR:-/tmp}/aigc-mlflow-auth.XXXXXX")"
    trap 'rm -rf "$auth_dir"' EXIT
    MLFLOW_AUTH_CONFIG_PATH="${auth_dir}/basic_auth.ini"
    ini_escape() { printf '%s' "${1//%/%%}"; }
    (umask 077
     printf '[mlflow]\ndefault_permission = %s\ndatabase_uri = %s\nadmin_username = %s\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n' \
      "$(ini_escape "${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}")" \
      "$(ini_escape "${MLFLOW_AUTH_DATABASE_URI:-sqlite:///${root}/mlflow/basic_auth.db}")" \
      "$(ini_escape "${MLFLOW_AUTH_ADMIN_USERNAME:-admin}")" >"$MLFLOW_AUTH_CONFIG_PATH")
    export MLFLOW_AUTH_CONFIG_PATH
  fi
  cmd+=(--app-name basic-auth)
fi
cmd+=(${extra[@]+"${extra[@]}"})

if [[ "$dry_run" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  if [[ "$auth" == 1 ]]; then cat "$MLFLOW_AUTH_CONFIG_PATH"; fi
  exit 0
fi
if [[ -n "${auth_dir:-}" ]]; then
  # Not exec: this shell stays to remove the generated ini (MLflow's workers read it while they
  # start, so it must live as long as the server). TERM/INT are passed on to the server.
  "${cmd[@]}" &
  server_pid=$!
  trap 'kill -TERM "$server_pid" 2>/dev/null' TERM INT
  status=0
  wait "$server_pid" || status=$?
  # A trapped signal interrupts the first wait; wait again for the server itself to finish.
  if kill -0 "$server_pid" 2>/dev/null; then wait "$server_pid" || status=$?; fi
  exit "$status"
fi
exec "${cmd[@]}"
