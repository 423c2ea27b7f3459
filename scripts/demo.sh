#!/usr/bin/env bash
# The main job on bundled test data, the whole product working:
#  1. install estargz into .venv;
#  2. convert and verify the small layer bundled in testdata/;
#  3. build (once, cached) a Debian + python3 test image from Debian packages,
#     profile `python3 -c "import json"` in a sandbox, write the optimized
#     eStargz image to out/optimized (an OCI layout) and show the report.
# Step 3 needs root (debootstrap, overlay mounts, fanotify, runc).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
OUT=${OUT:-out}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
need=()
"$PY" -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
for tool in debootstrap:debootstrap umoci:umoci runc:runc busybox:busybox-static; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2
fi
[ -x "$VENV/bin/estargz" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check .

mkdir -p "$OUT"
echo "== convert and verify the bundled sample layer" >&2
"$VENV/bin/estargz" layer convert testdata/sample-layer.tar.gz "$OUT/sample.esgz" \
    --prioritized-files testdata/sample-prioritized.txt
"$VENV/bin/estargz" layer verify "$OUT/sample.esgz"

echo "== build the Debian + python3 test image (cached after the first run)" >&2
image=$(as_root "$VENV/bin/python" testdata/images/build.py debian-python3 | tail -n 1)
echo "== profile python3 -c 'import json' and optimize the image" >&2
rm -rf "$OUT/optimized"
as_root "$VENV/bin/estargz" optimize "oci:$image/oci:latest" "oci:$OUT/optimized:latest" \
    --record-out "$OUT/record.jsonl" --report "$OUT/report.html"
echo "report: $OUT/report.html  record: $OUT/record.jsonl  image: oci:$OUT/optimized:latest" >&2
