"""DuoAttention (Xiao et al., 2024) at deployment: retrieval heads keep everything, streaming heads
keep an attention sink plus a recent window, each head class in its own, really smaller, buffer.

Gates (one alpha per layer and KV head, learned offline) become the head split by DuoAttention's
rule: `threshold = quantile(all alphas, sparsity)`, retrieval iff `alpha >= threshold`. Gates are
exchanged as DuoAttention's `full_attention_heads.tsv` (numpy `savetxt`, L rows x Hkv columns, tab
separated); kvjax's own gate files are that same format (`write_gates_tsv` / `read_gates_tsv`).

Retrieval heads follow Full (slot = position), streaming heads follow StreamingLLM(sink, recent)
exactly (same step, same finalize), each on its own heads, so the shared attention dispatch (the
`attention_impl` of prefill and generate) sends single-token decode over either buffer to the
Pallas `block_sparse_decode` kernel on GPU/TPU and to the jnp reference on CPU. Prefill chunks over
the retrieval buffer (slot = position, declared with `slot_is_position=True`) go to the
`block_sparse_prefill` kernel in chunk mode; streaming buffers hold no such layout while
prefilling (sink + recent, compressed after each chunk) and keep the reference there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cached_attention import write_in_place_then_attend
from kvjax.config import ModelConfig
from kvjax.kv_state import EvictionSegment, KVSegment, KVState
from kvjax.policies.base import Layout, Policy, SegmentSpec
from kvjax.policies.full import Full
from kvjax.policies.streaming_llm import StreamingLLM

HeadSets = tuple[tuple[int, ...], ...]  # per layer, sorted KV-head indices


# ------------------------------------------------------------------------------------------------
# Gate files and the quantile rule.
# ------------------------------------------------------------------------------------------------


def read_gates_tsv(path: str | os.PathLike) -> np.ndarray:
    """float64[L, Hkv] gates from a `full_attention_heads.tsv` (DuoAttention's or kvjax's own)."""
    gates = np.loadtxt(path, dtype=np.float64, delimiter="\t", ndmin=2)
    if gates.size == 0 or not np.all(np.isfinite(gates)):
        raise ValueError(f"gate file {path} must hold a finite, non-empty L x Hkv matrix")
    return gates


def write_gates_tsv(path: str | os.PathLike, gates) -> None:
    """Writes gates float[L, Hkv] exactly as DuoAttention does (numpy savetxt, tab separated)."""
    gates = np.asarray(gates, np.float64)
    if gates.ndim != 2:
        raise ValueError(f"gates must be float[L, Hkv]; got shape {gates.shape}")
    np.savetxt(path, gates, delimiter="\t")


def quantile_head_sets(gates, sparsity: float, break_ties: bool = True) -> HeadSets:
    """Per layer, the retrieval KV heads by DuoAttention's deployment rule (`sparsify_attention_heads`).

    Gates are clipped to [0, 1] (as `load_attn_pattern`); `threshold = np.quantile(gates, sparsity)`
    with numpy's default linear interpolation; retrieval iff `gate >= threshold`; sparsity >= 1 ->
    none, <= 0 -> all. The authors first add U(0, 1e-6) noise, so the gates are distinct and exactly
    `N - ceil(sparsity * (N - 1))` of the N heads stay retrieval heads; kvjax keeps that count, breaking
    ties deterministically (the earlier (layer, head) among equal gates stays a retrieval head) where the
    authors' noise breaks them at random, and warns when ties decide. `break_ties=False` keeps every head
    tied at the threshold instead (more retrieval heads than asked; bf16 gates clipped to 1 tie widely).
    """
    gates = np.clip(np.asarray(gates, np.float64), 0.0, 1.0)
    if gates.ndim != 2:
        raise ValueError(f"gates must be float[L, Hkv]; got shape {gates.shape}")
    if not np.isfinite(sparsity):
        raise ValueError(f"sparsity must be a finite number; got {sparsity}")
    if sparsity >= 1:
        keep = np.zeros(gates.shape, bool)
    elif sparsity <= 0:
        keep = np.ones(gates.shape, bool)
    elif break_ties:
        flat = gates.reshape(-1)
        n = flat.size - math.ceil(sparsity * (flat.size - 1))  # the authors' count of retrieval heads
        order = np.argsort(-flat, kind="stable")  # highest first, ties by (layer, head)
        if 0 < n < flat.size and flat[order[n - 1]] == flat[order[n]]:
            tied = int(np.sum(flat == flat[order[n]]))
            warnings.warn(
                f"DuoAttention: {tied} heads share the gate {flat[order[n]]:g} at the sparsity {sparsity} cut; "
                f"ties decide which of them stream (kvjax keeps the earlier (layer, head), the authors pick at random)",
                stacklevel=2,
            )
        keep = np.zeros(flat.size, bool)
        keep[order[:n]] = True
        keep = keep.reshape(gates.shape)
    else:
        keep = gates >= np.quantile(gates, sparsity)
    return tuple(tuple(int(h) for h in np.flatnonzero(row)) for row in keep)


PATTERN_CONFIG = "config.json"  # DuoAttention's training config beside its full_attention_heads.tsv


def read_pattern_config(tsv: str | os.PathLike) -> dict:
    """The settings stored beside a gate file: from DuoAttention's `config.json` (`sink_size`,
    `recent_size`, `sparsity`) or kvjax's `duo_gates.json` (`sink`, `recent`), as {"sink", "recent",
    "sparsity"} with the keys the file sets; {} when there is neither."""
    folder = Path(tsv).parent
    for name, keys in (
        (PATTERN_CONFIG, ("sink_size", "recent_size", "sparsity")),
        ("duo_gates.json", ("sink", "recent", "sparsity")),
    ):
        path = folder / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
        found = {ours: raw.get(theirs) for ours, theirs in zip(("sink", "recent", "sparsity"), keys)}
        return {k: v for k, v in found.items() if v is not None}
    return {}


# ------------------------------------------------------------------------------------------------
# The head-split layout shared by DuoAttention and RazorAttention.
# ------------------------------------------------------------------------------------------------


def sink_recent_priority(segment: KVSegment, sink: int) -> jax.Array:
    """float32[B, Hs, C]: sinks never leave (+inf), otherwise newer wins (StreamingLLM's ranking)."""
    return jnp.where(segment.pos < sink, jnp.inf, segment.pos.astype(jnp.float32))


def split_layout(
    config: ModelConfig,
    retrieval: HeadSets,
    keep: int,
    prompt_len: int,
    max_new_tokens: int,
    chunk: int,
) -> Layout:
    """Per layer: retrieval heads (if any) in one buffer sized as Full's, the other heads (if any) in
    a `keep`-entry buffer sized as StreamingLLM's (never more than keep + one chunk while prefilling)."""
    full = Full().layout(config, prompt_len, max_new_tokens, chunk)[0][0].capacity
    streaming = StreamingLLM(sink=0, window=keep).layout(config, prompt_len, max_new_tokens, chunk)[0][0].capacity
    return head_split_layout(config, retrieval, full, streaming, keep)


def head_split_layout(config: ModelConfig, retrieval: HeadSets, full: int, streaming: int, keep: int) -> Layout:
    """Per layer: retrieval heads (if any) in one `full`-slot buffer, the other heads (if any) in a
    `streaming`-slot buffer keeping `keep` entries."""
    if len(retrieval) != config.num_layers:
        raise ValueError(f"retrieval heads given for {len(retrieval)} layers; the model has {config.num_layers}")
    layers = []
    for layer, heads in enumerate(retrieval):
        if any(h < 0 or h >= config.num_kv_heads for h in heads):
            raise ValueError(f"layer {layer}: retrieval heads {heads} outside [0, {config.num_kv_heads})")
        others = tuple(h for h in range(config.num_kv_heads) if h not in heads)
        specs = [SegmentSpec(heads, full)] if heads else []
        if others:
            specs.append(SegmentSpec(others, streaming, keep))
        layers.append(tuple(specs))
    return tuple(layers)


def _normalise(retrieval) -> HeadSets:
    return tuple(tuple(sorted({int(h) for h in layer})) for layer in retrieval)


@dataclasses.dataclass(frozen=True)
class DuoAttention(Policy):
    """Retrieval KV heads keep every token; streaming KV heads keep `sink` + `recent` tokens."""

    retrieval_heads: HeadSets  # per layer, the KV heads that keep everything
    sink: int = 64
    recent: int = 256

    def __post_init__(self):
        if self.sink < 0 or self.recent < 1:
            raise ValueError(f"DuoAttention needs sink >= 0 and recent >= 1; got {self.sink}, {self.recent}")
        object.__setattr__(self, "retrieval_heads", _normalise(self.retrieval_heads))

    def with_budget(self, tokens):
        """Streaming heads keep `tokens`: the sink stays, `recent` takes the rest (retrieval heads keep all)."""
        super().with_budget(tokens)
        if tokens <= self.sink:
            raise ValueError(f"{type(self).__name__}: a budget of {tokens} tokens must exceed the sink ({self.sink})")
        return dataclasses.replace(self, recent=tokens - self.sink)

    file_needed = "full_attention_heads.tsv: gates from `kvjax train-gates --method duo` or DuoAttention's release"

    @classmethod
    def from_file(cls, path, config, **options) -> DuoAttention:
        """`from_tsv(path, **options)` (sparsity, sink, recent, break_ties)."""
        return cls.from_tsv(path, **options)

    @classmethod
    def from_gates(
        cls, gates, sparsity: float = 0.5, sink: int = 64, recent: int = 256, break_ties: bool = True
    ) -> DuoAttention:
        """Head split from gates float[L, Hkv] by the quantile rule (sparsity 0.5 GQA, 0.75 MHA)."""
        return cls(quantile_head_sets(gates, sparsity, break_ties), sink, recent)

    @classmethod
    def from_tsv(
        cls,
        path: str | os.PathLike,
        sparsity: float | None = None,
        sink: int | None = None,
        recent: int | None = None,
        break_ties: bool = True,
    ) -> DuoAttention:
        """Head split from a `full_attention_heads.tsv` (DuoAttention's release or kvjax's gate file). Settings
        left None come from the config beside it (`read_pattern_config`: the authors' `load_attn_pattern`
        reads sink_size 128 and recent_size 256 there), else sparsity 0.5, sink 64, recent 256."""
        stored = read_pattern_config(path)
        return cls.from_gates(
            read_gates_tsv(path),
            stored.get("sparsity", 0.5) if sparsity is None else sparsity,
            stored.get("sink", 64) if sink is None else sink,
            stored.get("recent", 256) if recent is None else recent,
            break_ties,
        )

    def retrieval_fraction(self, num_kv_heads: int) -> float:
        return sum(map(len, self.retrieval_heads)) / (num_kv_heads * len(self.retrieval_heads))

    def layout(self, config, prompt_len, max_new_tokens, chunk) -> Layout:
        return split_layout(config, self.retrieval_heads, self.sink + self.recent, prompt_len, max_new_tokens, chunk)

    def streaming(self) -> StreamingLLM:
        """The policy streaming heads follow: same sink and recent window, keys at their original positions
        (the authors' DuoAttention keeps RoPE positions; it does not shift them as StreamingLLM's do)."""
        return StreamingLLM(sink=self.sink, window=self.recent, position_shift=False)

    def segment_step(self, ctx, segment, x, phase):
        if not isinstance(segment, EvictionSegment):  # retrieval heads: slot = position, as Full
            return write_in_place_then_attend(ctx, segment, x)
        return self.streaming().segment_step(ctx, segment, x, phase)  # streaming heads: StreamingLLM's step

    def finalize(self, config, state: KVState, prompt_len, max_new_tokens) -> KVState:
        """Streaming buffers shrink as StreamingLLM's (sink + recent + a spare slot); retrieval ones stay."""

        def resize(seg: KVSegment) -> KVSegment:
            if not isinstance(seg, EvictionSegment):  # retrieval heads
                return seg
            alone = state.replace(layers=((seg,),))
            return self.streaming().finalize(config, alone, prompt_len, max_new_tokens).layers[0][0]

        return state.replace(layers=tuple(tuple(resize(s) for s in layer) for layer in state.layers))
