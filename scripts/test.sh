#!/usr/bin/env bash
# Run the test suite on the real stack. Starts what the tests need and stops it afterwards:
# a private PostgreSQL on 127.0.0.1 (installed from Debian's packages if missing, when root), and
# Debian's chromium for the browser tests (installed if missing, when root).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

source scripts/services.sh
start_postgres || echo "PostgreSQL not available: postgres tests will be skipped"
trap stop_postgres EXIT
install_chromium
[ -x /usr/bin/chromium ] || echo "chromium not available: browser tests will be skipped"

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled
$BIN/ruff check .
$BIN/pytest -q -ra --durations=25 "$@"
