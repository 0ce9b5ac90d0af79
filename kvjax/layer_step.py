"""What an attention layer hands its KV policy: the model core knows no method.

Each layer passes a static `LayerContext`, the step's arrays (`StepInputs`: q, k, v after and before
RoPE, positions) and the phase (`Prefill` or `Decode`); the policy writes them into the layer's
segments, attends, and returns the output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Prefill:
    """Phase: a chunk of the prompt. prompt_lengths: int32[B], each whole prompt's length. `whole_prompt`
    (static): the chunk is the whole prompt, written into an empty state, so whatever a policy evicts
    afterwards, its entries sit at slot = position while the chunk attends (the causal, blocked path)."""

    prompt_lengths: jax.Array
    whole_prompt: bool = False


@dataclasses.dataclass(frozen=True)
class Decode:
    """Phase: one new token per sequence."""


Phase = Prefill | Decode


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """What a layer's step knows besides its arrays. `index` is the layer (an int32 scalar inside a
    scanned run of layers, so per-layer behaviour must come from the segments' static fields or from
    arrays indexed by it); `window` the sliding window (None: full causal); `impl` the attention
    implementation, one of kvjax.attention.ATTENTION_IMPLS."""

    index: int | jax.Array
    window: int | None
    scale: float
    impl: str = "auto"


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """A chunk's (or a decode token's) arrays for one layer, restricted to some KV heads by `heads`.

    q: [B, T, K, G, D] and k: [B, T, K, D] after RoPE; v: [B, T, K, D]; q_raw: [B, T, K, G, D] and
    k_raw: [B, T, K, D] before RoPE (what position-independent scorers read); q_pos: int32[B, T];
    new_pos: int32[B, T], the positions to record (-1 for padding); score: float32[B, T, K] or None,
    a per-token score the policy computed for this step (e.g. Locret's retaining heads).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_raw: jax.Array
    k_raw: jax.Array
    q_pos: jax.Array
    new_pos: jax.Array
    score: jax.Array | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    def heads(self, heads: tuple[int, ...]) -> StepInputs:
        """These inputs for the given KV heads only (every per-head array along its head axis)."""
        pick = lambda x: None if x is None else take_heads(x, heads, 2, self.num_kv_heads)  # noqa: E731
        return dataclasses.replace(
            self,
            q=pick(self.q),
            k=pick(self.k),
            v=pick(self.v),
            q_raw=pick(self.q_raw),
            k_raw=pick(self.k_raw),
            score=pick(self.score),
        )


def take_heads(x: jax.Array, heads: tuple[int, ...], axis: int, total: int) -> jax.Array:
    """The given KV heads of x along `axis`: a slice when they are a contiguous range, else a gather."""
    if heads == tuple(range(heads[0], heads[0] + len(heads))):
        if len(heads) == total:
            return x
        return jax.lax.slice_in_dim(x, heads[0], heads[0] + len(heads), axis=axis)
    return jnp.take(x, np.asarray(heads), axis=axis)


def merge_heads(outs: list[jax.Array], segments: tuple[Any, ...], axis: int) -> jax.Array:
    """Reassembles per-segment outputs into the layer's KV-head order."""
    if len(outs) == 1:
        return outs[0]
    order = np.argsort(np.concatenate([np.asarray(s.heads) for s in segments]))
    return jnp.take(jnp.concatenate(outs, axis=axis), order, axis=axis)
