#!/usr/bin/env bash
# The demo: sets up .venv if needed, starts a local broker and the four stages, sends images,
# shows predictions and a checked summary. Options: --broker pubsub, --count N (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m Pipeline.demo "$@"
