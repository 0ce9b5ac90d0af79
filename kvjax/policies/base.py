"""What every compression policy provides: its buffer layout and its per-layer cache step."""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.kv_state import KVSegment, KVState, empty_segment

# Per layer, per segment: (KV-head indices, capacity in tokens).
Layout = tuple[tuple[tuple[tuple[int, ...], int], ...], ...]


@dataclasses.dataclass(frozen=True)
class Policy(abc.ABC):
    """A frozen, hashable set of hyperparameters plus pure functions; static under jit.

    Subclasses decide capacities at trace time (`layout`) and how each layer's segments change when
    a prefill chunk or a decode token arrives (`cache_step`).
    """

    @abc.abstractmethod
    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int) -> Layout:
        """Segments and capacities for a prompt of `prompt_len` tokens followed by decoding."""

    @abc.abstractmethod
    def cache_step(
        self, layer: int, segments: tuple[KVSegment, ...], q: jax.Array, k: jax.Array, v: jax.Array,
        q_pos: jax.Array, new_pos: jax.Array, window: int | None, scale: float,
    ) -> tuple[jax.Array, tuple[KVSegment, ...]]:
        """Writes a chunk's (or a decode token's) k, v into a layer's segments and attends.

        q: [B, T, K, G, D] after RoPE; k, v: [B, T, K, D]; q_pos: int32[B, T]; new_pos: the positions
        to record (-1 for padding). Returns the output [B, T, K, G, D] and the new segments.
        """

    def allocate(
        self, config: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int, dtype
    ) -> KVState:
        """An empty state sized by `layout`: every byte here is a byte the policy chose to keep."""
        layers = tuple(
            tuple(empty_segment(batch, heads, capacity, config.head_dim, dtype) for heads, capacity in layer)
            for layer in self.layout(config, prompt_len, max_new_tokens)
        )
        return KVState(layers=layers, length=jnp.zeros((batch,), jnp.int32))
