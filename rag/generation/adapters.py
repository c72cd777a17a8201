"""LoRA adapters for the fine-tuned answer paths: whether one is configured (decided here, once), whether it was
trained on the configured base model, and merging it into the base.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rag.config import Settings
from rag.errors import ConflictError, UserError
from rag.models import (TRAINING_RECORD, ModelNotFoundError, decoder_identity, existing_path, resolve_decoder,
                        transformers_lock)
from rag.types import AnswerPath

logger = logging.getLogger("rag.generation")

ADAPTER_HINT = "train one with `rag finetune` and set RAG_ADAPTER_DIR or --adapter"


class NoAdapterConfigured(UserError):
    """A fine-tuned path was asked for, but no adapter folder is configured."""

    code = "path_unavailable"


class AdapterMismatchError(ConflictError):
    """An adapter was trained on a different base model than the configured decoder."""


def base_model_identity(model: str | Path | None) -> dict:
    """What an adapter's recorded base model is compared with: the weights' name and sha256 (see
    `rag.models.decoder_identity`), plus the names the base may appear under in adapter_config.json."""
    folder, gguf_file = resolve_decoder(model)
    identity = decoder_identity(model)
    aliases = {folder.name, str(folder), str(folder.resolve())} | ({gguf_file} if gguf_file else set())
    identity["aliases"] = sorted(aliases)
    return identity


def check_adapter(adapter_dir: str | Path, base_identity: dict) -> None:
    """Refuse an adapter that was trained on another base model.

    The adapter folder must hold adapter_config.json. When `rag finetune` left a training record with the base
    weights' sha256, that decides; otherwise the name in adapter_config.json's `base_model_name_or_path` must
    match the configured decoder's file or folder name. Raises AdapterMismatchError or ModelNotFoundError.
    """
    adapter_dir = existing_path(adapter_dir, "Adapter folder")
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"'{adapter_dir}' holds no adapter_config.json, so it is not a LoRA adapter folder. (A full fine-tune "
            "is a model folder: set it as the decoder with RAG_DECODER_MODEL instead.)")
    record_path = adapter_dir / TRAINING_RECORD
    if record_path.is_file():
        trained_on = json.loads(record_path.read_text()).get("base_model") or {}
        if trained_on.get("sha256") and base_identity.get("sha256"):
            if trained_on["sha256"] != base_identity["sha256"]:
                raise AdapterMismatchError(
                    f"Adapter '{adapter_dir}' was trained on base model '{trained_on.get('name')}' (sha256 "
                    f"{trained_on['sha256'][:12]}…), but the configured decoder is '{base_identity.get('name')}' "
                    f"(sha256 {base_identity['sha256'][:12]}…). Configure that base model or train a new adapter.")
            return
    recorded = json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not recorded:
        logger.warning("adapter %s does not name its base model; loading it onto %s unchecked", adapter_dir,
                       base_identity.get("name"))
        return
    names = {base_identity.get("name"), *base_identity.get("aliases", [])}
    if recorded not in names and Path(recorded).name not in names:
        raise AdapterMismatchError(
            f"Adapter '{adapter_dir}' was trained on base model '{recorded}', but the configured decoder is "
            f"'{base_identity.get('name')}'. Configure that base model (RAG_DECODER_MODEL) or train a new adapter.")


def checked_adapter(adapter_dir: str | Path | None, base: str | Path | None) -> Path | None:
    if adapter_dir is None:
        return None
    adapter_dir = existing_path(adapter_dir, "Adapter folder")
    check_adapter(adapter_dir, base_model_identity(base))
    return adapter_dir


def apply_adapter(model: Any, adapter_dir: Path) -> Any:
    """The base with the LoRA adapter merged in: merged weights decode as fast as the base model."""
    with transformers_lock():
        from peft import PeftModel

    with transformers_lock():
        adapted = PeftModel.from_pretrained(model, adapter_dir)
    merged = adapted.merge_and_unload() if hasattr(adapted, "merge_and_unload") else adapted
    return merged.eval()


def require_adapter(settings: Settings, path: AnswerPath | None = None) -> Path:
    """The configured adapter folder, or a NoAdapterConfigured error that says how to get one. The one place that
    decides whether a fine-tuned path can answer (pipeline, CLI and API all ask here)."""
    if settings.adapter is None:
        needs = f"The '{path.value}' path needs a LoRA adapter; " if path is not None else ""
        available = ", ".join(p.value for p in available_paths(settings))
        raise NoAdapterConfigured(f"{needs}no adapter configured: {ADAPTER_HINT}. Available paths: {available}.")
    return settings.adapter


def adapter_for(path: AnswerPath, settings: Settings) -> Path | None:
    """The adapter a path answers with: none for the base paths, the configured one for the fine-tuned paths."""
    return require_adapter(settings, path) if path.finetuned else None


def available_paths(settings: Settings) -> list[AnswerPath]:
    """The answer paths these settings can serve: the fine-tuned ones only with an adapter."""
    return [path for path in AnswerPath if not path.finetuned or settings.adapter is not None]
