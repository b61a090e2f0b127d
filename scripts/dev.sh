#!/usr/bin/env bash
# Run Ferry locally: install, make sure Postgres and RabbitMQ are up, then `ferry dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/services.sh
exec .venv/bin/ferry dev "$@"
