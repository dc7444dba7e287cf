#!/usr/bin/env bash
# Development/test PACS: Orthanc with its DICOMweb plugin, one instance per data folder.
#   scripts/orthanc.sh start DIR [PORT]   write DIR/orthanc.json, start Orthanc, wait for /system
#   scripts/orthanc.sh stop DIR           stop the instance started for DIR (SIGTERM, then wait)
#   scripts/orthanc.sh status DIR         print "running PORT PID" or "stopped" (exit 0 / 3)
# DICOMweb root: http://127.0.0.1:PORT/dicom-web (PORT defaults to 8042).
# Orthanc 1.10 has no bind-address option: it listens on all interfaces but with
# RemoteAccessAllowed=false it answers only loopback clients, so no authentication is needed.
# The DIMSE (C-STORE) server is disabled: only HTTP/DICOMweb is exposed.
set -euo pipefail

orthanc_bin=${ORTHANC_BIN:-/usr/sbin/Orthanc}
dicomweb_plugin=${ORTHANC_DICOMWEB_PLUGIN:-/usr/share/orthanc/plugins/libOrthancDicomWeb.so}
start_timeout_seconds=${ORTHANC_START_TIMEOUT_SECONDS:-60}

die() { echo "orthanc.sh: $*" >&2; exit 1; }

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# pid of the Orthanc started for DIR, or nothing if it is not running.
running_pid() {
    local dir=$1 pid
    [ -f "$dir/orthanc.pid" ] || return 0
    pid=$(cat "$dir/orthanc.pid")
    if kill -0 "$pid" 2>/dev/null && grep -q Orthanc "/proc/$pid/cmdline" 2>/dev/null; then
        echo "$pid"
    fi
}

write_config() {
    local dir=$1 port=$2
    cat >"$dir/orthanc.json" <<EOF
{
  "Name" : "ichal-dev-pacs",
  "StorageDirectory" : "$dir/db",
  "IndexDirectory" : "$dir/db",
  "HttpPort" : $port,
  "RemoteAccessAllowed" : false,
  "AuthenticationEnabled" : false,
  "DicomServerEnabled" : false,
  "HttpCompressionEnabled" : false,
  "ExecuteLuaEnabled" : false,
  "RestApiWriteToFileSystemEnabled" : false,
  "SaveJobs" : false,
  "StableAge" : 5,
  "HttpThreadsCount" : 8,
  "ConcurrentJobs" : 1,
  "Plugins" : [ "$dicomweb_plugin" ],
  "DicomWeb" : {
    "Enable" : true,
    "Root" : "/dicom-web/",
    "EnableWado" : true,
    "WadoRoot" : "/wado",
    "Host" : "127.0.0.1:$port",
    "Ssl" : false
  }
}
EOF
}

cmd_start() {
    local dir port pid
    [ $# -ge 1 ] || usage
    mkdir -p "$1"
    dir=$(cd "$1" && pwd)
    port=${2:-8042}
    [[ $port =~ ^[0-9]+$ ]] || die "port '$port' is not a number"
    [ -x "$orthanc_bin" ] || die "$orthanc_bin not found: run scripts/install_system_deps.sh (Debian packages orthanc, orthanc-dicomweb)"
    [ -f "$dicomweb_plugin" ] || die "$dicomweb_plugin not found: install the Debian package orthanc-dicomweb"
    pid=$(running_pid "$dir")
    [ -z "$pid" ] || die "Orthanc already running for $dir (pid $pid, port $(cat "$dir/orthanc.port"))"
    if curl -s -o /dev/null "http://127.0.0.1:$port/"; then
        die "port $port is already in use on 127.0.0.1"
    fi
    mkdir -p "$dir/db"
    write_config "$dir" "$port"
    # setsid: Orthanc gets its own session, so a Ctrl-C in the caller's shell does not kill it half-way.
    setsid "$orthanc_bin" "$dir/orthanc.json" >"$dir/orthanc.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$dir/orthanc.pid"
    echo "$port" >"$dir/orthanc.port"
    local waited=0
    until curl -sf -o /dev/null "http://127.0.0.1:$port/system"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$dir/orthanc.log" >&2
            rm -f "$dir/orthanc.pid"
            die "Orthanc exited during start-up (log: $dir/orthanc.log)"
        fi
        if [ "$waited" -ge $((start_timeout_seconds * 10)) ]; then
            kill "$pid" 2>/dev/null || true
            die "Orthanc did not answer on port $port within ${start_timeout_seconds}s (log: $dir/orthanc.log)"
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    curl -sf -o /dev/null "http://127.0.0.1:$port/dicom-web/studies" \
        || die "Orthanc answers but the DICOMweb plugin does not (log: $dir/orthanc.log)"
    echo "Orthanc running: pid $pid, DICOMweb http://127.0.0.1:$port/dicom-web, storage $dir/db"
}

cmd_stop() {
    local dir pid
    [ $# -eq 1 ] || usage
    [ -d "$1" ] || die "no such folder: $1"
    dir=$(cd "$1" && pwd)
    pid=$(running_pid "$dir")
    if [ -z "$pid" ]; then
        rm -f "$dir/orthanc.pid"
        echo "Orthanc not running for $dir"
        return 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid"
        echo "Orthanc (pid $pid) did not stop within 30s: killed" >&2
    fi
    rm -f "$dir/orthanc.pid"
    echo "Orthanc stopped (pid $pid)"
}

cmd_status() {
    local dir pid
    [ $# -eq 1 ] || usage
    [ -d "$1" ] || { echo "stopped"; exit 3; }
    dir=$(cd "$1" && pwd)
    pid=$(running_pid "$dir")
    if [ -n "$pid" ]; then
        echo "running $(cat "$dir/orthanc.port") $pid"
    else
        echo "stopped"
        exit 3
    fi
}

[ $# -ge 1 ] || usage
action=$1
shift
case "$action" in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    *) usage ;;
esac
