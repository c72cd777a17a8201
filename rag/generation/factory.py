"""Builds the configured decoder once per process: `load_generator(settings)`."""

from __future__ import annotations

import threading
from pathlib import Path

from rag.config import Settings
from rag.errors import UserError
from rag.generation.base import Generator
from rag.generation.openai_backend import OpenAIGenerator
from rag.generation.transformers_backend import TransformersGenerator
from rag.models import load_tokenizer

_GENERATORS: dict[tuple, Generator] = {}
_GENERATORS_LOCK = threading.Lock()


def load_generator(settings: Settings, adapter_dir: str | Path | None = None) -> Generator:
    """The configured decoder, built once per process per (backend, model, adapter, device, window).

    `adapter_dir` selects the fine-tuned decoder (the pipeline passes `adapter_for(path, settings)`); the settings'
    own adapter_dir is not applied implicitly, so the base paths stay on the base model. With the openai backend
    an adapter cannot be loaded locally: the request names the adapter folder's name as the model, which is how
    vLLM serves LoRA adapters (`--enable-lora --lora-modules <folder name>=<adapter folder>`).
    """
    key = _cache_key(settings, adapter_dir)
    with _GENERATORS_LOCK:  # one load per key even when requests race at start-up
        if key not in _GENERATORS:
            _GENERATORS[key] = _build_generator(settings, adapter_dir)
        return _GENERATORS[key]


def clear_generator_cache() -> None:
    """Forget loaded decoders (tests; or to free memory after changing settings)."""
    with _GENERATORS_LOCK:
        _GENERATORS.clear()
    load_tokenizer.cache_clear()


def _canonical(path: str | Path | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


def _cache_key(settings: Settings, adapter_dir: str | Path | None) -> tuple:
    if settings.backend == "openai":
        return ("openai", settings.openai_base_url, _served_model(settings, adapter_dir), settings.openai_api_key,
                settings.openai_timeout, settings.openai_max_retries, _canonical(settings.decoder_model),
                settings.context_window)
    return ("transformers", _canonical(settings.decoder_model), _canonical(adapter_dir), settings.device,
            settings.context_window, settings.decoder_threads)


def _served_model(settings: Settings, adapter_dir: str | Path | None) -> str:
    return Path(adapter_dir).name if adapter_dir else settings.openai_model


def _build_generator(settings: Settings, adapter_dir: str | Path | None) -> Generator:
    if settings.backend == "openai":
        # decoder_model names the local copy of the served model's tokenizer with this backend.
        return OpenAIGenerator(settings.openai_base_url, _served_model(settings, adapter_dir),
                               settings.openai_api_key, settings.openai_timeout, settings.openai_max_retries,
                               tokenizer_path=settings.decoder_model, context_window=settings.context_window,
                               cache_dir=settings.decoder_cache_dir)
    if settings.backend == "transformers":
        return TransformersGenerator(settings.decoder_model, settings.device, adapter_dir, settings.context_window,
                                     settings.decoder_cache_dir, settings.decoder_threads)
    raise UserError(f"unknown backend '{settings.backend}'; allowed: transformers, openai")
