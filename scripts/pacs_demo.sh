#!/usr/bin/env bash
# One command for the PACS setup: Orthanc (DICOMweb) + sample DICOM CT + the hemorrhage app reading from it.
# Usage: scripts/pacs_demo.sh [extra `monailabel start_server` arguments]
# Environment: ICHAL_PACS_DIR (Orthanc storage, default var/pacs), ICHAL_ORTHANC_PORT (8042),
#   ICHAL_PORT (app, 8000), ICHAL_DEMO_DICOM (DICOM to upload; default: sample_data/dicom if present,
#   else generated once into var/pacs_sample/dicom with `python -m ichal.phantom --dicom`),
#   ICHAL_DEMO_COUNT (stacks to generate, 6). Orthanc is stopped when the app exits, if this script started it.
# OHIF: http://127.0.0.1:${ICHAL_PORT}/ohif/   Orthanc: http://127.0.0.1:${ICHAL_ORTHANC_PORT}/app/explorer.html
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/env.sh")
pacs_dir="${ICHAL_PACS_DIR:-$root/var/pacs}"
orthanc_port="${ICHAL_ORTHANC_PORT:-8042}"
app_port="${ICHAL_PORT:-8000}"
dicomweb="http://127.0.0.1:$orthanc_port/dicom-web"

bash "$root/scripts/install_system_deps.sh"

started_orthanc=0
if ! bash "$root/scripts/orthanc.sh" status "$pacs_dir" >/dev/null; then
    bash "$root/scripts/orthanc.sh" start "$pacs_dir" "$orthanc_port"
    started_orthanc=1
fi
stop_orthanc() { [ "$started_orthanc" = 1 ] && bash "$root/scripts/orthanc.sh" stop "$pacs_dir" || true; }
trap stop_orthanc EXIT

dicom="${ICHAL_DEMO_DICOM:-}"
if [ -z "$dicom" ]; then
    if [ -d "$root/sample_data/dicom" ]; then
        dicom="$root/sample_data/dicom"
    else
        dicom="$root/var/pacs_sample/dicom"
        if [ ! -d "$dicom" ]; then
            echo "generating ${ICHAL_DEMO_COUNT:-6} phantom CT stacks as DICOM into $dicom" >&2
            OMP_NUM_THREADS=1 "$venv/bin/python" -m ichal.phantom --out "$root/var/pacs_sample" \
                --count "${ICHAL_DEMO_COUNT:-6}" --size 256 --seed 0 --dicom --overwrite
        fi
    fi
fi
"$venv/bin/python" -m ichal.pacs upload "$dicomweb" "$dicom"

export MONAI_LABEL_TRACKING_ENABLED=false
echo "app: http://127.0.0.1:$app_port  (OHIF: http://127.0.0.1:$app_port/ohif/)" >&2
"$venv/bin/python" -m monailabel.main start_server --app "$root/apps/hemorrhage" --studies "$dicomweb" \
    --host 127.0.0.1 --port "$app_port" "$@"
