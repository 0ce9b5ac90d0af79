"""Hugging Face safetensors checkpoints -> kvjax checkpoints (orbax + config + tokenizer)."""

from checkpoints_convert.convert import ConversionError, convert

__all__ = ["ConversionError", "convert"]
