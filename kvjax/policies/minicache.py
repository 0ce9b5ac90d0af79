"""MiniCache (Liu et al., 2024): adjacent layers share their KV directions from the middle of the network on.

From `start_layer` (L // 2 by default) on, layers are taken in pairs (a, b) = (s, s + 1), (s + 2, s + 3), ...
(a last odd layer stays Full). For every prompt token and KV head, the pair's keys (and, separately, values)
x_a, x_b [D] are split into magnitudes and unit directions u_a, u_b at angle W = arccos(u_a . u_b), and the
directions are merged by spherical interpolation (SLERP, the authors' t = 0.6, t = 1 being layer b):

    e = sin((1 - t) W) / sin(W) * u_a + sin(t W) / sin(W) * u_b          (unit length; W ~ 0: normalised lerp)

The pair stores e once (`MergedPairs`, the state's `shared`) and each layer its own norms |x_a|, |x_b|
(`MergedSegment`); layer a attends with |x_a| e and layer b with |x_b| e. Keys are merged after RoPE: both
layers rotate a token by the same angle, which keeps norms and the angle between them, so it makes no
difference to the merge.

Token retention: the angular distance d = W / pi per (token, KV head), normalised per (sequence, KV head)
over the prompt, n = (d - d_min) / (d_max - d_min). Entries with n >= 1 - `gamma` (the most distinct pairs,
in the top `gamma` share of the row's distance range, for keys or for values) stay unmerged: both layers
keep them exact beside the merge. Static shapes need a cap: at most ceil(`max_retained` * prompt) entries
per (sequence, KV head) are kept, the most distant first (a kvjax bound; the authors' count is unbounded).

When it acts: prefill runs Full (every layer attends to the exact, unmerged prompt, also across chunks);
`finalize` merges the prompt, as the authors merge after prefill. Decoded tokens are not merged: each merged
layer appends them to its own exact window (capacity max_new_tokens), so the saving is the prompt's. Decoding
rebuilds each merged layer's prompt entries (norm x direction, the retained ones exact) and attends over them
and the window with every row's entries a prefix (what the decode kernel assumes).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import attend
from kvjax.cached_attention import write_in_place_then_attend
from kvjax.config import ModelConfig
from kvjax.kv_state import KVSegment, KVState, empty_segment, round_capacity, write_free_slot
from kvjax.policies.base import Layout, Policy
from kvjax.policies.full import Full

_TINY = 1e-12  # below this a norm is zero and sin(W) is too small to divide by


@struct.dataclass(frozen=True)
class MergedPairs:
    """`KVState.shared` after prefill: per merged pair of layers, the prompt's merged unit directions."""

    k_dir: jax.Array  # [B, P, K, C, D]: keys' directions, slot = position
    v_dir: jax.Array  # [B, P, K, C, D]
    length: jax.Array  # int32[B]: prompt tokens merged per sequence (slots [0, length))
    start: int = struct.field(pytree_node=False)  # the first merged layer; pair p holds start + 2p, start + 2p + 1


@struct.dataclass(frozen=True)
class MergedSegment:
    """One merged layer's own part: its norms of the pair's shared directions, the prompt entries the merge
    leaves out (exact), and the tokens decoded since (exact)."""

    k_norm: jax.Array  # [B, K, C]: |k| per prompt slot
    v_norm: jax.Array  # [B, K, C]
    retained: KVSegment  # [B, K, R, D]: exact entries at their prompt positions (-1: unused)
    window: KVSegment  # [B, K, W, D]: decoded tokens, filled in order

    @property
    def heads(self) -> tuple[int, ...]:
        return self.window.heads


def slerp_merge(xa: jax.Array, xb: jax.Array, t: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The merged unit direction [..., D], the norms |xa|, |xb| [...] and the angular distance W / pi [...]
    of two layers' vectors xa, xb [..., D] (float32; t = 0 gives xa's direction, t = 1 xb's)."""
    xa, xb = xa.astype(jnp.float32), xb.astype(jnp.float32)
    na, nb = jnp.linalg.norm(xa, axis=-1), jnp.linalg.norm(xb, axis=-1)  # [...]
    ua = xa / jnp.maximum(na, _TINY)[..., None]  # [..., D]
    ub = xb / jnp.maximum(nb, _TINY)[..., None]
    angle = jnp.arccos(jnp.clip(jnp.einsum("...d,...d->...", ua, ub), -1.0, 1.0))  # [...]
    sin = jnp.sin(angle)
    far = sin > 1e-6
    wa = jnp.where(far, jnp.sin((1 - t) * angle) / jnp.where(far, sin, 1.0), 1 - t)  # [...]
    wb = jnp.where(far, jnp.sin(t * angle) / jnp.where(far, sin, 1.0), t)
    e = wa[..., None] * ua + wb[..., None] * ub
    lerp = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), _TINY)  # (anti)parallel: normalised lerp
    return jnp.where(far[..., None], e, lerp), na, nb, angle / jnp.pi


