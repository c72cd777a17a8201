#!/usr/bin/env bash
# Reproduces the committed evaluation reports in results/ (about an hour on 2 CPU cores; resumable).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/datasets}"
RAG=.venv/bin/rag
$RAG eval --dataset "$DATA/xquad-en/xquad.en.json" --ingest-contexts --paths prompt,rag --limit 300 --seed 0 \
  --max-new-tokens 24 -k 1 --out results/xquad
$RAG eval --dataset "$DATA/pubmedqa-dev/pqal_dev.json" --ingest-contexts --paths prompt,rag --limit 200 --seed 0 \
  -k 5 --out results/pubmedqa
