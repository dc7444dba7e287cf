#!/usr/bin/env bash
# Creates (once) and prints the path of the project's virtual environment.
# The venv lives outside the clone, keyed on the dependency files, so a fresh clone on a machine
# that already built it starts in seconds; a machine without it builds it here (about 4 minutes).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
key=$(cat "$root/pyproject.toml" "$root/scripts/env.sh" | sha256sum | cut -c1-12)
venv="${ICHAL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ichal/venv-$key}"
mkdir -p "$(dirname "$venv")"
# One builder at a time: a second caller waits for the first instead of racing it.
exec 9>"$venv.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
    echo "setting up environment in $venv (first time: a few minutes)" >&2
    rm -rf "$venv"
    python3.11 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip >&2
    "$venv/bin/pip" install --quiet -e "$root[test,cluster]" >&2
    touch "$venv/.complete"
fi
# An editable install points at one clone; re-point it when run from another (e.g. CI's fresh clone).
if ! "$venv/bin/python" -c "import ichal, pathlib, sys; sys.exit(pathlib.Path(ichal.__file__).resolve().parents[2] != pathlib.Path('$root'))" 2>/dev/null; then
    "$venv/bin/pip" install --quiet --no-deps -e "$root" >&2
fi
echo "$venv"
