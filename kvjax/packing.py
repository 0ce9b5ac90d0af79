"""Prepacking (Zhao et al. 2024): a ragged batch's prompts bin-packed into fewer, fuller rows for prefill.

A batch of prompts of different lengths, right-padded to the longest, spends most of a prefill on
padding when the lengths vary. Prepacking instead places several prompts side by side in one row
(bin packing, rows as long as the longest prompt by default), restarts each prompt's RoPE positions
at 0, and masks attention block-diagonally (a query sees only earlier tokens of its own prompt), so
every prompt's keys, values and last-token logits are those of a prefill on its own. Each prompt's
entries are then gathered out of the packed rows into its own row of the policy's state, which
decoding continues as after an unpacked prefill.

A policy that scores the prompt at its end from its keys and its last queries (SnapKV, PyramidKV,
AdaKV, ThinK, ...) gets each prompt's entries but its last n (`Policy.packed_tail`) unpacked, then runs
its own prefill step once per layer on those last n tokens, whose q, k and v the packed rows recorded
(`replay_tail`): its scores see one prompt's queries and keys only, as in an unpacked prefill.

This module holds the packing (`Packing`, `pack`), the packed rows' arrays (`packed_rows`), the
attention step over them (`packed_step`), the unpacking (`unpack_state`) and the tail's replay
(`replay_tail`); `kvjax.prefill` and `kvjax.generate` run them with `packing=`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.attention import attend
from kvjax.kv_state import EvictionSegment, KVSegment, KVState, write_entries
from kvjax.layer_step import LayerContext, Prefill, StepInputs
from kvjax.policies.base import Policy

FITS = ("best", "first")


@dataclasses.dataclass(frozen=True)
class Packing:
    """How `prefill` / `generate` pack a ragged batch's prompts into rows for prefill.

    row_length: tokens per packed row; None for the longest prompt's length (the authors' choice), else at
    least the longest prompt (a prompt is never split across rows). Rows are padded up to whole prefill
    chunks, as unpacked prompts are.
    fit: which open row takes the next prompt, prompts taken longest first: "best" the fullest row it fits
    in (the authors' packer, `binpacking.to_constant_volume`), "first" the first row it fits in (textbook
    first-fit decreasing). Both open a new row where it fits nowhere.

    Packing changes how much padding prefill computes, not its result: each prompt's state and logits are
    those of the unpacked prefill (up to float rounding). It runs with policies whose prefill writes the
    prompt in place and compresses it only at its end, from its keys and at most its last n queries
    (`Policy.packed_tail`: Full, Quest, Twilight, SnapKV, PyramidKV, AdaKV, Knorm, ...); policies that
    evict, prune or re-encode the prompt while prefilling are refused. The packed rows' attention runs
    the jnp path (no kernel takes segment ids yet); decoding afterwards runs the `attention_impl` asked for.
    """

    row_length: int | None = None
    fit: str = "best"

    def __post_init__(self):
        if self.row_length is not None and (
            isinstance(self.row_length, (bool, np.bool_))
            or not isinstance(self.row_length, (int, np.integer))
            or self.row_length < 1
        ):
            raise ValueError(f"Packing row_length must be a positive integer or None; got {self.row_length!r}")
        if self.fit not in FITS:
            raise ValueError(f"Packing fit must be one of {FITS}; got {self.fit!r}")


def as_packing(packing) -> Packing | None:
    """`packing` as a `Packing` (True: the defaults) or None (None, False: no packing)."""
    if packing is None or packing is False:
        return None
    if packing is True:
        return Packing()
    if isinstance(packing, Packing):
        return packing
    raise ValueError(f"packing must be None, a bool or a kvjax.packing.Packing; got {packing!r}")


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """Where each prompt of a batch sits in the packed rows.

    rows: per packed row, the prompts' batch indices in the order they sit; row_of, offset: int32[B], the
    row and first column of each prompt; lengths: int32[B]; row_length: the rows' capacity in tokens.
    """

    rows: tuple[tuple[int, ...], ...]
    row_of: np.ndarray
    offset: np.ndarray
    lengths: np.ndarray
    row_length: int

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def padded_tokens(self, width: int) -> int:
        """Padding positions computed by rows of `width` columns (`width` >= row_length)."""
        return self.num_rows * width - int(self.lengths.sum())


def bin_pack(lengths, capacity: int, fit: str = "best") -> tuple[tuple[int, ...], ...]:
    """Bins of at most `capacity` tokens holding each prompt of `lengths` once: prompts taken longest first
    (ties: lower index first), each into the fullest bin it fits in ("best", ties: the earliest bin) or
    the first ("first"), or a new bin. Returns, per bin, its prompts' indices in the order they came in."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}; got {fit!r}")
    lengths = [int(n) for n in np.asarray(lengths).reshape(-1)]
    if any(n > capacity for n in lengths):
        raise ValueError(f"a prompt of {max(lengths)} tokens does not fit a packed row of {capacity}")
    bins: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):  # stable: equal lengths keep their order
        fits = [b for b in range(len(bins)) if used[b] + lengths[i] <= capacity]
        if not fits:
            bins.append([])
            used.append(0)
            b = len(bins) - 1
        elif fit == "best":
            b = max(fits, key=lambda j: (used[j], -j))
        else:
            b = fits[0]
        bins[b].append(i)
        used[b] += lengths[i]
    return tuple(tuple(b) for b in bins)


