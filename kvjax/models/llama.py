"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Phi-3) as Flax NNX modules.

The KV cache is never stored in a module: each attention layer takes its layer's KV segments in
and returns the updated segments, so the hot path stays a pure function of (params, state).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.attention import attend
from kvjax.config import ModelConfig
from kvjax.kv_state import KVSegment
from kvjax.rope import apply_rope, rope_tables

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

# Signature of the cache step a policy supplies: (layer, segments, q, k, v, q_pos, new_pos, window,
# scale) -> (attention output [B, T, K, G, D], updated segments). A policy that reads Locret's
# retaining heads (`Policy.reads_retaining_scores`) also takes `retain_scores=` float32[B, T, K].
CacheStep = Callable[..., tuple[jax.Array, tuple[KVSegment, ...]]]


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, fan_in: int) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype) * fan_in**-0.5)


class RMSNorm(nnx.Module):
    """Root-mean-square norm, computed in float32 and cast back (as the reference implementations)."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def retaining_features(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """[B, T, (H + 2K) * D]: a retaining head's input, q, k and v of each token flattened and concatenated.

    q [B, T, H, D], k and v [B, T, K, D] straight from the projections, before rotary embedding, so the
    score of a token depends on what it is, not on where it sits.
    """
    b, t = q.shape[:2]
    return jnp.concatenate([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], axis=-1)


def retaining_head_scores(features: jax.Array, fc1: jax.Array, fc2: jax.Array, act: str) -> jax.Array:
    """float32[..., K]: Locret's retaining head, fc2(act(fc1(features))), both layers without bias.

    features [..., C] with C = (H + 2K) * D; fc1 [C, F]; fc2 [F, K]. The one implementation both
    inference (RetainingHead) and training (kvjax.train.locret_heads) run.
    """
    hidden = _ACTIVATIONS[act](jnp.einsum("...c,cf->...f", features, fc1, preferred_element_type=jnp.float32))
    return jnp.einsum("...f,fk->...k", hidden.astype(fc2.dtype), fc2, preferred_element_type=jnp.float32)


class RetainingHead(nnx.Module):
    """Locret's retaining head of one layer: an importance score per token and KV head, predicted from
    that token's pre-RoPE q, k, v (Huang et al., 2024). Present only when config.retaining_hidden is set."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        f, k = config.retaining_hidden, config.num_kv_heads
        self.act = config.hidden_act
        self.fc1 = _param(rngs, (c, f), dtype, c)  # [C, F]
        self.fc2 = _param(rngs, (f, k), dtype, f)  # [F, K]

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """float32[B, T, K] from q [B, T, H, D], k and v [B, T, K, D] before rotary embedding."""
        return retaining_head_scores(retaining_features(q, k, v), self.fc1[...], self.fc2[...], self.act)


