"""Model definitions."""

from kvjax.models.llama import Transformer

__all__ = ["Transformer"]
