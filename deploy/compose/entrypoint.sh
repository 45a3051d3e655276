#!/bin/sh
# Container entry point: DICOM_NODE__<SECTION>__<KEY>_FILE=/run/secrets/x sets DICOM_NODE__<SECTION>__<KEY>
# to the file's content (compose and Kubernetes secrets are files), then runs `dicom-node "$@"`.
# The *_FILE variables are removed: the node would take them for unknown keys.
set -eu
for name in $(env | sed -n 's/^\(DICOM_NODE__[A-Za-z0-9_]*\)_FILE=.*/\1/p'); do
  file=$(printenv "${name}_FILE")
  if [ ! -r "$file" ]; then
    echo "dicom-node-entrypoint: ${name}_FILE: cannot read $file" >&2
    exit 2
  fi
  value=$(cat "$file")
  export "$name=$value"
  unset "${name}_FILE"
done
exec "${DICOM_NODE_BIN:-/opt/dicom-node/.venv/bin/dicom-node}" "$@"
