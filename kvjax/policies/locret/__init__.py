"""Locret: learned retaining heads rank tokens for eviction (the policy, its heads' files, training)."""

from kvjax.policies.locret.heads import (
    HEADS_DIR,
    HEADS_JSON,
    load_retaining_heads,
    random_retaining_heads,
    retaining_features,
    retaining_head_scores,
    save_retaining_heads,
)
from kvjax.policies.locret.policy import Locret, retaining_scores

__all__ = [
    "HEADS_DIR",
    "HEADS_JSON",
    "Locret",
    "load_retaining_heads",
    "random_retaining_heads",
    "retaining_features",
    "retaining_head_scores",
    "retaining_scores",
    "save_retaining_heads",
]
