#!/bin/sh
# Writes ./secrets/ for compose.yaml: random Redis and PostgreSQL passwords and the URLs that use them.
# Keeps existing files. The directory is private (700); the files are 644 because compose bind-mounts
# them into containers running as other users (the node's uid 10001, redis, postgres).
set -eu
cd "$(dirname "$0")"
umask 022
mkdir -p secrets && chmod 700 secrets
gen() { [ -s "secrets/$1" ] || python3 -c 'import secrets; print(secrets.token_hex(24))' > "secrets/$1"; }
gen redis_password
gen postgres_password
[ -s secrets/broker_url ] || echo "redis://:$(cat secrets/redis_password)@redis:6379/0" > secrets/broker_url
[ -s secrets/catalog_url ] || \
  echo "postgresql+psycopg://dicom_node:$(cat secrets/postgres_password)@postgres:5432/dicom_node" > secrets/catalog_url
echo "secrets written to $(pwd)/secrets"
