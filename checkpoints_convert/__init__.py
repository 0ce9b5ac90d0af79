"""Hugging Face safetensors checkpoints and llama.cpp GGUF files -> kvjax checkpoints (orbax + config + tokenizer)."""

from checkpoints_convert.convert import ConversionError, convert

__all__ = ["ConversionError", "convert"]
