"""Independent numpy recomputation of per-layer attention for policy tests.

Runs the prompt through the NNX blocks one at a time (no cache, no policy code) and returns each
layer's post-RoPE queries and keys, so tests can score tokens with the papers' formulas in numpy.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kvjax.layer_step import LayerContext
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
    for layer, block in enumerate(model.blocks):
        q, k, v = block.attn.project(block.input_norm(x))
        out.append((np.asarray(apply_rope(q, *rope)), np.asarray(apply_rope(k, *rope)), np.asarray(v)))
        ctx = LayerContext(layer, m.config.sliding_window(layer), m.config.head_dim**-0.5)
        x, _, _ = block(x, positions, valid, rope, ctx, None, None, None)
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


def masked_forward_logits(m, tokens: np.ndarray, prompt_len: int, kept: list[np.ndarray]) -> np.ndarray:
    """float64[B, T - prompt_len, V] logits of the tokens after the prompt when their queries see, per
    layer and KV head, only the kept prompt positions (kept[layer]: bool[B, K, prompt_len]) plus every
    later token: what decoding over a cache compressed once at the end of the prompt computes."""
    model, cfg = m.module(), m.config
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    rope = rope_tables(cfg.rope, cfg.head_dim, positions, jnp.int32(t))
    x = np.asarray(model.embed[...][tokens], np.float64)
    causal = np.tril(np.ones((t, t), bool))
    for block, keep in zip(model.blocks, kept):
        q, k, v = block.attn.project(block.input_norm(jnp.asarray(x, jnp.float32)))
        q, k = np.asarray(apply_rope(q, *rope), np.float64), np.asarray(apply_rope(k, *rope), np.float64)
        q = q.reshape(b, t, cfg.num_kv_heads, cfg.group_size, cfg.head_dim)
        visible = np.broadcast_to(causal, (b, cfg.num_kv_heads, t, t)).copy()  # [B, K, Tq, Tk]
        visible[:, :, prompt_len:, :prompt_len] &= keep[:, :, None, :]
        logits = np.einsum("btkgd,bskd->bkgts", q, k) / np.sqrt(cfg.head_dim)
        logits = np.where(visible[:, :, None], logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        heads = np.einsum("bkgts,bskd->btkgd", p, np.asarray(v, np.float64)).reshape(b, t, cfg.num_heads, cfg.head_dim)
        x = x + np.einsum("bthd,hde->bte", heads, np.asarray(block.attn.o_proj[...], np.float64))
        x = x + np.asarray(block.mlp(block.post_attention_norm(jnp.asarray(x, jnp.float32))), np.float64)
    hidden = model.final_norm(jnp.asarray(x[:, prompt_len:], jnp.float32))
    return np.asarray(model.logits(hidden), np.float64)
