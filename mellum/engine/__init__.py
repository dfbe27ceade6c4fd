"""Inference engine over token ids: KV and prefix caches, sampling, speculative decoding, continuous batching,
int8 weights, and backends (native in-process, OpenAI-compatible remote). It knows nothing about text or HTTP."""

from mellum.engine.api import STOP_REASONS, Engine, GenerationResult
from mellum.engine.kv_cache import KVCache
from mellum.engine.native import EngineOptions, NativeEngine
from mellum.engine.prefix_cache import PrefixCache
from mellum.engine.sampling import SamplingParams

__all__ = ["STOP_REASONS", "Engine", "EngineOptions", "GenerationResult", "KVCache", "NativeEngine",
           "OpenAIEngine", "PrefixCache", "SamplingParams"]


def __getattr__(name):
    if name == "OpenAIEngine":  # needs httpx (the `serve` extra): imported on first use
        from mellum.engine.openai import OpenAIEngine

        return OpenAIEngine
    raise AttributeError(name)
