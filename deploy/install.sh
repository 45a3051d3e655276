#!/usr/bin/env bash
# Install everything the node and its test suite need on a fresh Debian 12 machine.
#   system packages: Orthanc (+ DICOMweb plugin), dcmtk, redis-server, python3-venv
#   a virtual environment in ./.venv with the project, its extras and pinned torch (CPU wheel)
# Idempotent: re-running it only installs what is missing. Needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(orthanc orthanc-dicomweb dcmtk redis-server python3-venv)
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install: apt packages: ${missing[*]}"
  $SUDO apt-get update -qq
  # Do not start the packaged Orthanc/Redis services: the node and its tests start their own.
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned: 2.13.0 is the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[ml,dev]"
echo "install: done ($(.venv/bin/python --version), $(.venv/bin/dicom-node --version))"
