"""The decoder stage: chat messages in, text out, from a local `transformers` model or an OpenAI-compatible server.

Both backends take the same `GenerationParams`, count tokens the same way, stream (`stream()` joined equals
`generate().text` at temperature 0), and score closed-set answers by likelihood (`option_logprobs`). Models load
once per process through `load_generator(settings)`; nothing is ever downloaded.

    base.py                  the seam: Generator protocol, GenerationParams, Generation, GenerationStream
    transformers_backend.py  a decoder in this process (threaded streaming, stop strings, option scoring)
    openai_backend.py        a decoder behind an OpenAI-compatible server
    adapters.py              LoRA adapters: which path needs one, base-model checks, merging
    factory.py               load_generator(settings): the configured backend, once per process
"""

from rag.generation.adapters import (
    AdapterMismatchError,
    NoAdapterConfigured,
    adapter_for,
    available_paths,
    base_model_identity,
    check_adapter,
    require_adapter,
)
from rag.generation.base import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_NEW_TOKENS,
    Generation,
    GenerationParams,
    GenerationStream,
    Generator,
    GeneratorUnavailable,
)
from rag.generation.factory import clear_generator_cache, load_generator
from rag.generation.openai_backend import OpenAIGenerator
from rag.generation.transformers_backend import TransformersGenerator

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS", "MAX_NEW_TOKENS", "AdapterMismatchError", "Generation", "GenerationParams",
    "GenerationStream", "Generator", "GeneratorUnavailable", "NoAdapterConfigured", "OpenAIGenerator",
    "TransformersGenerator", "adapter_for", "available_paths", "base_model_identity", "check_adapter",
    "clear_generator_cache", "load_generator", "require_adapter",
]
