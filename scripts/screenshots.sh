#!/usr/bin/env bash
# Refreshes the web app's screenshots in docs/screenshots/ (the README shows them): the browser tests take them as
# they go through each screen, into a temporary folder unless RAG_WEB_SCREENSHOTS names one. Needs Debian's
# chromium and chromium-driver (scripts/install.sh). Usage: scripts/screenshots.sh [pytest options]
set -euo pipefail
cd "$(dirname "$0")/.."
RAG_WEB_SCREENSHOTS="$PWD/docs/screenshots" exec .venv/bin/python -m pytest -q tests/test_web.py "$@"
