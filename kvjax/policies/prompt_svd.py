"""PromptSVD: CSKV's bi-branch cache with bases fitted to each prompt (an input-adaptive oracle).

Per layer, the channels of all KV heads together (X = Hkv * D) are projected onto an orthonormal rank-Rk
basis for keys and a rank-Rv basis for values. The cache stores each older token as its Rk + Rv features
instead of 2X numbers, and the last `residual` tokens at full precision: CSKV's bi-branch cache. Keys are
shrunk before RoPE, where they are far lower-rank, and rotated again at their positions when attended, as the
CSKV authors' modeling code does (on the bundled model, rank 16 of 64 keeps 99.0-99.8% of the key energy
before RoPE, 80-97% after it).

Where the bases come from: not from the model. CSKV (kvjax.policies.CSKV) factors the K and V projections
once, offline, on calibration text, and every prompt shares those factors. The minimiser of CSKV's
layer-wise reconstruction loss over a set of tokens has a closed form (Eckart-Young): the top right
singular vectors of those tokens' keys (values). PromptSVD takes it on each prompt itself when prefill
ends: no calibration set, no training, no file, and each sequence gets its own bases (X x R per layer,
counted in `kv_bytes`). Tokens decoded later are projected onto the prompt's bases once they leave the
exact window. Fitted to the very tokens it compresses, it is an input-adaptive oracle (closer to
ShadowKV's per-prompt SVD of the keys than to CSKV): the best any rank-R channel projection of this
prompt can do, which bounds what fixed factors reach.

Prefill keeps the whole prompt exact (the Full layout, so chunks may use the prefill kernel). Decoding
rebuilds the rotated keys and the values of every stored feature, then attends over them and the window
through the shared dispatch (the Pallas decode kernel on GPU/TPU): the cache is smaller, the per-step
arithmetic is not.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import attend
from kvjax.cached_attention import write_in_place_then_attend
from kvjax.config import ModelConfig, RopeConfig
from kvjax.kv_state import KVSegment, KVState, count, round_capacity, write_free_slot
from kvjax.policies.base import Layout, Policy, SegmentSpec
from kvjax.rope import rotate_at


@struct.dataclass(frozen=True)
class LowRankSegment:
    """One layer's cache: positions [0, latent_length) as low-rank features (slot = position), the newest
    tokens exact in `window`. The leading 1 of each feature array is the one group of all KV heads."""

    k_latent: jax.Array  # [B, 1, C, Rk]: unrotated keys of every KV head, projected
    v_latent: jax.Array  # [B, 1, C, Rv]
    k_basis: jax.Array  # [B, 1, X, Rk]: orthonormal columns, X = Hkv * D
    v_basis: jax.Array  # [B, 1, X, Rv]
    latent_length: jax.Array  # int32[B]
    rope_length: jax.Array  # int32[B]: the sequence length the prompt was rotated for (LongRoPE's choice)
    window: KVSegment  # rotated keys and values, [B, Hkv, W, D]
    rope: RopeConfig = struct.field(pytree_node=False)

    @property
    def heads(self) -> tuple[int, ...]:
        return self.window.heads

    def latent_positions(self) -> jax.Array:
        """int32[B, C]: the position of each feature slot, -1 where empty."""
        slots = jnp.arange(self.k_latent.shape[2], dtype=jnp.int32)  # [C]
        return jnp.where(slots < self.latent_length[:, None], slots, -1)

    def assembled(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Keys (rotated at their positions), values [B, Hkv, C + W, D] and positions int32[B, Hkv, C + W]
        in the Full layout (`features_then_window`)."""
        b, _, c, _ = self.k_latent.shape
        kh, d = len(self.heads), self.window.k.shape[-1]
        k = jnp.einsum("bcr,bxr->bcx", self.k_latent[:, 0], self.k_basis[:, 0]).reshape(b, c, kh, d)
        v = jnp.einsum("bcr,bxr->bcx", self.v_latent[:, 0], self.v_basis[:, 0]).reshape(b, c, kh, d)
        return features_then_window(k, v, self.latent_length, self.rope_length, self.window, self.rope)


