#!/usr/bin/env bash
# Set up (once) and run the test suite. Extra arguments go to pytest (e.g. `-k knapsack`).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/env.sh")
# The PACS and viewer tests use a real Orthanc and a real Chromium (Debian packages).
bash "$root/scripts/install_system_deps.sh"
cd "$root"
export MONAI_LABEL_TRACKING_ENABLED=false
set +e
"$venv/bin/python" -m pytest "$@"
status=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure of the suite, not a pass.
if [ "$status" -eq 5 ]; then
    echo "no tests were collected" >&2
    exit 1
fi
exit "$status"
