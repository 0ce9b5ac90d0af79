"""Next-token sampling: greedy, temperature, top-k and top-p, with per-sequence settings as arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass(frozen=True)
class SamplingParams:
    """Per-sequence sampling settings. Arrays, not static values, so changing them never recompiles.

    temperature 0 means greedy; top_k 0 means no top-k cut; top_p 1 means no nucleus cut.
    """

    temperature: jax.Array  # float32[B]
    top_k: jax.Array  # int32[B]
    top_p: jax.Array  # float32[B]

    @classmethod
    def create(cls, batch: int, temperature=0.0, top_k=0, top_p=1.0) -> SamplingParams:
        temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))
        top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (batch,))
        top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (batch,))
        if not bool(jnp.all(temperature >= 0)):
            raise ValueError("temperature must be >= 0 (0 means greedy)")
        if not bool(jnp.all((top_p > 0) & (top_p <= 1))):
            raise ValueError("top_p must lie in (0, 1]")
        if not bool(jnp.all(top_k >= 0)):
            raise ValueError("top_k must be >= 0 (0 disables it)")
        return cls(temperature=temperature, top_k=top_k, top_p=top_p)


def filtered_logits(logits: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Temperature-scaled logits sorted descending with top-k / top-p cuts applied, and the sort order.

    logits: float32[B, V] -> (float32[B, V] with -inf outside the kept set, int32[B, V] vocabulary ids).
    """
    scaled = logits / jnp.maximum(params.temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)  # [B, V]
    ranked = jnp.take_along_axis(scaled, order, axis=-1)  # [B, V], descending
    rank = jnp.arange(logits.shape[-1])[None, :]  # [1, V]
    keep = (params.top_k[:, None] == 0) | (rank < params.top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
    keep &= (mass_before < params.top_p[:, None]) | (rank == 0)
    return jnp.where(keep, ranked, -jnp.inf), order


def sample(logits: jax.Array, params: SamplingParams, key: jax.Array) -> jax.Array:
    """int32[B] next tokens from float32[B, V] logits; rows with temperature 0 take the argmax."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic(_):
        ranked, order = filtered_logits(logits, params)
        choice = jax.random.categorical(key, ranked, axis=-1)  # [B] index into the ranking
        drawn = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(params.temperature > 0, drawn, greedy)

    # Skip the vocabulary sort entirely when every row is greedy.
    return jax.lax.cond(jnp.any(params.temperature > 0), stochastic, lambda _: greedy, None)