def pack(lengths, packing: Packing = Packing()) -> PackPlan:
    """The packing of prompts of int32[B] `lengths` into rows (`bin_pack`)."""
    lengths = np.asarray(lengths, np.int32).reshape(-1)
    longest = int(lengths.max())
    row_length = longest if packing.row_length is None else int(packing.row_length)
    if row_length < longest:
        raise ValueError(
            f"Packing row_length ({row_length}) is shorter than the longest prompt ({longest} tokens); "
            "prompts are never split across rows"
        )
    rows = bin_pack(lengths, row_length, packing.fit)
    row_of = np.zeros(lengths.shape, np.int32)
    offset = np.zeros(lengths.shape, np.int32)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            row_of[i], offset[i] = r, start
            start += int(lengths[i])
    return PackPlan(rows=rows, row_of=row_of, offset=offset, lengths=lengths, row_length=row_length)


def packed_rows(prompts: np.ndarray, plan: PackPlan, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, positions, segments), each int32[R, width]: the prompts of right-padded int32[B, T]
    `prompts` laid out as `plan` says, each prompt's positions counting from 0 and its segment id its batch
    index; padding holds token 0, position 0 and segment -1."""
    if width < plan.row_length:
        raise ValueError(f"packed rows of {width} columns cannot hold rows of {plan.row_length} tokens")
    tokens = np.zeros((plan.num_rows, width), np.int32)
    positions = np.zeros((plan.num_rows, width), np.int32)
    segments = np.full((plan.num_rows, width), -1, np.int32)
    for i, (r, start, n) in enumerate(zip(plan.row_of, plan.offset, plan.lengths)):
        tokens[r, start : start + n] = prompts[i, :n]
        positions[r, start : start + n] = np.arange(n)
        segments[r, start : start + n] = i
    return tokens, positions, segments


@struct.dataclass(frozen=True)
class TailInputs:
    """One layer's step inputs for each prompt's last n tokens, recorded from the packed rows:
    q and q_raw [B, n, K, G, D], k, k_raw and v [B, n, K, D] (`StepInputs`'s fields of the same names)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_raw: jax.Array
    k_raw: jax.Array


@dataclasses.dataclass(frozen=True)
class Tail:
    """Where each prompt's last n tokens sit: row_of int32[B] (`PackPlan`), and per prompt and tail index,
    columns int32[B, n] in its packed row, positions int32[B, n] and valid bool[B, n] (False past a prompt
    shorter than n, as padding at the end of a chunk)."""

    row_of: jax.Array
    columns: jax.Array
    positions: jax.Array
    valid: jax.Array

    @staticmethod
    def of(row_of: jax.Array, offset: jax.Array, lengths: jax.Array, n: int) -> Tail:
        """The last n tokens of prompts of int32[B] `lengths` at columns `offset` of rows `row_of`: positions
        max(length - n, 0) + j, j < n, so they end at the prompt's end, or start at 0 when it is shorter."""
        positions = jnp.maximum(lengths - n, 0)[:, None] + jnp.arange(n, dtype=jnp.int32)  # [B, n]
        return Tail(row_of, offset[:, None] + positions, positions, positions < lengths[:, None])

    @property
    def start(self) -> jax.Array:
        """int32[B]: each prompt's first tail position, the entries before it unpacked (`unpack_state`)."""
        return self.positions[:, 0]

    def empty(self, config, dtype) -> TailInputs:
        """Zeroed `TailInputs` for a model of `config`."""
        b, n = self.positions.shape
        kh, g, d = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim
        q, k = jnp.zeros((b, n, kh, g, d), dtype), jnp.zeros((b, n, kh, d), dtype)
        return TailInputs(q=q, k=k, v=k, q_raw=q, k_raw=k)

    def record(self, recorded: TailInputs, x: StepInputs, start: jax.Array) -> TailInputs:
        """`recorded` with the tail tokens that fall in the chunk of packed columns [start, start + S) taken
        from its inputs `x` ([R, S, ...])."""
        s = x.q.shape[1]
        at = self.columns - start  # [B, n]: index in the chunk
        here = self.valid & (at >= 0) & (at < s)
        idx = jnp.clip(at, 0, s - 1)

        def take(new, old):  # [R, S, ...] -> [B, n, ...]
            picked = new[self.row_of[:, None], idx].astype(old.dtype)
            return jnp.where(here.reshape(here.shape + (1,) * (old.ndim - 2)), picked, old)

        return TailInputs(
            q=take(x.q, recorded.q),
            k=take(x.k, recorded.k),
            v=take(x.v, recorded.v),
            q_raw=take(x.q_raw, recorded.q_raw),
            k_raw=take(x.k_raw, recorded.k_raw),
        )


def packed_step(columns: jax.Array, q_segments: jax.Array, k_segments: jax.Array, tail: Tail | None = None):
    """The layer step of a packed prefill chunk: Full's, with slot = column instead of position.

    columns: int32[R, S], the chunk's columns in the packed rows (consecutive); q_segments: int32[R, S]
    and k_segments: int32[R, W], the segment ids of the chunk's queries and of every slot. The chunk's
    entries are written at slot = column with pos = column (-1 for padding); a query attends to the slots
    of its own segment up to its column, which is each prompt's causal mask, while the RoPE positions
    (applied before the step) restart at 0 for each prompt. With a `tail`, a layer is (segment,
    `TailInputs`) and the step also records the inputs of the prompts' tail tokens in this chunk.
    """

    def step(ctx: LayerContext, layer: tuple, shared, x: StepInputs):
        seg, *recorded = layer
        seg = write_entries(seg, x.k, x.v, jnp.where(x.new_pos >= 0, columns, -1), columns[:, 0])
        out = attend(
            x.q,
            seg.k,
            seg.v,
            seg.pos,
            columns,
            ctx.window,
            ctx.scale,
            ctx.impl,
            slot_is_position=True,  # slot = column, the position `attend`'s masking and block skipping read
            segment_ids=(q_segments, k_segments),
        )
        if tail is not None:
            recorded = [tail.record(recorded[0], x, columns[0, 0])]
        return out, (seg, *recorded), shared

    return step


def unpack_segment(
    packed: KVSegment, like: KVSegment, row_of: jax.Array, offset: jax.Array, held: jax.Array
) -> KVSegment:
    """`like` (a plain or eviction segment of a per-prompt state, [B, Hs, C, D]) holding each prompt's first
    `held` entries at slot = position, gathered from the packed rows' `packed` ([R, K, W, D], slot =
    column); other slots are zero with pos -1, a score buffer stays as it is. row_of, offset: int32[B]
    (`PackPlan`); held: int32[B], at most each prompt's length."""
    heads = np.asarray(like.heads)
    slots = jnp.arange(like.capacity, dtype=jnp.int32)  # [C]
    kept = slots[None, :] < held[:, None]  # [B, C]
    columns = jnp.clip(offset[:, None] + slots, 0, packed.capacity - 1)  # [B, C]

    def gather(x):  # [R, K, W, D] -> [B, Hs, C, D]
        rows = jnp.take(jnp.take(x, heads, axis=1), row_of, axis=0)  # [B, Hs, W, D]
        picked = jnp.take_along_axis(rows, columns[:, None, :, None], axis=2)  # [B, Hs, C, D]
        return jnp.where(kept[:, None, :, None], picked, 0).astype(like.k.dtype)

    pos = jnp.broadcast_to(jnp.where(kept, slots, -1)[:, None, :], like.pos.shape)  # [B, Hs, C]
    return like.replace(k=gather(packed.k), v=gather(packed.v), pos=pos)


def unpack_state(
    policy_name: str,
    packed: tuple[tuple, ...],
    like: KVState,
    row_of: jax.Array,
    offset: jax.Array,
    held: jax.Array,
) -> KVState:
    """The per-prompt prefill state `like` (a policy's empty prefill state) with each prompt's first `held`
    int32[B] entries in its KV segments, from the packed rows' layers (each a segment first), as the
    policy's own in-place prefill would have written them. Anything else in `like` (a policy's own
    accumulators) stays empty: `replay_tail` fills it."""
    layers = []
    for packed_layer, layer in zip(packed, like.layers):
        source = packed_layer[0]
        segments = []
        for seg in layer:
            if isinstance(seg, KVSegment) and type(seg) not in (KVSegment, EvictionSegment):
                raise ValueError(
                    f"packing cannot fill {policy_name}'s prefill state: it holds a {type(seg).__name__}, not "
                    "plain KV entries written in place"
                )
            segments.append(unpack_segment(source, seg, row_of, offset, held) if isinstance(seg, KVSegment) else seg)
        layers.append(tuple(segments))
    return like.replace(layers=tuple(layers))


def replay_tail(
    policy: Policy, config, state: KVState, recorded: tuple[TailInputs, ...], tail: Tail, lengths: jax.Array
) -> KVState:
    """`state` (`unpack_state`'s, holding each prompt's entries before `tail.start`) after `policy`'s own
    prefill step, layer by layer, on each prompt's tail tokens, whose inputs the packed rows recorded
    (`recorded`, per layer): it writes their entries and whatever it scores from the prompt's last
    queries. The steps' attention outputs are unused (the packed rows gave the hidden states), so they
    run the jnp path. lengths: int32[B], the prompts' lengths (`Prefill.prompt_lengths`)."""
    phase = Prefill(lengths)
    new_pos = jnp.where(tail.valid, tail.positions, -1)
    shared = state.shared
    layers = []
    for i, (layer, x) in enumerate(zip(state.layers, recorded)):
        ctx = LayerContext(i, window=config.sliding_window(i), scale=config.head_dim**-0.5, impl="reference")
        inputs = StepInputs(q=x.q, k=x.k, v=x.v, q_raw=x.q_raw, k_raw=x.k_raw, q_pos=tail.positions, new_pos=new_pos)
        _, layer, shared = policy.layer_step(ctx, layer, shared, inputs, phase)
        layers.append(layer)
    return state.replace(layers=tuple(layers), shared=shared)
