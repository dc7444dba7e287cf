#!/usr/bin/env bash
# Serve the hemorrhage app on a working copy of sample_data/ (local datastore), bound to 127.0.0.1.
# Usage: scripts/serve.sh [extra `monailabel start_server` arguments, e.g. --conf budget_minutes 60]
# Environment: ICHAL_DATASTORE (default var/datastore), ICHAL_HOST (127.0.0.1), ICHAL_PORT (8000).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/env.sh")
datastore="${ICHAL_DATASTORE:-$root/var/datastore}"
if [ ! -d "$datastore" ]; then
    # A copy keeps sample_data/ pristine: the server writes labels and state into its datastore.
    mkdir -p "$(dirname "$datastore")"
    cp -r "$root/sample_data" "$datastore"
    echo "created datastore $datastore from sample_data/" >&2
fi
export MONAI_LABEL_TRACKING_ENABLED=false
exec "$venv/bin/python" -m monailabel.main start_server --app "$root/apps/hemorrhage" --studies "$datastore" \
    --host "${ICHAL_HOST:-127.0.0.1}" --port "${ICHAL_PORT:-8000}" "$@"
