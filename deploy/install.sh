#!/usr/bin/env bash
# Install everything the node and its test suite need on a fresh Debian 12 machine.
#   system packages: Orthanc (+ DICOMweb plugin), dcmtk, redis-server, postgresql (the tests start their own
#   throwaway server with initdb/pg_ctl: testkit/postgres.py), python3-venv, chromium, iproute2 (`ip netns` for
#   the multi-host test: tests/multihost/)
#   the OHIF viewer's built dist/ (npm pack, cached) for the viewer test (tests/viewer/)
#   a virtual environment in ./.venv with the project, its extras and pinned torch (CPU wheel)
# Idempotent: re-running it only installs what is missing. Needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(orthanc orthanc-dicomweb dcmtk redis-server postgresql python3-venv chromium iproute2)
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install: apt packages: ${missing[*]}"
  $SUDO apt-get update -qq
  # Do not start the packaged Orthanc/Redis/PostgreSQL services: the node and its tests start their own.
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
# --- OHIF viewer for tests/viewer (begin) ------------------------------------------------------
# The pinned @ohif/app tarball is fetched once with `npm pack` into a cache directory and reused;
# only its built dist/ is unpacked (without dist/ort/, 136 MB of ONNX runtime the test never loads)
# into .cache/ohif-<version>/ (git-ignored). Chromium comes from apt (/usr/bin/chromium); Playwright
# drives it and never downloads a browser (do not run `playwright install`).
OHIF_VERSION=3.12.10
OHIF_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/dicom-node/npm"
OHIF_TGZ="$OHIF_CACHE/ohif-app-$OHIF_VERSION.tgz"
OHIF_DIR=".cache/ohif-$OHIF_VERSION"
if [ ! -s "$OHIF_TGZ" ]; then
  if ! command -v npm >/dev/null; then  # nodejs packages that bundle npm conflict with Debian's npm
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends npm >/dev/null
  fi
  echo "install: npm pack @ohif/app@$OHIF_VERSION"
  mkdir -p "$OHIF_CACHE/partial"  # pack aside, then rename: an interrupted run leaves no half tarball
  (cd "$OHIF_CACHE/partial" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  mv "$OHIF_CACHE/partial/ohif-app-$OHIF_VERSION.tgz" "$OHIF_TGZ"
fi
if [ ! -f "$OHIF_DIR/dist/index.html" ]; then
  rm -rf "$OHIF_DIR.tmp" && mkdir -p "$OHIF_DIR.tmp"
  tar -xzf "$OHIF_TGZ" -C "$OHIF_DIR.tmp" --strip-components=1 --exclude='package/dist/ort' package/dist
  rm -rf "$OHIF_DIR" && mv "$OHIF_DIR.tmp" "$OHIF_DIR"
fi
# --- OHIF viewer for tests/viewer (end) --------------------------------------------------------
echo "install: done ($(.venv/bin/python --version), $(.venv/bin/dicom-node --version))"
