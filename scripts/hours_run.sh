#!/usr/bin/env bash
# Issue 18's full per-hour run (docs/results.md, "Per-hour protocol") spans several sessions, and neither a
# session's checkout nor anything outside it outlives the session. So the run's finished cells live in the
# repository (docs/results/hours/run: every JSON record, and only the checkpoints a resumed run still
# needs), and every session computes with the code of one commit, so all cells follow one rule.
#
#   bash scripts/hours_run.sh start MINUTES  # restore the archive into out/hours_run and continue the run in
#                                            # the background (log: out/hours_run.log); no task starts after
#                                            # MINUTES, started ones finish (a chain of 5 rounds: ~20 min)
#   bash scripts/hours_run.sh save           # copy what finished back into docs/results/hours/run (commit it)
#   bash scripts/hours_run.sh restore        # only restore the archive into out/hours_run (for --report-only)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_COMMIT=ae6aa21  # the code every cell of this run computes with
SEEDS="0 1 2 3 4 5 6 7"
RUN=$PWD/out/hours_run
ARCHIVE=$PWD/docs/results/hours/run
CODE=$PWD/out/hours_code

restore() {
    mkdir -p "$RUN"
    if [ -d "$ARCHIVE" ]; then cp -rn "$ARCHIVE/." "$RUN/"; fi
}

case "${1:-}" in
restore)
    restore
    echo "restored $ARCHIVE into $RUN"
    ;;
start)
    minutes=${2:?"usage: $0 start MINUTES"}
    python_bin=$(bash scripts/env.sh)/bin/python
    [ -d "$CODE" ] || git worktree add --detach "$CODE" "$RUN_COMMIT" >/dev/null
    [ "$(git -C "$CODE" rev-parse --short=7 HEAD)" = "$RUN_COMMIT" ] || { echo "$CODE is not at $RUN_COMMIT" >&2; exit 1; }
    restore
    resume=$([ -f "$RUN/hours_config.json" ] && echo --resume || true)
    cd "$CODE"
    export PYTHONPATH=$CODE/lib OMP_NUM_THREADS=1
    "$python_bin" -c "import ichal, sys; sys.exit(0 if ichal.__file__.startswith('$CODE/') else 'ichal not from $CODE')"
    # shellcheck disable=SC2086
    nohup "$python_bin" -m ichal.experiment hours --config hours --out "$RUN" --seeds $SEEDS --workers 2 \
        $resume --stop-starting-after "$minutes" >> "$RUN.log" 2>&1 &
    echo "started (pid $!): tail -f $RUN.log"
    ;;
save)
    PYTHONPATH=$CODE/lib "$(bash scripts/env.sh)/bin/python" - "$RUN" "$ARCHIVE" <<'EOF'
"""Copy every JSON file of the run, and the checkpoints a resumed run still needs: a seed's round 0 while one
of its chains is unfinished, and an unfinished chain's last round."""
import json, shutil, sys
from pathlib import Path

run, archive = Path(sys.argv[1]), Path(sys.argv[2])
rounds = json.loads((run / "hours_config.json").read_text())["rounds"]
from ichal.experiment import PROTOCOL_METHODS

needed = set()
for seed_dir in sorted((run / "hours").glob("seed*")):
    unfinished = [m for m in PROTOCOL_METHODS["hours"] if not (seed_dir / m / f"round{rounds}.json").exists()]
    if unfinished and (seed_dir / "shared" / "round0.pt").exists():
        needed.add(seed_dir / "shared" / "round0.pt")
    for method in unfinished:
        done = sorted(int(p.stem[5:]) for p in (seed_dir / method).glob("round*.json"))
        if done:
            needed.add(seed_dir / method / f"round{done[-1]}.pt")
shutil.rmtree(archive, ignore_errors=True)
for path in sorted({*run.rglob("*.json"), *run.glob("hours_*"), *needed}):  # hours_config.json matches both globs
    target = archive / path.relative_to(run)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, target)
records = sum(1 for _ in (archive / "hours").rglob("round*.json"))
print(f"{archive}: {records} cell records, {len(needed)} checkpoints kept for resuming")
EOF
    ;;
*)
    echo "usage: $0 start MINUTES | save | restore" >&2
    exit 2
    ;;
esac
