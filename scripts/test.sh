#!/usr/bin/env bash
# Install everything the tests need (apt and pip), then run the whole suite
# with tox: the gate first (lint-imports, ruff, mypy; see tox.ini), then pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/test_toc.py
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
exec "${PYTHON:-python3}" -m tox -e py3 -- "$@"
