"""LESS (Dong et al., 2024, "Get More with LESS"): eviction plus a learned low-rank state of what it evicted.

`base` (H2O, or StreamingLLM: the paper's Λ-shaped cache) decides, per (layer, sequence, KV head), which
entries stay, exactly as it would alone; each entry it evicts is folded into the KV head's constant-size
state (H [R, D], z [R]: `kernels`) through a learned feature map of its key, and every later query reads
the state through its own feature map in the same normaliser as its softmax over the kept entries. The
state costs R (D + 1) float32 numbers per (layer, sequence, KV head), about R / 2 tokens of a float32
cache, and `kv_bytes` counts it.

As the authors' generation code (hdong920/LESS src/inference/generative/llama_gen.py): a prompt prefilled
in one chunk attends in full, then what the base evicts at its end enters the state; while decoding each
token attends over the kept entries plus the state, then the base's one eviction enters it. A prompt
prefilled in several chunks evicts after each, and later chunks read the state too. The base stores keys
after RoPE (StreamingLLM runs with `position_shift=False`), the keys the feature maps were trained on.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import attend, decode_with_lse, visibility_mask
from kvjax.config import ModelConfig
from kvjax.kv_state import (
    EvictionSegment,
    KVState,
    count,
    dropped_by_keep_top,
    keep_top,
    lowest_over_budget,
    write_entries,
    write_free_slot,
)
from kvjax.layer_step import Decode, take_heads
from kvjax.policies.base import Layout, Policy
from kvjax.policies.h2o import H2O
from kvjax.policies.less.kernels import (
    PARAMS_FILE,
    Params,
    absorb,
    check_params,
    join,
    load_less,
    query_features,
    read_state,
)
from kvjax.policies.streaming_llm import StreamingLLM
from kvjax.policies.token_eviction import TokenEviction

MASKED = float(jnp.finfo(jnp.float32).min)  # finite, so a query that sees nothing stays NaN-free
BASES = {"h2o": H2O, "streaming": StreamingLLM}  # the authors' two sparse policies, by their CLI names


@struct.dataclass(frozen=True)
class LESSSegment:
    """A layer's entries for a set of KV heads: the base's buffer and the state of what it evicted."""

    kept: EvictionSegment  # the base's segment (budget, scores)
    h: jax.Array  # float32[B, Hs, R, D]: sum of phi_k(k_e)^T v_e over the evicted entries
    z: jax.Array  # float32[B, Hs, R]: sum of phi_k(k_e)

    @property
    def heads(self) -> tuple[int, ...]:
        return self.kept.heads

    def positions(self) -> jax.Array:
        """int32[B, Hs, C]: the kept entries' positions (-1 empty)."""
        return self.kept.pos


