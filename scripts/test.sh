#!/usr/bin/env bash
# Run the test suite: install, make sure Postgres and RabbitMQ are up, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/services.sh
exec .venv/bin/pytest "$@"
