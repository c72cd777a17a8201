"""Training-step throughput of the decoder: LoRA and full fine-tuning, fp32 and bf16, on CPU and (where present) CUDA.

    .venv/bin/python bench/finetune.py [--batch-size 8] [--seq-len 384] [--steps 3] [--random-init]

Each row times optimizer steps (forward, backward, AdamW) on random token batches of the shape `rag finetune` trains
with, after one warm-up step. The model is the packaged SmolLM2-135M-Instruct; with --random-init, or where the
package is not installed (a GPU host without the GGUF), a randomly initialised model of the same shape: throughput
does not depend on the weights. Ratios are against CPU fp32 LoRA measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_flags, markdown_table, percentile  # noqa: E402
from rag.finetune import with_lora  # noqa: E402
from rag.models import autocast  # noqa: E402

# SmolLM2-135M's architecture, for hosts that do not carry the packaged weights.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)


def load_model(random_init: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if not random_init:
        try:
            from rag.models import load_causal_lm

            model, _, _ = load_causal_lm(None, "cpu", for_training=True)
            return model, "packaged SmolLM2-135M-Instruct"
        except Exception as error:  # noqa: BLE001 - any reason the package is unusable here means: fall back
            print(f"packaged decoder unavailable ({error}); using a random-init model of the same shape")
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)), "random-init SmolLM2-135M shape"


def time_steps(model, device: str, method: str, precision: str, batch_size: int, seq_len: int, steps: int) -> dict:
    import copy

    import torch

    model = copy.deepcopy(model).to(device)
    if method == "lora":
        model = with_lora(model, rank=16, alpha=32, dropout=0.05)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for step in range(steps + 1):  # step 0 warms up kernels and allocator
        ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
        started = time.perf_counter()
        with autocast(device, precision):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {"seconds": percentile(seconds, 50), "peak_gib": peak}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per row on CPU (CUDA rows time 10x more).")
    parser.add_argument("--random-init", action="store_true", help="Skip the packaged weights.")
    args = parser.parse_args()

    model, source = load_model(args.random_init)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows, baseline = [], None
    for device in devices:
        for method in ("lora", "full"):
            for precision in ("fp32", "bf16"):
                steps = args.steps * (10 if device == "cuda" else 1)
                timing = time_steps(model, device, method, precision, args.batch_size, args.seq_len, steps)
                baseline = baseline or timing["seconds"]
                name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
                rows.append([name, method, precision, f"{timing['seconds']:.3f}", f"{1 / timing['seconds']:.2f}",
                             f"{args.batch_size * args.seq_len / timing['seconds']:,.0f}",
                             f"{baseline / timing['seconds']:.1f}×",
                             "–" if device == "cpu" else f"{timing['peak_gib']:.1f}"])
                print(f"done: {device} {method} {precision}", file=sys.stderr, flush=True)
    print(markdown_table(["device", "method", "precision", "s/step (p50)", "steps/s", "tokens/s",
                          "vs CPU fp32 LoRA", "peak GPU GiB"], rows))
    print(f"\n{source}; batch {args.batch_size} × {args.seq_len} tokens; AdamW; "
          f"LoRA r=16 on q/k/v/o; torch {torch.__version__}; CPU flags: {cpu_flags()}.")
    if not torch.cuda.is_available():
        print("No CUDA device here: run this script on a GPU host for the CUDA rows.")


if __name__ == "__main__":
    main()
