"""The int8 embedding graphs against torch fp32: cosine of the vectors and speed, here and on a CPU without VNNI.

    .venv/bin/python bench/int8.py [--dataset ../shared/datasets/financebench-dev] [--chunks 64]

Chunks are cut by the project's own parser and chunker from the first filings of the dataset, spread evenly over
them. Both weight widths `rag/embed_onnx.py` can choose are quantised (8 bits, used where the CPU has VNNI; 7 bits,
`reduce_range`, used on x86 without it) and encoded natively; when `qemu-x86_64` is installed (Debian package
`qemu-user`) the same graphs also run under `-cpu Haswell` (AVX2, no VNNI, no AVX-512), where ONNX Runtime takes
its VPMADDUBSW kernels: the int16 saturation that 7-bit weights avoid. Emulation is ~100× slower: the timings
printed are native only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_flags, markdown_table, shared_dataset  # noqa: E402
from ingest.job import parse_file  # noqa: E402
from rag import embed_onnx  # noqa: E402
from rag.config import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_TOKENS  # noqa: E402
from rag.embed import Embedder  # noqa: E402

FLAGS_FOR_BITS = {8: frozenset({"avx2", "avx512_vnni"}), 7: frozenset({"avx2"})}


def filing_chunks(dataset: Path, count: int) -> list[str]:
    embedder = Embedder(precision="fp32")
    texts: list[str] = []
    for path in sorted((dataset / "pdfs").glob("*.pdf"))[:3]:
        parsed = parse_file(str(path), path.name, str(embedder.path), DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNK_OVERLAP,
                            embedder.max_tokens)
        texts += [chunk.indexed_text for chunk in parsed.chunks]
    step = max(1, len(texts) // count)
    return texts[::step][:count]


def int8_encoder(bits: int, cache: Path) -> embed_onnx.OnnxEncoder:
    """The graph `export` makes for a CPU that gets `bits`-bit weights, whatever this CPU is."""
    real = embed_onnx.cpu_flags
    embed_onnx.cpu_flags = lambda: FLAGS_FOR_BITS[bits]
    try:
        return Embedder(precision="onnx-int8", cache_dir=cache).onnx
    finally:
        embed_onnx.cpu_flags = real


def encode_all(texts: list[str], cache: Path) -> dict[int, np.ndarray]:
    return {bits: int8_encoder(bits, cache).encode(texts, 16) for bits in FLAGS_FOR_BITS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=None)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--emulated", type=Path, help=argparse.SUPPRESS)  # the folder of the emulated run's half
    args = parser.parse_args()
    if args.emulated:
        texts = json.loads((args.emulated / "texts.json").read_text())
        vectors = encode_all(texts, args.emulated)
        np.savez(args.emulated / "haswell.npz", **{str(bits): array for bits, array in vectors.items()})
        return
    texts = filing_chunks(args.dataset or shared_dataset("financebench-dev"), args.chunks)

    print(f"CPU flags: {cpu_flags()}; {len(texts)} filing chunks")
    workdir = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    reference = Embedder(precision="fp32").encode(texts)
    native, seconds = {}, {}
    for bits in FLAGS_FOR_BITS:
        encoder = int8_encoder(bits, workdir)
        encoder.encode(texts[:16], 16)  # session start-up
        started = time.perf_counter()
        native[bits] = encoder.encode(texts, 16)
        seconds[bits] = time.perf_counter() - started
    emulated = {}
    if shutil.which("qemu-x86_64"):
        (workdir / "texts.json").write_text(json.dumps(texts))
        subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, __file__, "--emulated", str(workdir)],
                       check=True, stderr=subprocess.DEVNULL)  # (qemu's notes on CPU features it does not model)
        emulated = {int(bits): vectors for bits, vectors in np.load(workdir / "haswell.npz").items()}
    else:
        print("qemu-x86_64 not found (apt install qemu-user): the CPU without VNNI is not measured")

    rows = []
    for bits in FLAGS_FOR_BITS:
        for cpu, vectors in (("this CPU", native[bits]), ("qemu -cpu Haswell", emulated.get(bits))):
            if vectors is None:
                continue
            cosine = (vectors * reference).sum(axis=1)
            speed = f"{seconds[bits] / len(texts) * 1000:.1f}" if cpu == "this CPU" else "–"
            rows.append([f"{bits}-bit", cpu, f"{cosine.mean():.4f}", f"{cosine.min():.4f}", speed])
    print(markdown_table(["int8 weights", "runs on", "cosine to fp32 mean", "min", "ms per chunk"], rows))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
