"""Independent numpy recomputation of per-layer attention for policy tests.

Runs the prompt through the NNX blocks one at a time (no cache, no policy code) and returns each
layer's post-RoPE queries and keys, so tests can score tokens with the papers' formulas in numpy.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kvjax.rope import apply_rope, rope_tables


def layer_queries_keys(m, tokens: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per layer: q [B, T, H, D], k [B, T, K, D] after RoPE and v [B, T, K, D], for one full prompt."""
    model = m.module()
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    valid = jnp.ones((b, t), bool)
    rope = rope_tables(m.config.rope, m.config.head_dim, positions, jnp.int32(t))
    x = model.embed[...][tokens]
    out = []
    for block in model.blocks:
        q, k, v = block.attn.project(block.input_norm(x))
        out.append((np.asarray(apply_rope(q, *rope)), np.asarray(apply_rope(k, *rope)), np.asarray(v)))
        x, _ = block(x, positions, valid, rope, None, None)
    return out


def causal_probs(q: np.ndarray, k: np.ndarray, group: int) -> np.ndarray:
    """float64[B, K, G, T, T] causal softmax weights; q [B, T, H, D], k [B, T, K, D]."""
    b, t, h, d = q.shape
    q = q.reshape(b, t, h // group, group, d).astype(np.float64)
    logits = np.einsum("btkgd,bskd->bkgts", q, k.astype(np.float64)) / np.sqrt(d)
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)
