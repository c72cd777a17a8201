#!/usr/bin/env bash
# The main job on the shipped corpus: ingest it (incrementally), search it, answer a question with citations (on the
# default path: the shipped adapter + RAG), ask one the documents do not answer, hold a short conversation, then
# compare the prompt-only, RAG and fine-tuned + RAG paths on a few questions about it (scripts/demo_questions.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
RAG=.venv/bin/rag
export RAG_INDEX_DIR="${RAG_INDEX_DIR:-./rag-index}"
$RAG ingest corpus || [ $? -eq 1 ]  # exit 1 = some files failed and were reported; the rest is indexed
$RAG info
$RAG search "How do I set a timeout on an httpx client?" -k 3
$RAG ask "After how many seconds of network inactivity does HTTPX raise a TimeoutException?" --max-new-tokens 32
$RAG ask "Who won the Super Bowl in 2016?" --max-new-tokens 32      # not in these documents: "not answerable"
printf 'How do I configure proxies for HTTPX?\nAnd how do I disable them for some hosts?\n' | $RAG chat --max-new-tokens 32
$RAG eval --dataset scripts/demo_questions.jsonl --paths prompt,rag,finetuned-rag --index "$RAG_INDEX_DIR" \
  --out results/demo
