#!/usr/bin/env bash
# The main job on bundled test data: install estargz into .venv, convert the
# sample layer with its prioritized files, verify the result and list it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
OUT=${OUT:-out}

if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
  echo "installing python3-venv" >&2
  if [ "$(id -u)" -eq 0 ]; then apt-get update -q >&2 && apt-get install -y -q python3-venv >&2
  else sudo apt-get update -q >&2 && sudo apt-get install -y -q python3-venv >&2; fi
fi
[ -x "$VENV/bin/estargz" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check .

mkdir -p "$OUT"
set -x
"$VENV/bin/estargz" layer convert testdata/sample-layer.tar.gz "$OUT/sample.esgz" \
    --prioritized-files testdata/sample-prioritized.txt
"$VENV/bin/estargz" layer verify "$OUT/sample.esgz"
"$VENV/bin/estargz" layer ls "$OUT/sample.esgz"