class Attention(nnx.Module):
    """Grouped-query attention with rotary embeddings and optional q/k/v and output biases."""

    def __init__(self, config: ModelConfig, layer: int, dtype, rngs: nnx.Rngs):
        e, h, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.config, self.layer = config, layer
        self.q_proj = _param(rngs, (e, h, d), dtype, e)  # [E, H, D]
        self.k_proj = _param(rngs, (e, k, d), dtype, e)  # [E, K, D]
        self.v_proj = _param(rngs, (e, k, d), dtype, e)  # [E, K, D]
        self.o_proj = _param(rngs, (h, d, e), dtype, h * d)  # [H, D, E]
        if config.qkv_bias:
            self.q_bias = nnx.Param(jnp.zeros((h, d), dtype))
            self.k_bias = nnx.Param(jnp.zeros((k, d), dtype))
            self.v_bias = nnx.Param(jnp.zeros((k, d), dtype))
        if config.o_bias:
            self.o_bias = nnx.Param(jnp.zeros((e,), dtype))
        if config.retaining_hidden is not None:
            self.retain = RetainingHead(config, dtype, rngs)

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B, T, H, D], k and v [B, T, K, D], before rotary embedding."""
        q = jnp.einsum("bte,ehd->bthd", x, self.q_proj[...])
        k = jnp.einsum("bte,ekd->btkd", x, self.k_proj[...])
        v = jnp.einsum("bte,ekd->btkd", x, self.v_proj[...])
        if self.config.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        return q, k, v

    def __call__(
        self, x: jax.Array, positions: jax.Array, valid: jax.Array, rope: tuple[jax.Array, jax.Array],
        segments: tuple[KVSegment, ...] | None, cache_step: CacheStep | None, retaining_scores: bool = False,
    ) -> tuple[jax.Array, tuple[KVSegment, ...] | None]:
        cfg = self.config
        b, t, _ = x.shape
        q, k, v = self.project(x)
        step_kwargs = {}
        if retaining_scores:  # Locret: scores from the projections, before RoPE, handed to its cache step
            if cfg.retaining_hidden is None:
                raise ValueError("the policy reads Locret retaining-head scores but this model carries no retaining "
                                 "heads; attach them with kvjax.policies.locret.with_retaining_heads(model, DIR)")
            step_kwargs["retain_scores"] = self.retain(q, k, v)  # float32[B, T, K]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = q.reshape(b, t, cfg.num_kv_heads, cfg.group_size, cfg.head_dim)  # [B, T, K, G, D]
        new_pos = jnp.where(valid, positions, -1)  # [B, T]
        window, scale = cfg.sliding_window(self.layer), cfg.head_dim**-0.5
        if segments is None:  # full causal forward over the chunk itself, no cache
            k_pos = jnp.broadcast_to(new_pos[:, None, :], (b, cfg.num_kv_heads, t))  # [B, K, T]
            out = attend(q, k.swapaxes(1, 2), v.swapaxes(1, 2), k_pos, positions, window, scale)
        else:
            out, segments = cache_step(self.layer, segments, q, k, v, positions, new_pos, window, scale, **step_kwargs)
        out = jnp.einsum("bthd,hde->bte", out.reshape(b, t, cfg.num_heads, cfg.head_dim), self.o_proj[...])
        if cfg.o_bias:
            out = out + self.o_bias[...]
        return out, segments


class MLP(nnx.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        e, f = config.hidden_size, config.intermediate_size
        self.act = _ACTIVATIONS[config.hidden_act]
        self.gate_proj = _param(rngs, (e, f), dtype, e)  # [E, F]
        self.up_proj = _param(rngs, (e, f), dtype, e)  # [E, F]
        self.down_proj = _param(rngs, (f, e), dtype, f)  # [F, E]
        self.bias = config.mlp_bias
        if config.mlp_bias:
            self.gate_bias = nnx.Param(jnp.zeros((f,), dtype))
            self.up_bias = nnx.Param(jnp.zeros((f,), dtype))
            self.down_bias = nnx.Param(jnp.zeros((e,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = jnp.einsum("bte,ef->btf", x, self.gate_proj[...])
        up = jnp.einsum("bte,ef->btf", x, self.up_proj[...])
        if self.bias:
            gate, up = gate + self.gate_bias[...], up + self.up_bias[...]
        out = jnp.einsum("btf,fe->bte", self.act(gate) * up, self.down_proj[...])
        return out + self.down_bias[...] if self.bias else out


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attn = Attention(config, layer, dtype, rngs)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)

    def __call__(self, x, positions, valid, rope, segments, cache_step, retaining_scores: bool = False):
        attn_out, segments = self.attn(
            self.input_norm(x), positions, valid, rope, segments, cache_step, retaining_scores
        )
        x = x + attn_out
        return x + self.mlp(self.post_attention_norm(x)), segments


class Transformer(nnx.Module):
    """Token embedding, decoder blocks, final norm and the output projection."""

    def __init__(self, config: ModelConfig, dtype=jnp.bfloat16, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Param(
            jax.random.normal(rngs.params(), (config.vocab_size, config.hidden_size)).astype(dtype)
        )  # [V, E]
        self.blocks = nnx.List([Block(config, i, dtype, rngs) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), dtype, config.hidden_size)

    def __call__(
        self, tokens: jax.Array, positions: jax.Array, valid: jax.Array,
        cache: tuple[tuple[KVSegment, ...], ...] | None = None, cache_step: CacheStep | None = None,
        seq_len: jax.Array | None = None, retaining_scores: bool = False,
    ) -> tuple[jax.Array, tuple[tuple[KVSegment, ...], ...] | None]:
        """Final-normed hidden states [B, T, E] for tokens int32[B, T] at positions int32[B, T].

        `valid` bool[B, T] marks real tokens (padding is never written to the cache nor attended).
        With a cache, `cache_step` (from the policy) writes and attends; the new cache is returned.
        `seq_len` is the sequence length this call belongs to (it picks LongRoPE's factors); by
        default the largest real position plus one, which is right for a single forward.
        `retaining_scores` (static) hands each layer's Locret retaining-head scores to `cache_step`.
        """
        x = self.embed[...][tokens]  # [B, T, E]
        if seq_len is None:
            seq_len = jnp.max(jnp.where(valid, positions + 1, 0))
        rope = rope_tables(self.config.rope, self.config.head_dim, positions, seq_len)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, segments = block(
                x, positions, valid, rope, None if cache is None else cache[i], cache_step, retaining_scores
            )
            new_cache.append(segments)
        return self.final_norm(x), None if cache is None else tuple(new_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32[..., V] next-token logits from final-normed hidden states [..., E]."""
        head = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]  # [E, V]
        return jnp.einsum("...e,ev->...v", hidden, head, preferred_element_type=jnp.float32)