def retention_priority(distances: list[jax.Array], valid: jax.Array, gamma: float) -> jax.Array:
    """float32[B, K, C]: per entry, its largest normalised angular distance (n = (d - d_min) / (d_max - d_min)
    over the row's valid entries) among `distances` (keys', values'), where it is at least 1 - gamma; -inf for
    entries that merge. distances: float32[B, K, C] each; valid: bool[B, K, C]."""
    best = jnp.full(valid.shape, -jnp.inf)
    for d in distances:
        low = jnp.min(jnp.where(valid, d, jnp.inf), axis=-1, keepdims=True)  # [B, K, 1]
        high = jnp.max(jnp.where(valid, d, -jnp.inf), axis=-1, keepdims=True)
        spread = high - low
        n = jnp.where(spread > 0, (d - low) / jnp.where(spread > 0, spread, 1.0), 0.0)  # [B, K, C]
        best = jnp.maximum(best, jnp.where(valid & (n >= 1 - gamma), n, -jnp.inf))
    return best


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class MiniCache(Policy):
    """From `start_layer` (None: L // 2) on, each pair of adjacent layers stores one SLERP-merged direction
    (interpolation `t`) per prompt token and KV head with both layers' norms; the entries whose angle is in the
    top `gamma` of their row's range stay exact (at most `max_retained` of the prompt per row, a static cap)."""

    start_layer: int | None = None
    t: float = 0.6
    gamma: float = 0.05
    max_retained: float = 0.05

    def __post_init__(self):
        if self.start_layer is not None and (not isinstance(self.start_layer, int) or self.start_layer < 0):
            raise ValueError(f"MiniCache start_layer must be a non-negative int or None; got {self.start_layer!r}")
        if not _is_number(self.t) or not 0.0 <= self.t <= 1.0:
            raise ValueError(f"MiniCache t (the SLERP interpolation) must be in [0, 1]; got {self.t!r}")
        if not _is_number(self.gamma) or not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"MiniCache gamma (the retention threshold) must be in [0, 1]; got {self.gamma!r}")
        if not _is_number(self.max_retained) or not 0.0 <= self.max_retained <= 1.0:
            raise ValueError(f"MiniCache max_retained must be a fraction in [0, 1]; got {self.max_retained!r}")

    def start(self, config: ModelConfig) -> int:
        return config.num_layers // 2 if self.start_layer is None else self.start_layer

    def pairs(self, config: ModelConfig) -> int:
        """How many pairs of adjacent layers share directions."""
        return max(config.num_layers - self.start(config), 0) // 2

    def retained_capacity(self, prompt_len: int) -> int:
        """Exact prompt entries kept per (sequence, KV head) of a merged layer."""
        return min(round_capacity(math.ceil(self.max_retained * prompt_len)), round_capacity(prompt_len))

    def check_model(self, config: ModelConfig) -> None:
        if self.start(config) > config.num_layers:
            raise ValueError(f"MiniCache start_layer {self.start_layer} is past the model's {config.num_layers} layers")

    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        """Full's while prefilling: the prompt attends to itself unmerged; `finalize` merges it."""
        return Full().layout(config, prompt_len, max_new_tokens, chunk)

    def segment_step(self, ctx, segment, x, phase):
        return write_in_place_then_attend(ctx, segment, x)

    def layer_step(self, ctx, segments, shared, x, phase):
        if not isinstance(segments[0], MergedSegment):  # prefill, and the unmerged layers
            return super().layer_step(ctx, segments, shared, x, phase)
        (seg,) = segments
        if x.q.shape[1] != 1:
            raise ValueError(f"MiniCache decodes one token per step; got {x.q.shape[1]}")
        seg = seg.replace(window=write_free_slot(seg.window, x.k, x.v, x.new_pos))
        k, v, pos = assembled(seg, shared, ctx.index)
        return attend(x.q, k, v, pos, x.q_pos, ctx.window, ctx.scale, ctx.impl), (seg,), shared

    def finalize(self, config: ModelConfig, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """Merges the prompt's entries of every pair; the pair's second layer keeps no copy of the directions."""
        start, count = self.start(config), self.pairs(config)
        if count == 0:
            return state
        c, r, w = round_capacity(prompt_len), self.retained_capacity(prompt_len), round_capacity(max_new_tokens)
        layers, k_dirs, v_dirs = list(state.layers), [], []
        for p in range(count):
            (a,), (b,) = layers[start + 2 * p], layers[start + 2 * p + 1]
            k_dir, ka_norm, kb_norm, k_dist = slerp_merge(a.k[:, :, :c], b.k[:, :, :c], self.t)  # [B, K, C, ...]
            v_dir, va_norm, vb_norm, v_dist = slerp_merge(a.v[:, :, :c], b.v[:, :, :c], self.t)
            valid = a.pos[:, :, :c] >= 0  # [B, K, C]
            priority = retention_priority([k_dist, v_dist], valid, self.gamma)
            top, slots = jax.lax.top_k(priority, r)  # [B, K, R]
            # In position order, unused last: top_k orders ties (two entries at n = 1) as the partitioning happens to.
            slots = jnp.sort(jnp.where(top > -jnp.inf, slots, c), axis=-1)
            kept = jnp.where(slots < c, slots, -1).astype(jnp.int32)
            slots = jnp.minimum(slots, c - 1)
            for layer, seg, k_norm, v_norm in (
                (start + 2 * p, a, ka_norm, va_norm),
                (start + 2 * p + 1, b, kb_norm, vb_norm),
            ):
                layers[layer] = (
                    MergedSegment(
                        k_norm=k_norm.astype(seg.k.dtype),
                        v_norm=v_norm.astype(seg.k.dtype),
                        retained=_gather(seg, slots, kept),
                        window=empty_segment(seg.k.shape[0], seg.heads, w, seg.k.shape[-1], seg.k.dtype),
                    ),
                )
            k_dirs.append(k_dir.astype(a.k.dtype))
            v_dirs.append(v_dir.astype(a.k.dtype))
        shared = MergedPairs(k_dir=jnp.stack(k_dirs, 1), v_dir=jnp.stack(v_dirs, 1), length=state.length, start=start)
        return state.replace(layers=tuple(layers), shared=shared)


def _gather(seg: KVSegment, slots: jax.Array, kept: jax.Array) -> KVSegment:
    """The segment's entries at `slots` int32[B, K, R] (slot = position), pos `kept` (-1: not retained, zeroed)."""
    idx = slots[..., None]  # [B, K, R, 1]
    pick = lambda x: jnp.where(kept[..., None] >= 0, jnp.take_along_axis(x, idx, axis=2), 0)  # noqa: E731
    return KVSegment(k=pick(seg.k), v=pick(seg.v), pos=kept, heads=seg.heads)


def rebuilt(seg: MergedSegment, shared: MergedPairs, layer) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A merged layer's prompt entries: keys, values [B, K, C, D] (norm x the pair's direction, the retained
    entries exact) and positions int32[B, K, C] (slot = position, -1 past the prompt). `layer` may be traced."""
    pair = (jnp.asarray(layer) - shared.start) // 2
    k_dir = jax.lax.dynamic_index_in_dim(shared.k_dir, pair, axis=1, keepdims=False)  # [B, K, C, D]
    v_dir = jax.lax.dynamic_index_in_dim(shared.v_dir, pair, axis=1, keepdims=False)
    dtype = seg.retained.k.dtype
    k = (seg.k_norm.astype(jnp.float32)[..., None] * k_dir.astype(jnp.float32)).astype(dtype)
    v = (seg.v_norm.astype(jnp.float32)[..., None] * v_dir.astype(jnp.float32)).astype(dtype)
    c = k.shape[2]
    kept = seg.retained.pos
    at = jnp.where(kept >= 0, kept, c)  # [B, K, R]: unused rows land out of range and are dropped

    def put(row, idx, new):  # [C, D] <- [R, D] at idx
        return row.at[idx].set(new, mode="drop")

    per_row = jax.vmap(jax.vmap(put))
    k, v = per_row(k, at, seg.retained.k), per_row(v, at, seg.retained.v)
    b, kh = k.shape[:2]
    slots = jnp.arange(c, dtype=jnp.int32)
    pos = jnp.where(slots < shared.length[:, None], slots, -1)  # [B, C]
    return k, v, jnp.broadcast_to(pos[:, None], (b, kh, c))


def assembled(seg: MergedSegment, shared: MergedPairs, layer) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys, values [B, K, C + W, D] and positions int32[B, K, C + W]: the rebuilt prompt at slots
    [0, length), the window's tokens right after it, so every row's entries fill a prefix."""
    k, v, pos = rebuilt(seg, shared, layer)
    win = seg.window
    pad = ((0, 0), (0, 0), (0, win.capacity), (0, 0))
    k, v, pos = jnp.pad(k, pad), jnp.pad(v, pad), jnp.pad(pos, pad[:3], constant_values=-1)

    def after_prompt(x, new):  # [B, K, C + W, ...] <- the window's [B, K, W, ...] at each row's length
        put = lambda row, rows_new, s: jax.lax.dynamic_update_slice_in_dim(row, rows_new, s, axis=1)  # noqa: E731
        return jax.vmap(put)(x, new, shared.length)

    return after_prompt(k, win.k), after_prompt(v, win.v), after_prompt(pos, win.pos)
