#!/usr/bin/env bash
# The main job on the shipped corpus: ingest it (incrementally), then search it.
set -euo pipefail
cd "$(dirname "$0")/.."
RAG=.venv/bin/rag
export RAG_INDEX_DIR="${RAG_INDEX_DIR:-./rag-index}"
$RAG ingest corpus || [ $? -eq 1 ]  # exit 1 = some files failed and were reported; the rest is indexed
$RAG info
$RAG search "How do I set a timeout on an httpx client?" -k 3
