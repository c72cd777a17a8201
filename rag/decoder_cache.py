"""A dequantised copy of a GGUF decoder, so that only the first start pays for dequantisation; and a merged copy of
a decoder with a LoRA adapter, so that only the first start pays for peft.

transformers reads a .gguf by parsing it and dequantising every tensor in Python: 15-25 s for the packaged 135M
model on 2 cores, every process start. The copy is an ordinary HF folder (config, tokenizer, fp32 safetensors)
under `<cache_dir>/decoders/<sha256 of the .gguf>`, which loads in about a second. It is keyed by the file's
content, so a replaced file is never served a stale copy; the hash itself is remembered per (path, size, mtime)
in `<cache_dir>/hashes.json` so that later starts do not read the whole file. Copies are written to a temporary
folder and renamed into place, so a crash or a concurrent start never leaves a half-written copy that is used.

Applying an adapter at load (peft: import, wrap, merge) adds 2-7 s to every start here, mostly peft's import. The
merged weights are saved like the dequantised copy, under `<cache_dir>/decoders/merged-<hash>`, keyed by the hashes
of the base copy's and the adapter's files, and later starts load them without importing peft.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from rag.models import transformers_lock, quiet_transformers, resolve_decoder, sha256_files, silence_gguf_progress

logger = logging.getLogger("rag.models")

HASHES_FILE = "hashes.json"


def cached_decoder(model: str | Path | None, cache_dir: Path | None, create: bool = True) -> str | Path | None:
    """What to load for a decoder: the dequantised copy's folder when `model` is a .gguf and caching is on
    (`cache_dir` set), written first if `create`; otherwise `model` itself."""
    if cache_dir is None:
        return model
    folder, gguf_file = resolve_decoder(model)
    if gguf_file is None:
        return model
    if create:
        return dequantised_copy(folder / gguf_file, cache_dir)
    return existing_copy(folder / gguf_file, cache_dir) or model


def file_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a file's content, computed once per (path, size, mtime) and remembered in the cache folder."""
    path = path.resolve()
    stat = path.stat()
    index_path = cache_dir / HASHES_FILE
    try:
        known = json.loads(index_path.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path))
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = sha256_files(path)
    known[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    _write_atomically(index_path, json.dumps(known, indent=1))
    return digest


def copy_folder(gguf_path: Path, cache_dir: Path) -> Path:
    return cache_dir / "decoders" / file_sha256(gguf_path, cache_dir)


def existing_copy(gguf_path: Path, cache_dir: Path) -> Path | None:
    folder = copy_folder(gguf_path, cache_dir)
    return folder if (folder / "config.json").is_file() else None


def dequantised_copy(gguf_path: Path, cache_dir: Path) -> Path:
    """The folder of the .gguf's dequantised copy, written first if there is none yet."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    folder = copy_folder(gguf_path, cache_dir)
    if (folder / "config.json").is_file():
        return folder
    import torch
    with transformers_lock():
        from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantising %s once into %s", gguf_path, folder)
    quiet_transformers()
    silence_gguf_progress()
    extra = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **extra)
    with transformers_lock():
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **extra)
    # Dequantised, the weights are plain fp32 tensors; only the loader's marks say "gguf", and save_pretrained
    # refuses a model so marked (and a saved quantization_config would send the next load back to the .gguf).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _save_atomically(model, tokenizer, folder, {"gguf": str(gguf_path.resolve()), "sha256": folder.name})
    return folder


def merged_copy(base: Path, adapter_dir: Path, cache_dir: Path) -> Path:
    """The folder of `base` (an HF decoder folder) with the LoRA adapter in `adapter_dir` merged into its weights,
    written first if there is none yet."""
    weights = sorted(base.glob("*.safetensors")) + sorted(adapter_dir.glob("adapter_*"))
    key = hashlib.sha256("\n".join(file_sha256(path, cache_dir) for path in weights).encode()).hexdigest()
    folder = cache_dir / "decoders" / f"merged-{key[:32]}"
    if (folder / "config.json").is_file():
        return folder
    from rag.generation.adapters import apply_adapter  # peft: only when a copy is written
    from rag.models import load_causal_lm, read_tokenizer

    logger.info("merging adapter %s into %s once, into %s", adapter_dir, base, folder)
    model, _, _ = load_causal_lm(base, "cpu")
    _save_atomically(apply_adapter(model, adapter_dir), read_tokenizer(base), folder,
                     {"base": str(base), "adapter": str(adapter_dir.resolve())})
    return folder


def _save_atomically(model, tokenizer, folder: Path, source: dict) -> None:
    """save_pretrained into a temporary folder renamed into place (a concurrent start's copy is as good)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "source.json").write_text(json.dumps(source, indent=1))
        os.rename(staging, folder)  # atomic; fails if another process got there first
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(temporary, path)