def features_then_window(
    k: jax.Array, v: jax.Array, latent_length: jax.Array, rope_length: jax.Array, window: KVSegment, rope: RopeConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys, values [B, Hkv, C + W, D] and positions int32[B, Hkv, C + W] in the Full layout: the rebuilt
    (unrotated) keys k and values v [B, C, Hkv, D] at slots [0, latent_length) (slot = position), keys rotated
    there, the window's tokens after them in position order, so every row's entries fill a prefix (what the
    decode kernel assumes)."""
    b, c, kh, d = k.shape
    w = window.capacity
    slots = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))  # [B, C]
    k = rotate_at(rope, d, k, slots, jnp.max(rope_length))  # [B, C, K, D]
    pos = jnp.broadcast_to(jnp.where(slots < latent_length[:, None], slots, -1)[:, None], (b, kh, c))  # [B, K, C]
    pad = ((0, 0), (0, 0), (0, w), (0, 0))
    k, v = (jnp.pad(x.swapaxes(1, 2).astype(window.k.dtype), pad) for x in (k, v))  # [B, K, C + W, D]
    pos = jnp.pad(pos, pad[:3], constant_values=-1)
    order = jnp.argsort(jnp.where(window.pos >= 0, window.pos, jnp.iinfo(jnp.int32).max), axis=-1)  # [B, K, W]

    def after_features(x, new):  # [B, K, C + W, ...] <- the window's [B, K, W, ...] at latent_length
        new = jnp.take_along_axis(new, order.reshape(order.shape + (1,) * (new.ndim - 3)), axis=2)
        put = lambda row, rows_new, s: jax.lax.dynamic_update_slice_in_dim(row, rows_new, s, axis=1)
        return jax.vmap(put)(x, new, latent_length)

    return after_features(k, window.k), after_features(v, window.v), after_features(pos, window.pos)


def top_basis(x: jax.Array, valid: jax.Array, rank: int) -> jax.Array:
    """float32[B, X, rank]: the top right singular vectors of each row's valid tokens x [B, T, X].

    Eigenvectors of the X x X Gram matrix, largest eigenvalue first: the rank-`rank` subspace that
    reconstructs those tokens with the least squared error (Eckart-Young). The Gram matrix costs T X^2
    and its eigendecomposition X^3 once per layer and sequence (X = 1024 on Llama-3-8B), where an SVD
    of the tokens themselves would cost T X^2 with a larger constant and T x X of workspace.
    """
    x = jnp.where(valid[..., None], x.astype(jnp.float32), 0.0)
    gram = jnp.einsum("btx,bty->bxy", x, x, precision=jax.lax.Precision.HIGHEST)  # [B, X, X]
    _, vectors = jnp.linalg.eigh(gram)  # ascending eigenvalues
    top = vectors[..., ::-1][..., :rank]  # [B, X, rank]
    # Each vector's sign made canonical (its largest entry positive), so the features are reproducible.
    largest = jnp.take_along_axis(top, jnp.argmax(jnp.abs(top), axis=-2, keepdims=True), axis=-2)  # [B, 1, rank]
    return top * jnp.where(largest < 0, -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class PromptSVD(Policy):
    """Keys and values of tokens older than the last `residual` kept as rank ceil(density * Hkv * D)
    features per layer; the bases are the prompt's own top singular vectors (not CSKV's fixed factors)."""

    key_density: float = 0.5  # CSKV's k_density: share of the key channels kept
    value_density: float = 0.5  # v_density
    residual: int = 32  # CSKV's window of exact tokens

    def __post_init__(self):
        for name in ("key_density", "value_density"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"PromptSVD {name} must be in (0, 1]; got {value!r}")
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"PromptSVD residual must be a non-negative int; got {self.residual!r}")

    def ranks(self, config: ModelConfig) -> tuple[int, int]:
        """(Rk, Rv): features kept per token for keys and for values."""
        channels = config.num_kv_heads * config.head_dim
        return math.ceil(self.key_density * channels), math.ceil(self.value_density * channels)

    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        """The prompt exact while prefilling (slot = position); `finalize` shrinks it."""
        heads = tuple(range(config.num_kv_heads))
        return ((SegmentSpec(heads, round_capacity(prompt_len)),),) * config.num_layers

    def decode_room(self, config: ModelConfig, prompt_len: int, max_new_tokens: int) -> int:
        """Feature slots are slot = position (`finalize`): every slot the capacity rounds up to holds a token."""
        return round_capacity(prompt_len + max_new_tokens) - prompt_len

    def segment_step(self, ctx, segment, x, phase):
        if not isinstance(segment, LowRankSegment):  # prefill
            return write_in_place_then_attend(ctx, segment, x)
        if x.q.shape[1] != 1:
            raise ValueError(f"PromptSVD decodes one token per step; got {x.q.shape[1]}")
        seg = segment.replace(window=write_free_slot(segment.window, x.k, x.v, x.new_pos))
        keys, values, pos = seg.assembled()  # [B, Hs, C + W, ...]
        out = attend(x.q, keys, values, pos, x.q_pos, ctx.window, ctx.scale, ctx.impl)
        return out, self._retire_oldest(seg)

    def _retire_oldest(self, seg: LowRankSegment) -> LowRankSegment:
        """Moves each row's oldest window token into the features when the window holds more than `residual`.

        The oldest is always at position latent_length, so it lands in slot latent_length; a row that keeps
        its token writes there too, harmlessly, since slots from latent_length on are empty by definition.
        """
        win = seg.window
        b, kh, _, d = win.k.shape
        over = count(win)[:, 0] > self.residual  # [B] (every head holds the same tokens)
        oldest = jnp.argmin(jnp.where(win.pos[:, 0] >= 0, win.pos[:, 0], jnp.iinfo(jnp.int32).max), axis=-1)  # [B]

        def take(x):  # [B, K, W, D] -> [B, 1, K, D]
            return jnp.take_along_axis(x, oldest[:, None, None, None], axis=2).swapaxes(1, 2)

        at = seg.latent_length[:, None]  # [B, 1] its position
        k = rotate_at(seg.rope, d, take(win.k), at, jnp.max(seg.rope_length), inverse=True).reshape(b, kh * d)
        v = take(win.v).astype(jnp.float32).reshape(b, kh * d)
        k_feat = jnp.einsum("bx,bxr->br", k, seg.k_basis[:, 0].astype(jnp.float32))  # [B, Rk]
        v_feat = jnp.einsum("bx,bxr->br", v, seg.v_basis[:, 0].astype(jnp.float32))  # [B, Rv]

        def put(latent, feat):  # [B, 1, C, R] <- [B, R] at slot latent_length
            one = lambda row, new, s: jax.lax.dynamic_update_slice_in_dim(row, new[None].astype(row.dtype), s, 0)
            return jax.vmap(one)(latent[:, 0], feat, seg.latent_length)[:, None]

        leaving = over[:, None, None] & (jnp.arange(win.capacity) == oldest[:, None])[:, None, :]  # [B, 1, W]
        return seg.replace(
            k_latent=put(seg.k_latent, k_feat),
            v_latent=put(seg.v_latent, v_feat),
            latent_length=seg.latent_length + over.astype(jnp.int32),
            window=win.replace(pos=jnp.where(leaving, -1, win.pos)),
        )

    def finalize(self, config: ModelConfig, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """Fits each layer's bases to its prompt and keeps all but the last `residual` tokens as features."""
        rank_k, rank_v = self.ranks(config)
        lengths = state.length  # [B]
        capacity = round_capacity(prompt_len + max_new_tokens)  # feature slots: slot = position
        window_capacity = round_capacity(self.residual + 1)  # the last `residual` plus the arriving token
        layers = []
        for (seg,) in state.layers:
            b, kh, c, d = seg.k.shape
            slots = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))  # [B, C] slot = position
            rope_length = jnp.full((b,), jnp.max(lengths), jnp.int32)
            k = rotate_at(config.rope, d, seg.k.swapaxes(1, 2), slots, rope_length[0], inverse=True)  # [B, C, K, D]
            k, v = k.reshape(b, c, kh * d), seg.v.swapaxes(1, 2).astype(jnp.float32).reshape(b, c, kh * d)
            # Stored in the cache dtype; the prompt is projected on the stored bases, as decoded tokens will be.
            k_basis = top_basis(k, slots < lengths[:, None], rank_k).astype(seg.k.dtype)  # [B, X, Rk]
            v_basis = top_basis(v, slots < lengths[:, None], rank_v).astype(seg.k.dtype)
            latent_length = jnp.maximum(lengths - self.residual, 0)
            old = (slots < latent_length[:, None])[..., None]  # [B, C, 1]

            def features(x, basis):  # [B, C, X] -> [B, 1, capacity, R]
                feat = jnp.einsum("bcx,bxr->bcr", x, basis.astype(jnp.float32))
                feat = jnp.where(old, feat, 0.0).astype(seg.k.dtype)
                return jnp.pad(feat, ((0, 0), (0, capacity - c), (0, 0)))[:, None]

            layers.append(
                (
                    LowRankSegment(
                        k_latent=features(k, k_basis),
                        v_latent=features(v, v_basis),
                        k_basis=k_basis[:, None],
                        v_basis=v_basis[:, None],
                        latent_length=latent_length,
                        rope_length=rope_length,
                        window=window_tail(seg, latent_length, window_capacity),
                        rope=config.rope,
                    ),
                )
            )
        return state.replace(layers=tuple(layers))


def window_tail(seg: KVSegment, start: jax.Array, capacity: int) -> KVSegment:
    """The entries at slots [start, start + capacity) of each row (slot = position), empty past the end."""
    pad = ((0, 0), (0, 0), (0, capacity), (0, 0))
    k, v = jnp.pad(seg.k, pad), jnp.pad(seg.v, pad)
    pos = jnp.pad(seg.pos, pad[:3], constant_values=-1)

    def window(x, s):  # one row [K, C + capacity, ...] -> [K, capacity, ...]
        return jax.lax.dynamic_slice_in_dim(x, s, capacity, axis=1)

    cut = jax.vmap(window)
    return seg.replace(k=cut(k, start), v=cut(v, start), pos=cut(pos, start))
