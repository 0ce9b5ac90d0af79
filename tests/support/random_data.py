"""Deterministic random inputs for tests."""

from __future__ import annotations

import numpy as np


def random_tokens(seed: int, shape, vocab: int, low: int = 3) -> np.ndarray:
    """int32 token ids in [low, vocab) (below `low`: the special tokens tests keep out of prompts)."""
    return np.random.default_rng(seed).integers(low, vocab, shape).astype(np.int32)
