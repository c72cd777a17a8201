#!/usr/bin/env bash
# Reproduces the committed evaluation reports in results/ (about two hours on 2 CPU cores; evals resume from their cache).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/datasets}"
RAG=.venv/bin/rag
$RAG eval --dataset "$DATA/xquad-en/xquad.en.json" --ingest-contexts --paths prompt,rag --limit 300 --seed 0 \
  --max-new-tokens 24 -k 1 --out results/xquad
$RAG eval --dataset "$DATA/pubmedqa-dev/pqal_dev.json" --ingest-contexts --paths prompt,rag --limit 200 --seed 0 \
  -k 5 --out results/pubmedqa

# Fine-tuned paths (#5): LoRA on half the articles / abstracts, evaluated on the other half (adapter weights stay
# local in adapters/; their training.json and loss.png are copied next to each report).
$RAG finetune --data "$DATA/xquad-en/xquad.en.json" --out adapters/xquad --with-context --holdout 0.5 --epochs 3 \
  --lr 0.0003 --seed 0
$RAG eval --dataset adapters/xquad/heldout.jsonl --index results/xquad/index --paths rag,finetuned-rag \
  --adapter adapters/xquad --limit 200 --seed 0 --max-new-tokens 24 -k 1 --out results/xquad-finetuned
cp adapters/xquad/training.json adapters/xquad/loss.png results/xquad-finetuned/
$RAG finetune --data "$DATA/pubmedqa-dev/pqal_dev.json" --out adapters/pubmedqa --with-context --holdout 0.5 --epochs 3 \
  --lr 0.0003 --max-tokens 768 --seed 0
$RAG eval --dataset adapters/pubmedqa/heldout.jsonl --index results/pubmedqa/index --paths prompt,rag,finetuned-rag \
  --adapter adapters/pubmedqa -k 3 --seed 0 --out results/pubmedqa-finetuned
cp adapters/pubmedqa/training.json adapters/pubmedqa/loss.png results/pubmedqa-finetuned/
# Full fine-tuning, the reference for LoRA: the whole model is written to adapters/xquad-full and served as the
# decoder of the rag path (same split and held-out sample as the LoRA run above).
$RAG finetune --data "$DATA/xquad-en/xquad.en.json" --out adapters/xquad-full --method full --with-context \
  --holdout 0.5 --epochs 3 --lr 0.00005 --seed 0
RAG_DECODER_MODEL=adapters/xquad-full $RAG eval --dataset adapters/xquad-full/heldout.jsonl --index results/xquad/index \
  --paths rag --limit 200 --seed 0 --max-new-tokens 24 -k 1 --out results/xquad-full
cp adapters/xquad-full/training.json adapters/xquad-full/loss.png results/xquad-full/

# The shipped adapter and the default path (#14): train and package it (scripts/train_packaged_adapter.sh writes
# adapters/packaged/heldout.jsonl, the 24 held-out articles' questions), then the default path against the base
# RAG path through retrieval over all 240 paragraphs; answerability calibration and rates; follow-up retrieval.
scripts/train_packaged_adapter.sh "$DATA"
$RAG ingest results/xquad/passages --index results/xquad-default/index
$RAG eval --dataset adapters/packaged/heldout.jsonl --index results/xquad-default/index --paths rag,finetuned-rag \
  --limit 200 --seed 0 --max-new-tokens 24 -k 1 --out results/xquad-default
.venv/bin/python bench/abstention.py --fit
.venv/bin/python bench/followups.py --limit 100
