"""What every compression policy provides: its buffer layout and its per-layer step."""

from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.kv_state import KVState, empty_segment
from kvjax.layer_step import LayerContext, Phase, StepInputs, merge_heads


@dataclasses.dataclass(frozen=True)
class SegmentSpec:
    """One buffer of a layer: which KV heads, how many slots, how many entries the policy keeps."""

    heads: tuple[int, ...]
    capacity: int
    budget: int | None = None  # None: everything written is kept (a `KVSegment`); else an `EvictionSegment`


Layout = tuple[tuple[SegmentSpec, ...], ...]  # per layer, its segments


@dataclasses.dataclass(frozen=True)
class Policy(abc.ABC):
    """A frozen, hashable set of hyperparameters plus pure functions; static under jit.

    Subclasses decide capacities at trace time (`layout`) and how a segment changes when a prefill
    chunk or a decode token arrives (`segment_step`, called per segment by `step`, which a policy
    overrides only when its segments are not independent). A learned policy keeps its arrays in
    `params` (a pytree, excluded from hashing): the jitted paths pass them as traced arguments.
    """

    params: Any = dataclasses.field(default=None, kw_only=True, compare=False, hash=False, repr=False)
    # The fraction of the prompt's entries to remove (kvpress's meaning), resolved against the prompt's
    # length by `resolve` into the policy's own token budget; None: the policy's fields as they are.
    compression_ratio: float | None = dataclasses.field(default=None, kw_only=True)
    # What a policy is built from besides its fields (for the CLI's --policy-file), or None.
    file_needed: ClassVar[str | None] = None
    # Whether its prefill writes every prompt entry in place (slot = position) into plain `KVSegment`s and
    # leaves any compression to `finalize` (then it attends as Full: `prefills_as_full`, `packed_tail`).
    prefills_in_place: ClassVar[bool] = False

    @classmethod
    def from_file(cls, path: str | os.PathLike, config: ModelConfig, **options) -> Policy:
        """The policy built from `file_needed` for a model of `config`, with `options` for its fields."""
        raise ValueError(f"{cls.__name__} is not built from a file; set its fields instead")

    def with_budget(self, tokens: int) -> Policy | None:
        """This policy keeping about `tokens` entries per KV head, by its own rule for splitting them, or
        None when it has no token budget (it then runs at its own settings: Full, KIVI, CSKV, ...)."""
        if tokens < 1:
            raise ValueError(f"a token budget must be positive; got {tokens}")
        return None

    @property
    def resolved(self) -> bool:
        """Whether no `compression_ratio` waits for a prompt length, here or in a wrapped policy."""
        inner = getattr(self, "base", None)
        return self.compression_ratio is None and (not isinstance(inner, Policy) or inner.resolved)

    def resolve(self, prompt_len: int) -> Policy:
        """The policy that runs on a prompt of `prompt_len` tokens: with `compression_ratio` r set, this
        policy keeping int(prompt_len * (1 - r)) tokens per KV head (at least 1; kvpress's rounding) by its
        own `with_budget` rule; wrapped policies (a `base` field) resolve too; otherwise itself."""
        if self.resolved:
            return self
        policy, inner = self, getattr(self, "base", None)
        if isinstance(inner, Policy) and not inner.resolved:
            policy = dataclasses.replace(policy, base=inner.resolve(prompt_len))
        ratio = self.compression_ratio
        if ratio is None:
            return policy
        if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(
                f"{type(self).__name__}: compression_ratio is the fraction removed, in [0, 1); got {ratio!r}"
            )
        resolved = dataclasses.replace(policy, compression_ratio=None).with_budget(
            max(1, int(prompt_len * (1 - ratio)))
        )
        if resolved is None:
            raise ValueError(
                f"{type(self).__name__} keeps no token budget, so compression_ratio does not apply; set its own fields"
            )
        return resolved

    @abc.abstractmethod
    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        """Segments and capacities while prefilling a prompt of `prompt_len` tokens in chunks."""

    def step(
        self, ctx: LayerContext, segments: tuple[Any, ...], x: StepInputs, phase: Phase
    ) -> tuple[jax.Array, tuple[Any, ...]]:
        """Writes the step into a layer's segments and attends: the output [B, T, K, G, D] and the new
        segments: each segment independently, through `segment_step`, unless a policy overrides this."""
        outs, updated = [], []
        for seg in segments:
            out, seg = self.segment_step(ctx, seg, x.heads(seg.heads), phase)
            outs.append(out)
            updated.append(seg)
        return merge_heads(outs, segments, axis=2), tuple(updated)

    @abc.abstractmethod
    def segment_step(self, ctx: LayerContext, segment: Any, x: StepInputs, phase: Phase) -> tuple[jax.Array, Any]:
        """One segment's step; x holds only its heads. Returns ([B, T, Hs, G, D], new segment)."""

    def layer_step(
        self, ctx: LayerContext, segments: tuple[Any, ...], shared: Any, x: StepInputs, phase: Phase
    ) -> tuple[jax.Array, tuple[Any, ...], Any]:
        """What the model calls per layer: `step`, plus `shared`, the state carried from layer to layer
        (`KVState.shared`, e.g. a cross-layer merge), returned unchanged unless a policy overrides this."""
        out, segments = self.step(ctx, segments, x, phase)
        return out, segments, shared

    def finalize(self, config: ModelConfig, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """The state decoding starts from, after the last prefill chunk (e.g. the prompt compressed)."""
        return state

    def prefill_chunk(self, config: ModelConfig, prompt_len: int) -> int | None:
        """The prefill chunk when the caller passes chunk_size=None: None for kvjax's default (512 tokens);
        policies that evict as they prefill take the whole prompt (`TokenEviction`). It depends on the
        prompt, never on the batch, so a prompt's result does not depend on the prompts batched with it."""
        return None

    def prefills_as_full(self, config: ModelConfig, prompt_len: int, chunk: int) -> bool:
        """Whether prefilling a prompt of `prompt_len` tokens in chunks of `chunk` attends as Full does (each
        chunk to every earlier prompt token, none compressed yet) and gives the state this policy's own chunk
        (`prefill_chunk`) gives: then its hidden states are Full's and one forward can prefill it beside
        other such policies (`kvjax.inference.prefill_shared`). Default: `prefills_in_place`."""
        return self.prefills_in_place

    @property
    def packed_tail(self) -> int | None:
        """n where a packed prefill (`kvjax.packing`) builds this policy's state exactly, else None. Each
        prompt's entries but its last n are unpacked from the packed rows into the policy's empty prefill
        state at slot = position (a score buffer, and anything else it holds, left empty); then the policy's
        own prefill step runs once per layer on each prompt's last n tokens, with the q, k and v the packed
        rows computed for them, and `finalize`. That is its unpacked prefill wherever the prefill writes
        every prompt entry in place, evicts nothing, and reads no query but each prompt's last n: 0 for
        Full, Quest and Knorm, SnapKV's observation window. Default: 0 where `prefills_in_place`, else
        None (policies that evict, prune or re-encode the prompt while prefilling)."""
        return 0 if self.prefills_in_place else None

    def prefill_tokens(self, config: ModelConfig, prompt_len: int, chunk: int) -> tuple[int, ...] | None:
        """Per layer, how many of a prefill chunk's `chunk` tokens it computes (non-increasing, static), for
        policies that prune tokens between layers as they prefill (PyramidInfer, LazyLLM); None (the default):
        every layer computes all. A policy that returns counts defines `prune(layer, n, positions, valid,
        shared, phase)`, which the model calls where the count drops (`kvjax.policies.prefill_pruning`)."""
        return None

    def position_limit(self, chunk: int) -> int | None:
        """None when attention rotates each token at its own position, so the model's context bounds the
        sequence (the default); else the RoPE positions this policy ever uses while prefilling in chunks
        of `chunk` tokens and decoding, however long the sequence (StreamingLLM's position shift), which
        then replaces the sequence's length in the context check."""
        return None

    def scored(self) -> bool:
        """Whether its `EvictionSegment`s carry a per-entry score buffer (segments with a budget only)."""
        return False

    def decode_room(self, config: ModelConfig, prompt_len: int, max_new_tokens: int) -> int | None:
        """How many decode steps a state prefilled with room for `max_new_tokens` takes before a step would
        have to overwrite an entry the policy keeps, or None when decoding never runs out (the policy evicts
        as it goes). `decode_step` refuses a step past it. Default: exactly the room reserved."""
        return max_new_tokens

    def check_model(self, config: ModelConfig) -> None:
        """Raises ValueError when this policy cannot run on a model of `config` (e.g. learned
        parameters of other shapes)."""

    def allocate(
        self, config: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int, chunk: int, dtype
    ) -> KVState:
        """An empty prefill state sized by `layout` (of a policy already `resolve`d)."""
        if not self.resolved:
            raise ValueError(f"{type(self).__name__}: resolve(prompt_len) turns compression_ratio into a budget first")
        layers = tuple(
            tuple(
                empty_segment(batch, s.heads, s.capacity, config.head_dim, dtype, self.scored(), s.budget)
                for s in layer
            )
            for layer in self.layout(config, prompt_len, max_new_tokens, chunk)
        )
        return KVState(layers=layers, length=jnp.zeros((batch,), jnp.int32))


def split_params(policy: Policy) -> tuple[Policy, Any]:
    """(the policy without its arrays: hashable, a jit static argument; its `params` pytree)."""
    return dataclasses.replace(policy, params=None), policy.params


def bind_params(policy: Policy, params: Any) -> Policy:
    """The inverse of `split_params`, inside jit: the static policy with traced `params`."""
    return policy if params is None else dataclasses.replace(policy, params=params)
