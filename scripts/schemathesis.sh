#!/usr/bin/env bash
# Property-based API testing: schemathesis generates requests from /openapi.json and fails on any 5xx.
#
#   scripts/schemathesis.sh [MAX_EXAMPLES]        (default 30 per operation)
#
# Builds a small index (three httpx docs) in a temporary folder, serves it with uvicorn on a free loopback port,
# runs schemathesis with an API key, and stops the server. Generation is capped at 8 tokens
# (RAG_MAX_NEW_TOKENS_LIMIT) so fuzzed /v1/ask calls stay quick on a small CPU.
# Needs: .venv/bin/pip install schemathesis -c scripts/constraints.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
EXAMPLES="${1:-30}"
WORK="$(mktemp -d)"
KEY="schemathesis-key"
PORT="$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
SERVER_PID=""
cleanup() { [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

mkdir -p "$WORK/docs"
cp corpus/httpx/quickstart.md corpus/httpx/advanced/timeouts.md corpus/httpx/exceptions.md "$WORK/docs/"
.venv/bin/rag ingest "$WORK/docs" --index "$WORK/index" --workers 1 --json > /dev/null

RAG_INDEX_DIR="$WORK/index" RAG_API_KEYS="$KEY" RAG_MAX_NEW_TOKENS_LIMIT=8 RAG_INDEX_POLL_S=0 \
  $PY -m uvicorn --factory api.app:create_app --host 127.0.0.1 --port "$PORT" --log-level warning \
  2> "$WORK/server.log" &
SERVER_PID=$!
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; exit 1; }
  sleep 0.5
done

status=0
.venv/bin/schemathesis run "http://127.0.0.1:$PORT/openapi.json" \
  --header "Authorization: Bearer $KEY" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples "$EXAMPLES" --generation-deterministic || status=$?
if grep -q '"level": "error"' "$WORK/server.log"; then
  echo "Server logged errors:"; grep '"level": "error"' "$WORK/server.log" | head -20; status=1
fi
exit $status
