"""Locret (Huang et al., 2024): eviction ranked by learned per-layer retaining heads.

The policy carries its trained heads as `params` (fc1 float32[L, C, F], fc2 float32[L, F, Hkv];
kvjax.policies.locret.heads), which the jitted prefill and decode take as traced arguments; each
layer's step scores its tokens from the step's pre-RoPE q, k, v.

Against the authors' code (huangyuxiang03/Locret, locret/inference/infer.py and their patched
modeling_llama.py), each rule here and whether it is theirs:
- prefill in chunks (theirs, `chunk_size=3072`: kvjax's chunk_size=None takes it): after each chunk its
  entries join the layer's cache with their predicted scores; unless the chunk completes the prompt, the
  `stabilizers` most recent entries count as maximal; the top `budget_tokens` per (layer, sequence, KV
  head) survive, in position order (theirs);
- the last `local_len` prompt tokens are kept on top of the budget without eviction (theirs). The "last
  chunk" of a row is the one that holds its last token before those local ones: the authors feed the
  local tokens after the compressed prefix, which with static per-token scores keeps the same set (kvjax's
  chunks end where the bucketed padding puts them, so a row's local tokens may share its last chunk);
- `position_shift` (theirs, the default): their cache stores keys before RoPE and every forward rotates the
  whole compressed cache at contiguous positions 0, 1, ... and the queries after it, so positions never
  exceed the cache; `position_shift=False` rotates every token at its original position instead;
- decoding appends every generated token without eviction (theirs); `decode_evicts=True` (kvjax's addition)
  evicts, once the cache holds more than budget + local_len entries, the lowest-scoring entry outside the
  `local_len` most recent tokens per step, so the local window slides with the generated text.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.attention import attend
from kvjax.config import ModelConfig
from kvjax.kv_state import EvictionSegment, count, evict_lowest, keep_top, write_entries, write_free_slot
from kvjax.language_model import LanguageModel
from kvjax.layer_step import Decode, LayerContext, StepInputs
from kvjax.policies.locret.heads import (
    head_shapes,
    load_retaining_heads,
    retaining_features,
    retaining_head_scores,
)
from kvjax.policies.streaming_llm import rotate_in_cache, unrotated
from kvjax.policies.token_eviction import TokenEviction, newest

_NO_HEADS = (
    "load trained heads with Locret.from_pretrained(DIR, model.config) (DIR from "
    "`kvjax train-gates --method locret --out DIR`)"
)


AUTHORS_CHUNK = 3072  # the authors' prefill chunk (`generate(..., chunk_size=3072)`)


@dataclasses.dataclass(frozen=True)
class Locret(TokenEviction):
    """Keeps, per KV head, the `budget_tokens` entries the retaining heads score highest (the most
    recent `stabilizers` protected between prefill chunks) plus the last `local_len` tokens; RoPE at
    positions in the cache (`position_shift`); decoding appends unless `decode_evicts`."""

    budget_tokens: int = 6000
    stabilizers: int = 2500
    local_len: int = 100
    activation: str = "silu"  # the retaining heads' activation (the model's, as the authors)
    position_shift: bool = True  # the authors' contiguous re-rotation of the compressed cache
    decode_evicts: bool = False  # the authors' decoding appends; True evicts one per generated token

    @property
    def evict_while_decoding(self) -> bool:
        return self.decode_evicts

    def __post_init__(self):
        if self.budget_tokens < 1 or self.local_len < 0:
            raise ValueError(
                f"Locret needs budget_tokens >= 1 and local_len >= 0; got {self.budget_tokens}, {self.local_len}"
            )
        if not 0 <= self.stabilizers < self.budget_tokens:
            raise ValueError(
                f"Locret needs 0 <= stabilizers < budget_tokens (else the scores never choose); "
                f"got stabilizers {self.stabilizers}, budget_tokens {self.budget_tokens}"
            )

    def with_budget(self, tokens):
        """Scored entries + `local_len` = tokens (local_len at most tokens // 2), `stabilizers` at most half
        the scored budget."""
        super().with_budget(tokens)
        local = min(self.local_len, tokens // 2)
        scored = tokens - local
        return dataclasses.replace(
            self, budget_tokens=scored, local_len=local, stabilizers=min(self.stabilizers, scored // 2)
        )

    file_needed = "a retaining-heads folder: the --out of `kvjax train-gates --method locret`"

    @classmethod
    def from_file(cls, path, config, **options) -> Locret:
        return cls.from_pretrained(path, config, **options)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, config: ModelConfig, **hyperparameters) -> Locret:
        """The policy with the heads trained into `directory` for a model of `config`."""
        heads, info = load_retaining_heads(directory, config)
        return cls(**hyperparameters, activation=info.get("activation", config.hidden_act), params=heads)

    def check_model(self, config: ModelConfig) -> None:
        if self.params is None:
            raise ValueError(f"Locret needs trained retaining heads and has none; {_NO_HEADS}")
        hidden = self.params["fc1"].shape[-1]
        want = head_shapes(config, hidden)
        got = {k: tuple(self.params[k].shape) for k in want}
        if got != want:
            raise ValueError(
                f"Locret's retaining heads {got} do not fit this model (expected {want}: "
                f"{config.num_layers} layers, {config.num_heads} query and {config.num_kv_heads} "
                f"KV heads of dim {config.head_dim})"
            )

    def scored(self):
        return True

    def needs_attention(self, decoding):
        return False  # scores come from the retaining heads, not from attention weights

    def budget(self, config, layer):
        return self.budget_tokens + self.local_len

    def prefill_chunk(self, config, prompt_len):
        """Locret prefills chunk by chunk by design (its stabilizers bridge the chunks): the authors' 3072."""
        return AUTHORS_CHUNK

    def allocate(self, config, batch, prompt_len, max_new_tokens, chunk, dtype):
        state = super().allocate(config, batch, prompt_len, max_new_tokens, chunk, dtype)
        return unrotated(state, config.rope) if self.position_shift else state

    def priority(self, segment):
        """Decode (and finalize): the predicted score; the `local_len` most recent tokens are never evicted."""
        return jnp.where(segment.pos > newest(segment) - self.local_len, jnp.inf, segment.score)

    def scores(self, ctx: LayerContext, x: StepInputs) -> jax.Array:
        """float32[B, T, K]: the layer's retaining-head score of each of the step's tokens."""
        fc1, fc2 = (self.params[name][ctx.index] for name in ("fc1", "fc2"))  # [C, F], [F, K]
        features = retaining_features(x.q_raw, x.k_raw, x.v)  # [B, T, C]
        return retaining_head_scores(features, fc1.astype(features.dtype), fc2.astype(features.dtype), self.activation)

    def step(self, ctx, segments, x, phase):
        """Scores the step's tokens once for the layer, then each segment writes, attends and evicts."""
        return super().step(ctx, segments, dataclasses.replace(x, score=self.scores(ctx, x)), phase)

    def keep_after_chunk(
        self, segment: EvictionSegment, q_pos: jax.Array, prompt_lengths: jax.Array
    ) -> EvictionSegment:
        """The paper's rule after a prefill chunk: local prompt tokens stay; of the others, the top
        `budget_tokens` by score, the `stabilizers` most recent counting as maximal until the row's
        prefix (everything before its local tokens) is complete. q_pos: int32[B, T]; prompt_lengths int32[B]."""
        n = prompt_lengths[:, None, None]  # [B, 1, 1]
        held = segment.pos >= 0  # [B, Hs, C]
        local = held & (segment.pos >= n - self.local_len)
        prefix_done = (q_pos[:, -1] >= prompt_lengths - self.local_len - 1)[:, None, None]  # [B, 1, 1]
        stable = ~prefix_done & (segment.pos > newest(segment) - self.stabilizers)
        ranked = jnp.where(held & ~local, jnp.where(stable, jnp.inf, segment.score), -jnp.inf)  # [B, Hs, C]
        _, top = jax.lax.top_k(ranked, min(self.budget_tokens, segment.capacity))  # [B, Hs, budget]
        b, hs, _ = ranked.shape
        chosen = (
            jnp.zeros(ranked.shape, bool).at[jnp.arange(b)[:, None, None], jnp.arange(hs)[None, :, None], top].set(True)
        )  # exactly the top budget, ties included or not by top_k's order
        keep = jnp.where(local, jnp.inf, jnp.where(chosen & (ranked > -jnp.inf), ranked, -jnp.inf))
        return keep_top(segment, keep, segment.budget, segment.capacity)

    def segment_step(self, ctx, segment, x, phase):
        """Writes the chunk (or decode token) with its predicted scores (x.score), attends, then evicts.
        With `position_shift` the keys are stored before RoPE and rotated at their positions in the cache."""
        k = x.k_raw if self.position_shift else x.k
        if isinstance(phase, Decode):
            seg = write_free_slot(segment, k, x.v, x.new_pos, x.score)
        else:
            seg = write_entries(segment, k, x.v, x.new_pos, count(segment), x.score)
        q, k = rotate_in_cache(seg, x.q_raw, x.q_pos) if self.position_shift else (x.q, seg.k)
        out = attend(q, k, seg.v, seg.pos, x.q_pos, ctx.window, ctx.scale, ctx.impl)
        if isinstance(phase, Decode):
            if self.decode_evicts:
                seg = evict_lowest(seg, self.priority(seg), seg.budget)
        elif seg.budget < seg.capacity:
            seg = self.keep_after_chunk(seg, x.q_pos, phase.prompt_lengths)
        return out, seg


@functools.partial(jax.jit, static_argnames=("graphdef", "policy"))
def _scores(graphdef, params, policy_params, tokens, offset, *, policy: Locret):
    model = nnx.merge(graphdef, params)
    policy = dataclasses.replace(policy, params=policy_params)
    b, t = tokens.shape
    positions = jnp.broadcast_to(offset + jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T]

    def record(ctx, scores, shared, x):  # causal attention over the tokens themselves; the layer's scores kept
        k_pos = jnp.broadcast_to(x.new_pos[:, None, :], (b, x.num_kv_heads, t))  # [B, K, T]
        out = attend(x.q, x.k.swapaxes(1, 2), x.v.swapaxes(1, 2), k_pos, x.q_pos, ctx.window, ctx.scale)
        return out, policy.scores(ctx, x), shared

    zeros = (jnp.zeros((b, t, model.config.num_kv_heads), jnp.float32),) * model.config.num_layers
    _, scores, _ = model(tokens, positions, jnp.ones((b, t), bool), zeros, record, seq_len=offset + t)
    return jnp.stack(scores)  # [L, B, T, K]


def retaining_scores(m: LanguageModel, policy: Locret, tokens, *, offset: int = 0) -> jax.Array:
    """float32[L, B, T, Hkv]: every layer's retaining-head score of each token in a full causal forward
    (no cache, no eviction) of int32[B, T] tokens at positions offset, offset + 1, ... (for inspection)."""
    policy.check_model(m.config)
    tokens = jnp.asarray(tokens, jnp.int32)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    static = dataclasses.replace(policy, params=None)
    return _scores(m.graphdef, m.params, policy.params, tokens, jnp.int32(offset), policy=static)
