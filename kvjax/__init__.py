"""kvjax: KV-cache compression for long-context LLM inference in JAX."""

from kvjax import policies
from kvjax.checkpoint import CheckpointError, bundled_models, load
from kvjax.config import ModelConfig, RopeConfig, UnsupportedModelError
from kvjax.inference import decode_step, generate, logits, prefill
from kvjax.kv_state import EvictionSegment, KVSegment, KVState, kv_bytes
from kvjax.language_model import LanguageModel, init_model
from kvjax.pipeline import Pipeline, pipeline

__all__ = [
    "CheckpointError",
    "EvictionSegment",
    "KVSegment",
    "KVState",
    "LanguageModel",
    "ModelConfig",
    "Pipeline",
    "RopeConfig",
    "UnsupportedModelError",
    "bundled_models",
    "decode_step",
    "generate",
    "init_model",
    "kv_bytes",
    "load",
    "logits",
    "pipeline",
    "policies",
    "prefill",
]