def attend_with_lse(q, k, v, k_pos, q_pos, window, scale) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Exact attention over a segment: (out [B, T, K, G, D], lse float32[B, T, K, G], the log-sum-exp of the
    visible scaled logits, probs float32[B, K, G, T, C]). q [B, T, K, G, D]; k, v [B, K, C, D]."""
    logits = jnp.einsum("btkgd,bkcd->bkgtc", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(visibility_mask(k_pos, q_pos, window)[:, :, None], logits, MASKED)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, K, G, T]
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bkgtc,bkcd->btkgd", probs.astype(v.dtype), v)
    return out, jnp.transpose(lse, (0, 3, 1, 2)), probs


@dataclasses.dataclass(frozen=True)
class LESS(Policy):
    """`base` evicts; a learned low-rank recurrent state per KV head absorbs what it evicts and joins
    attention's numerator and normaliser (params, the rank with them, from `kvjax train-gates --method less`)."""

    base: TokenEviction | str = dataclasses.field(default_factory=H2O)  # or "h2o" / "streaming"

    file_needed = f"LESS params: DIR/{PARAMS_FILE} from `kvjax train-gates --method less --out DIR`"

    def __post_init__(self):
        base = BASES[self.base]() if isinstance(self.base, str) and self.base in BASES else self.base
        if not isinstance(base, (H2O, StreamingLLM)):
            raise ValueError(
                f"LESS pairs its state with H2O or StreamingLLM (the paper's Λ cache): base 'h2o', 'streaming' or "
                f"an instance; got {self.base!r}"
            )
        if isinstance(base, StreamingLLM) and base.position_shift:  # the state's keys are rotated at their positions
            base = dataclasses.replace(base, position_shift=False)
        object.__setattr__(self, "base", base)

    @property
    def rank(self) -> int:
        """R, the state's rank (the params' feature size; the authors' ker_dim, 8 by default in training)."""
        return self.params["k2"].shape[-1]

    @classmethod
    def from_file(cls, path: str | os.PathLike, config: ModelConfig, **options) -> LESS:
        """The policy with the params in `path` (less_state.npz or its folder); unless `options` name a base,
        the sparse policy they were trained with (its `meta`), at its training budget."""
        params, meta = load_less(path, config)
        if "base" not in options and meta.get("mask") == "lambda":
            options["base"] = StreamingLLM(sink=meta["sink"], window=meta["recent"], position_shift=False)
        elif "base" not in options and meta.get("mask") == "h2o":
            options["base"] = H2O(heavy=meta["heavy"], window=meta["recent"])
        return cls(**options, params=params)

    def check_model(self, config: ModelConfig) -> None:
        if self.params is None:
            raise ValueError(
                "LESS needs trained params and has none; load them with LESS.from_file(DIR, model.config) "
                "(DIR from `kvjax train-gates --method less --out DIR`)"
            )
        check_params(self.params, config)

    def with_budget(self, tokens):
        """The base's budget; the state comes on top of it."""
        base = self.base.with_budget(tokens)
        return None if base is None else dataclasses.replace(self, base=base)

    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        return self.base.layout(config, prompt_len, max_new_tokens, chunk)

    def prefill_chunk(self, config, prompt_len):
        return self.base.prefill_chunk(config, prompt_len)

    def scored(self) -> bool:
        return self.base.scored()

    def decode_room(self, config, prompt_len, max_new_tokens):
        return self.base.decode_room(config, prompt_len, max_new_tokens)

    def allocate(self, config, batch, prompt_len, max_new_tokens, chunk, dtype) -> KVState:
        """The base's prefill state, each segment beside an empty state."""
        state = self.base.allocate(config, batch, prompt_len, max_new_tokens, chunk, dtype)

        def with_state(seg: EvictionSegment) -> LESSSegment:
            rows = (batch, len(seg.heads), self.rank)
            return LESSSegment(
                kept=seg, h=jnp.zeros((*rows, config.head_dim), jnp.float32), z=jnp.zeros(rows, jnp.float32)
            )

        return state.replace(layers=tuple(tuple(with_state(s) for s in layer) for layer in state.layers))

    def layer_params(self, index, heads: tuple[int, ...]) -> Params:
        """One layer's params (`index` may be traced) for the KV heads `heads`."""
        total = self.params["k1"].shape[1]
        return {name: take_heads(w[index], heads, 0, total) for name, w in self.params.items()}

    def segment_step(self, ctx, segment, x, phase):
        """Writes the step as the base does, attends over the kept entries joined with the state, then folds
        what the base evicts into the state: down to the budget after a chunk, one entry per decode step."""
        decoding = isinstance(phase, Decode)
        p = self.layer_params(ctx.index, segment.heads)
        kept, h, z = segment.kept, segment.h, segment.z
        if decoding:
            kept = write_free_slot(kept, x.k, x.v, x.new_pos)
        else:
            kept = write_entries(kept, x.k, x.v, x.new_pos, count(kept))
        observing = self.base.needs_attention(decoding)
        whole = not decoding and phase.whole_prompt  # written into an empty state: nothing to read yet
        if whole and not observing:
            out = attend(x.q, kept.k, kept.v, kept.pos, x.q_pos, ctx.window, ctx.scale, ctx.impl, slot_is_position=True)
        else:
            fast = (
                None if observing else decode_with_lse(x.q, kept.k, kept.v, kept.pos, ctx.window, ctx.scale, ctx.impl)
            )
            if fast is None:
                out, lse, probs = attend_with_lse(x.q, kept.k, kept.v, kept.pos, x.q_pos, ctx.window, ctx.scale)
            else:
                out, lse = fast
            if observing:
                prompt_lengths = None if decoding else phase.prompt_lengths
                kept = kept.replace(score=self.base.observe(kept, probs, x.new_pos, prompt_lengths))
            if not whole:
                out = join(out, lse, *read_state(query_features(x.q, p["q1"], p["q2"]), h, z))
        priority = self.base.priority(kept)
        if decoding:
            dropped = lowest_over_budget(kept, priority, kept.budget)  # at most one per row
            slot = jnp.argmax(dropped, axis=-1)[..., None, None]  # [B, Hs, 1, 1]
            k_e, v_e = (jnp.take_along_axis(a, slot, axis=2) for a in (kept.k, kept.v))  # [B, Hs, 1, D]
            h, z = absorb(h, z, k_e, v_e, jnp.any(dropped, axis=-1, keepdims=True), p)
            kept = kept.replace(pos=jnp.where(dropped, -1, kept.pos))
        elif kept.budget < kept.capacity:
            h, z = absorb(h, z, kept.k, kept.v, dropped_by_keep_top(kept, priority, kept.budget), p)
            kept = keep_top(kept, priority, kept.budget, kept.capacity)
        return out, LESSSegment(kept=kept, h=h, z=z)

    def finalize(self, config: ModelConfig, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """The base's decode-time buffers (nothing is over budget after prefill, so nothing is evicted here);
        the states carry over."""
        bases = state.replace(layers=tuple(tuple(s.kept for s in layer) for layer in state.layers))
        bases = self.base.finalize(config, bases, prompt_len, max_new_tokens)
        layers = tuple(
            tuple(s.replace(kept=k) for k, s in zip(kept_layer, layer))
            for kept_layer, layer in zip(bases.layers, state.layers)
        )
        return bases.replace(layers=layers)
