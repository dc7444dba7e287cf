#!/usr/bin/env bash
# Installs (once) the Debian packages the PACS/viewer tests need: Orthanc + DICOMweb plugin, Chromium.
# Idempotent: does nothing when all are installed. Needs root (or sudo) only when something is missing.
set -euo pipefail
packages=(orthanc orthanc-dicomweb chromium)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "system packages present: ${packages[*]}"
    exit 0
fi
as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo)
echo "installing: ${missing[*]}" >&2
"${as_root[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${missing[@]}"
