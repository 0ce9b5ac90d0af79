"""What every compression policy provides: its buffer layout and its per-layer cache step."""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.kv_state import KVSegment, KVState, empty_segment

@dataclasses.dataclass(frozen=True)
class SegmentSpec:
    """One buffer of a layer: which KV heads, how many slots, how many entries the policy keeps."""

    heads: tuple[int, ...]
    capacity: int
    budget: int | None = None  # None: everything written is kept


Layout = tuple[tuple[SegmentSpec, ...], ...]  # per layer, its segments


@dataclasses.dataclass(frozen=True)
class Policy(abc.ABC):
    """A frozen, hashable set of hyperparameters plus pure functions; static under jit.

    Subclasses decide capacities at trace time (`layout`) and how each layer's segments change when
    a prefill chunk or a decode token arrives (`cache_step`). `attention_impl` picks how attention
    runs (kvjax.attention.ATTENTION_IMPLS); keyword-only so subclasses keep positional fields.
    """

    attention_impl: str = dataclasses.field(default="auto", kw_only=True)

    @abc.abstractmethod
    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        """Segments and capacities while prefilling a prompt of `prompt_len` tokens in chunks."""

    @abc.abstractmethod
    def cache_step(
        self, layer: int, segments: tuple[KVSegment, ...], q: jax.Array, k: jax.Array, v: jax.Array,
        q_pos: jax.Array, new_pos: jax.Array, window: int | None, scale: float, *,
        prompt_lengths: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[KVSegment, ...]]:
        """Writes a chunk's (or a decode token's) k, v into a layer's segments and attends.

        q: [B, T, K, G, D] after RoPE; k, v: [B, T, K, D]; q_pos: int32[B, T]; new_pos: the positions
        to record (-1 for padding); prompt_lengths: int32[B] while prefilling, None while decoding.
        Returns the output [B, T, K, G, D] and the new segments.
        """

    def finalize(self, config: ModelConfig, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """The state decoding starts from, after the last prefill chunk (e.g. the prompt compressed)."""
        return state

    def scored(self) -> bool:
        """Whether segments carry a per-entry score buffer."""
        return False

    def reads_retaining_scores(self) -> bool:
        """Whether `cache_step` takes the model's Locret retaining-head scores (`retain_scores=`
        float32[B, T, K], computed from pre-RoPE q, k, v); only then does the model compute them."""
        return False

    def allocate(
        self, config: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int, chunk: int, dtype
    ) -> KVState:
        """An empty prefill state sized by `layout`."""
        layers = tuple(
            tuple(
                empty_segment(batch, s.heads, s.capacity, config.head_dim, dtype, self.scored(), s.budget)
                for s in layer
            )
            for layer in self.layout(config, prompt_len, max_new_tokens, chunk)
        )
        return KVState(layers=layers, length=jnp.zeros((batch,), jnp.int32))
