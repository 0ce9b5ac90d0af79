"""CSKV (Wang et al., 2024): fixed low-rank factors of the key and value projections; the cache holds each
token's low-rank features, the newest `residual` tokens exact.

Per layer, CSKV factors W_k [E, X] (X = Hkv * D, all KV heads together) as A_k B_k, A_k [E, Rk] and
B_k [Rk, X], from calibration text (SVD, or ASVD: the SVD of diag(s) W_k with s the inputs' mean absolute
value per channel to the power `alpha`, then A_k = diag(s)^-1 U Sigma), optionally fine-tuned on the
layer-wise reconstruction loss |x W_k - x A_k B_k|^2; the same for W_v. The cache stores x A_k (Rk numbers
per token) and x A_v (Rv) instead of 2X, plus the last `residual` tokens at full precision (the bi-branch
cache); attention rebuilds keys as (x A_k) B_k, before RoPE, and rotates them at their positions, as the
authors' modeling code does. Prefill attends over the exact keys (the Full layout, so chunks may use the
prefill kernel); `finalize` keeps the prompt as features.

Factors here (`fit_factors`, kept in the policy's `params`): B = V_r^T with orthonormal rows and A = W V_r
(`down` = V_r [X, R], `up` = V_r^T [R, X]), so x A = (x W) V_r: the cache's features are read from the keys
the model projects anyway (k before RoPE, bias removed), and no hidden-size projection is added. The authors
split Sigma as sqrt(Sigma) on each side; the product A B and the error are the same, and the features differ
by a fixed scale per channel. Fine-tuning trains `down` and `up` (A = W_k down), which contains the loss's
minimiser: the top right singular vectors of the calibration keys (Eckart-Young).

Deviations, stated: the exact window slides one token at a time (always the last `residual`), where the
authors' code compresses a full window of 32 at once (1 to 32 exact tokens); fine-tuning takes the loss over the
calibration tokens in closed form from their Gram matrices (full batch, Adam), where the authors run AdamW
over minibatches of The Pile.

On disk (`save_factors`): `DIR/cskv_factors.npz` (numpy, no pickle): float32 k_down [L, X, Rk], k_up
[L, Rk, X], v_down [L, X, Rv], v_up [L, Rv, X], k_bias, v_bias [L, X] (the projections' biases, zero
without), and `meta`, a JSON string (format, the model's shape, how the factors were fitted).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from kvjax.attention import attend
from kvjax.cached_attention import write_in_place_then_attend
from kvjax.checkpoint import CheckpointError
from kvjax.config import ModelConfig, RopeConfig
from kvjax.kv_state import KVSegment, KVState, count, round_capacity, write_free_slot
from kvjax.language_model import LanguageModel
from kvjax.layer_step import LayerContext
from kvjax.policies.base import Layout, Policy, SegmentSpec
from kvjax.policies.prompt_svd import features_then_window, window_tail
from kvjax.rope import rope_tables, rotate_at

FACTORS_FILE = "cskv_factors.npz"
FACTORS_FORMAT = "kvjax-cskv-factors-1"
FACTOR_NAMES = ("k_down", "k_up", "v_down", "v_up", "k_bias", "v_bias")

Factors = dict[str, jax.Array]  # FACTOR_NAMES -> float32 arrays, every layer stacked on the leading axis

_NO_FACTORS = (
    "fit them with kvjax.policies.cskv.fit_factors(model, calibration_tokens) or load saved ones with "
    "CSKV.from_pretrained(DIR, model.config) (CLI: --policy-file cskv=DIR)"
)


@struct.dataclass(frozen=True)
class FactoredSegment:
    """One layer's cache: every token's features (slot = position), read for positions [0, latent_length);
    the newest tokens exact in `window`. The leading 1 of each feature array is the one group of all KV heads."""

    k_latent: jax.Array  # [B, 1, C, Rk]: (k - k_bias) @ k_down, k before RoPE
    v_latent: jax.Array  # [B, 1, C, Rv]
    latent_length: jax.Array  # int32[B]
    rope_length: jax.Array  # int32[B]: the sequence length the prompt was rotated for (LongRoPE's choice)
    window: KVSegment  # rotated keys and values, [B, Hkv, W, D]
    rope: RopeConfig = struct.field(pytree_node=False)

    @property
    def heads(self) -> tuple[int, ...]:
        return self.window.heads

    def assembled(self, factors: Factors) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Keys (rebuilt, then rotated at their positions), values [B, Hkv, C + W, D] and positions
        int32[B, Hkv, C + W] in the Full layout; `factors` are this layer's (k_up [Rk, X], ...)."""
        b, _, c, _ = self.k_latent.shape
        kh, d = len(self.heads), self.window.k.shape[-1]

        def rebuilt(latent, up, bias):  # [B, 1, C, R] -> [B, C, K, D]
            x = jnp.einsum("bcr,rx->bcx", latent[:, 0].astype(jnp.float32), up) + bias
            return x.reshape(b, c, kh, d)

        k = rebuilt(self.k_latent, factors["k_up"], factors["k_bias"])
        v = rebuilt(self.v_latent, factors["v_up"], factors["v_bias"])
        return features_then_window(k, v, self.latent_length, self.rope_length, self.window, self.rope)


def features(x: jax.Array, down: jax.Array, bias: jax.Array) -> jax.Array:
    """float32[B, T, R]: the low-rank features (x - bias) @ down of keys before RoPE (or values) x [B, T, K, D];
    down [X, R], bias [X], X = K * D."""
    b, t = x.shape[:2]
    return jnp.einsum("btx,xr->btr", x.reshape(b, t, -1).astype(jnp.float32) - bias, down)


@dataclasses.dataclass(frozen=True)
class CSKV(Policy):
    """Keys and values of tokens older than the last `residual` read from their rank-Rk and rank-Rv
    features on fixed, calibrated factors of W_k and W_v (`params`, from `fit_factors` or a file)."""

    residual: int = 32  # the authors' window of exact tokens (q_window_size)

    file_needed = "a CSKV factors folder: the DIR of kvjax.policies.cskv.save_factors (or `kvjax fit-cskv --out DIR`)"

    def __post_init__(self):
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"CSKV residual must be a non-negative int; got {self.residual!r}")

    @classmethod
    def from_file(cls, path, config, **options) -> CSKV:
        return cls.from_pretrained(path, config, **options)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, config: ModelConfig, **fields) -> CSKV:
        """The policy with the factors saved in `directory` for a model of `config`."""
        factors, _ = load_factors(directory, config)
        return cls(**fields, params=factors)

    def ranks(self) -> tuple[int, int]:
        """(Rk, Rv): features kept per token for keys and for values, as the factors say."""
        if self.params is None:
            raise ValueError(f"CSKV has no factors; {_NO_FACTORS}")
        return self.params["k_down"].shape[-1], self.params["v_down"].shape[-1]

    def check_model(self, config: ModelConfig) -> None:
        if self.params is None:
            raise ValueError(f"CSKV needs factors of W_k and W_v and has none; {_NO_FACTORS}")
        rank_k, rank_v = self.ranks()
        want = factor_shapes(config, rank_k, rank_v)
        got = {name: tuple(self.params[name].shape) for name in FACTOR_NAMES if name in self.params}
        if got != want:
            raise ValueError(f"CSKV's factors {got} do not fit this model (expected {want})")

    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        """The prompt exact while prefilling (slot = position); `finalize` turns it into features."""
        heads = tuple(range(config.num_kv_heads))
        return ((SegmentSpec(heads, round_capacity(prompt_len)),),) * config.num_layers

    def decode_room(self, config: ModelConfig, prompt_len: int, max_new_tokens: int) -> int:
        """Feature slots are slot = position: every slot the capacity rounds up to holds a token."""
        return round_capacity(prompt_len + max_new_tokens) - prompt_len

    def layer_factors(self, layer: int | jax.Array) -> Factors:
        """One layer's factors (`layer` may be traced, inside a scanned run of layers)."""
        return {name: self.params[name][layer].astype(jnp.float32) for name in FACTOR_NAMES}

    def segment_step(self, ctx: LayerContext, segment, x, phase):
        if not isinstance(segment, FactoredSegment):  # prefill: exact keys, the Full layout
            return write_in_place_then_attend(ctx, segment, x)
        if x.q.shape[1] != 1:
            raise ValueError(f"CSKV decodes one token per step; got {x.q.shape[1]}")
        f = self.layer_factors(ctx.index)
        b, c = segment.k_latent.shape[0], segment.k_latent.shape[2]
        slot = jnp.where(x.new_pos[:, 0] >= 0, x.new_pos[:, 0], c)  # [B]; a padded row writes nothing

        def write(latent, feat):  # [B, 1, C, R] <- [B, 1, R] at slot = position
            return latent.at[jnp.arange(b), 0, slot].set(feat[:, 0].astype(latent.dtype), mode="drop")

        seg = segment.replace(
            k_latent=write(segment.k_latent, features(x.k_raw, f["k_down"], f["k_bias"])),
            v_latent=write(segment.v_latent, features(x.v, f["v_down"], f["v_bias"])),
            window=write_free_slot(segment.window, x.k, x.v, x.new_pos),
        )
        keys, values, pos = seg.assembled(f)  # [B, Hs, C + W, ...]
        out = attend(x.q, keys, values, pos, x.q_pos, ctx.window, ctx.scale, ctx.impl)
        return out, self._retire_oldest(seg)

    def _retire_oldest(self, seg: FactoredSegment) -> FactoredSegment:
        """Each row's oldest window token leaves the window when it holds more than `residual`; its features
        were written when it arrived, so it is read from them from now on (latent_length + 1)."""
        win = seg.window
        over = count(win)[:, 0] > self.residual  # [B] (every head holds the same tokens)
        oldest = jnp.argmin(jnp.where(win.pos[:, 0] >= 0, win.pos[:, 0], jnp.iinfo(jnp.int32).max), axis=-1)  # [B]
        leaving = over[:, None, None] & (jnp.arange(win.capacity) == oldest[:, None])[:, None, :]  # [B, 1, W]
        return seg.replace(
            latent_length=seg.latent_length + over.astype(jnp.int32),
            window=win.replace(pos=jnp.where(leaving, -1, win.pos)),
        )

    def finalize(self, config: ModelConfig, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """Every prompt token's features, read for all but the last `residual`; those stay exact."""
        self.check_model(config)
        lengths = state.length  # [B]
        capacity = round_capacity(prompt_len + max_new_tokens)  # feature slots: slot = position
        window_capacity = round_capacity(self.residual + 1)  # the last `residual` plus the arriving token
        layers = []
        for index, (seg,) in enumerate(state.layers):
            f = self.layer_factors(index)
            b, _, c, d = seg.k.shape
            slots = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))  # [B, C] slot = position
            rope_length = jnp.full((b,), jnp.max(lengths), jnp.int32)
            k = rotate_at(config.rope, d, seg.k.swapaxes(1, 2), slots, rope_length[0], inverse=True)  # [B, C, K, D]
            held = (slots < lengths[:, None])[..., None]  # [B, C, 1]

            def stored(x, down, bias):  # [B, C, K, D] -> [B, 1, capacity, R]
                feat = jnp.where(held, features(x, down, bias), 0.0).astype(seg.k.dtype)
                return jnp.pad(feat, ((0, 0), (0, capacity - c), (0, 0)))[:, None]

            latent_length = jnp.maximum(lengths - self.residual, 0)
            layers.append(
                (
                    FactoredSegment(
                        k_latent=stored(k, f["k_down"], f["k_bias"]),
                        v_latent=stored(seg.v.swapaxes(1, 2), f["v_down"], f["v_bias"]),
                        latent_length=latent_length,
                        rope_length=rope_length,
                        window=window_tail(seg, latent_length, window_capacity),
                        rope=config.rope,
                    ),
                )
            )
        return state.replace(layers=tuple(layers))


# ---------------------------------------------------------------------------------------------------------
# Fitting the factors


def factor_shapes(config: ModelConfig, rank_k: int, rank_v: int) -> dict[str, tuple[int, ...]]:
    """Stacked shapes of a model's factors: down [L, X, R], up [L, R, X], biases [L, X], X = Hkv * D."""
    n, x = config.num_layers, config.num_kv_heads * config.head_dim
    return {
        "k_down": (n, x, rank_k),
        "k_up": (n, rank_k, x),
        "v_down": (n, x, rank_v),
        "v_up": (n, rank_v, x),
        "k_bias": (n, x),
        "v_bias": (n, x),
    }


def density_rank(density: float, config: ModelConfig) -> int:
    """The authors' rank for a density: int(density * D) features per KV head, times Hkv (at least 1 per head)."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"CSKV density must be in (0, 1]; got {density!r}")
    return max(1, int(density * config.head_dim)) * config.num_kv_heads


@dataclasses.dataclass(frozen=True)
class CalibrationStats:
    """Per layer, what fitting needs from the calibration tokens: the attention input's mean absolute value
    per channel (ASVD's statistic) float32[L, E]; the Gram matrices of the keys before RoPE and of the
    values, biases removed, float32[L, X, X]; the projections W_k, W_v float32[L, E, X] and their biases
    float32[L, X]; and how many tokens were seen."""

    abs_mean: np.ndarray
    k_gram: np.ndarray
    v_gram: np.ndarray
    w_k: np.ndarray
    w_v: np.ndarray
    k_bias: np.ndarray
    v_bias: np.ndarray
    tokens: int


@functools.partial(jax.jit, static_argnames=("graphdef", "window", "scale"))
def _block_stats(graphdef, block_params, h, positions, valid, cos, sin, *, window, scale):
    """One decoder block over the calibration batch h [B, T, E]: its output and the block's statistics."""
    block = nnx.merge(graphdef, block_params)
    x = block.input_norm(h)  # [B, T, E]: the attention's input
    _, k, v = block.attn.project(x)  # [B, T, K, D], biases included
    m = valid[..., None].astype(jnp.float32)  # [B, T, 1]
    b, t = valid.shape
    hi = jax.lax.Precision.HIGHEST
    abs_sum = jnp.sum(jnp.abs(x.astype(jnp.float32)) * m, axis=(0, 1))  # [E]
    k = k.reshape(b, t, -1).astype(jnp.float32)
    v = v.reshape(b, t, -1).astype(jnp.float32)
    k_bias = block.attn.k_bias[...].reshape(-1) if block.attn.config.qkv_bias else jnp.zeros(k.shape[-1])
    v_bias = block.attn.v_bias[...].reshape(-1) if block.attn.config.qkv_bias else jnp.zeros(v.shape[-1])
    k, v = (k - k_bias) * m, (v - v_bias) * m
    k_gram = jnp.einsum("btx,bty->xy", k, k, precision=hi)  # [X, X]
    v_gram = jnp.einsum("btx,bty->xy", v, v, precision=hi)
    ctx = LayerContext(0, window=window, scale=scale)
    out, _, _ = block(h, positions, valid, (cos, sin), ctx, None, None, None)
    return out, abs_sum, k_gram, v_gram


def calibration_stats(model: LanguageModel, calibration_tokens, lengths=None, batch: int = 4) -> CalibrationStats:
    """Runs the model over calibration token rows int32[N, T] (the first `lengths[i]` of row i; all by default),
    `batch` rows at a time, layer by layer, and gathers what `factors_from_stats` needs."""
    cfg = model.config
    tokens = np.asarray(calibration_tokens, np.int32)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    lengths = np.full(len(tokens), tokens.shape[1]) if lengths is None else np.asarray(lengths)
    if tokens.size == 0 or np.any(lengths < 1) or np.any(lengths > tokens.shape[1]):
        raise ValueError(f"calibration needs rows of at least one token; got shape {tokens.shape}, lengths {lengths}")
    module = model.module()
    graphdef = nnx.split(module.blocks[0])[0]
    block_params = [nnx.split(block)[1] for block in module.blocks]
    n, x = cfg.num_layers, cfg.num_kv_heads * cfg.head_dim
    abs_sum, k_gram, v_gram = np.zeros((n, cfg.hidden_size)), np.zeros((n, x, x)), np.zeros((n, x, x))
    for start in range(0, len(tokens), batch):
        rows, lens = jnp.asarray(tokens[start : start + batch]), jnp.asarray(lengths[start : start + batch])
        b, t = rows.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        valid = positions < lens[:, None]
        cos, sin = rope_tables(cfg.rope, cfg.head_dim, positions, jnp.max(lens))
        h = module.embed[...][rows]  # [B, T, E]
        for i in range(n):
            h, a, gk, gv = _block_stats(
                graphdef,
                block_params[i],
                h,
                positions,
                valid,
                cos,
                sin,
                window=cfg.sliding_window(i),
                scale=cfg.head_dim**-0.5,
            )
            abs_sum[i] += np.asarray(a, np.float64)
            k_gram[i] += np.asarray(gk, np.float64)
            v_gram[i] += np.asarray(gv, np.float64)
    attn = [block.attn for block in module.blocks]
    bias = lambda name: np.stack(  # noqa: E731
        [
            np.asarray(getattr(a, name)[...], np.float32).reshape(-1) if cfg.qkv_bias else np.zeros(x, np.float32)
            for a in attn
        ]
    )
    total = int(lengths.sum())
    return CalibrationStats(
        abs_mean=(abs_sum / total).astype(np.float32),
        k_gram=k_gram.astype(np.float32),
        v_gram=v_gram.astype(np.float32),
        w_k=np.stack([np.asarray(a.k_proj[...], np.float32).reshape(cfg.hidden_size, x) for a in attn]),
        w_v=np.stack([np.asarray(a.v_proj[...], np.float32).reshape(cfg.hidden_size, x) for a in attn]),
        k_bias=bias("k_bias"),
        v_bias=bias("v_bias"),
        tokens=total,
    )


def svd_factors(w: np.ndarray, rank: int, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(down [X, rank], up [rank, X]) for W [E, X]: V_r of the SVD of diag(scale) W (plain SVD when scale
    is None), so W down up = A B with A = W V_r = diag(scale)^-1 U_r Sigma_r and B = V_r^T."""
    w = np.asarray(w, np.float64)
    scaled = w if scale is None else np.asarray(scale, np.float64)[:, None] * w
    _, _, vt = np.linalg.svd(scaled, full_matrices=False)
    top = vt[:rank].T  # [X, rank]
    # Each vector's sign made canonical (its largest entry positive), so the factors are reproducible.
    top = top * np.where(top[np.argmax(np.abs(top), axis=0), np.arange(rank)] < 0, -1.0, 1.0)
    return top.astype(np.float32), top.T.astype(np.float32)


def reconstruction_loss(gram: jax.Array, down: jax.Array, up: jax.Array, tokens: int) -> jax.Array:
    """The authors' MSE |k - k down up|^2 per entry over the calibration tokens, from their Gram matrix
    gram [..., X, X] = sum_t k_t k_t^T: tr(E^T gram E) / (tokens X) with E = I - down up."""
    x = gram.shape[-1]
    e = jnp.eye(x) - jnp.einsum("...xr,...ry->...xy", down, up)  # [..., X, X]
    return jnp.sum(e * jnp.einsum("...xy,...yz->...xz", gram, e), axis=(-2, -1)) / (tokens * x)


def finetune(stats: CalibrationStats, factors: Factors, steps: int, lr: float) -> Factors:
    """`steps` full-batch Adam steps on the summed layer-wise key and value reconstruction losses."""
    trainable = {name: jnp.asarray(factors[name]) for name in ("k_down", "k_up", "v_down", "v_up")}
    grams = jnp.asarray(stats.k_gram), jnp.asarray(stats.v_gram)
    # Each layer's loss is divided by its value at the start, so layers with large keys do not set the pace.
    start = [
        reconstruction_loss(g, trainable[f"{kv}_down"], trainable[f"{kv}_up"], stats.tokens)
        for kv, g in zip("kv", grams)
    ]
    weights = [1.0 / jnp.maximum(s, 1e-30) for s in start]

    def loss_fn(p):
        return sum(
            jnp.sum(w * reconstruction_loss(g, p[f"{kv}_down"], p[f"{kv}_up"], stats.tokens))
            for kv, g, w in zip("kv", grams, weights)
        )

    opt = optax.adam(lr)

    @jax.jit
    def run(p):
        def step(carry, _):
            p, state = carry
            grads = jax.grad(loss_fn)(p)
            updates, state = opt.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None

        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
        return p

    return {**factors, **{k: np.asarray(v, np.float32) for k, v in run(trainable).items()}}


def factors_from_stats(
    stats: CalibrationStats,
    rank_k: int,
    rank_v: int,
    *,
    method: str = "asvd",
    alpha: float = 0.5,
    steps: int = 0,
    lr: float = 1e-3,
) -> Factors:
    """Every layer's factors from calibration statistics: `method` "svd" (of W) or "asvd" (of diag(s) W,
    s = mean |input| ** alpha per channel), then `steps` of fine-tuning (0: none)."""
    if method not in ("svd", "asvd"):
        raise ValueError(f"CSKV factors come from method 'svd' or 'asvd'; got {method!r}")
    x = stats.w_k.shape[-1]
    for name, rank in (("rank_k", rank_k), ("rank_v", rank_v)):
        if not 1 <= rank <= x:
            raise ValueError(f"CSKV {name} must be in [1, {x}] (Hkv * D); got {rank}")
    if steps < 0 or lr <= 0:
        raise ValueError(f"CSKV fine-tuning needs steps >= 0 and lr > 0; got {steps}, {lr}")
    out = {name: [] for name in ("k_down", "k_up", "v_down", "v_up")}
    for i in range(len(stats.w_k)):
        scale = None if method == "svd" else (stats.abs_mean[i].astype(np.float64) + 1e-6) ** alpha  # the authors' eps
        for kv, w, rank in (("k", stats.w_k[i], rank_k), ("v", stats.w_v[i], rank_v)):
            down, up = svd_factors(w, rank, scale)
            out[f"{kv}_down"].append(down)
            out[f"{kv}_up"].append(up)
    factors = {name: np.stack(v) for name, v in out.items()}
    factors.update(k_bias=stats.k_bias, v_bias=stats.v_bias)
    return finetune(stats, factors, steps, lr) if steps else factors


def fit_factors(
    model: LanguageModel,
    calibration_tokens,
    key_density: float = 0.5,
    value_density: float = 0.5,
    *,
    lengths=None,
    method: str = "asvd",
    alpha: float = 0.5,
    steps: int = 0,
    lr: float = 1e-3,
) -> Factors:
    """CSKV's factors for `model` from calibration token rows int32[N, T]: ranks int(density * D) * Hkv (the
    authors' k_density, v_density), ASVD with alpha 0.5 (the authors' initialisation), then `steps` of
    fine-tuning. `CSKV(params=fit_factors(...))` runs them; `save_factors` writes them."""
    rank_k, rank_v = density_rank(key_density, model.config), density_rank(value_density, model.config)
    stats = calibration_stats(model, calibration_tokens, lengths)
    return factors_from_stats(stats, rank_k, rank_v, method=method, alpha=alpha, steps=steps, lr=lr)


def haystack_calibration(tokenizer, samples: int = 8, length: int = 1024, haystack: str = "prose", seed: int = 0):
    """int32[samples, length]: calibration rows of plain haystack text (kvjax.eval.haystack: "prose", "noise"
    or a folder of .txt files), no needles, sample i from seed + i."""
    from kvjax.eval.haystack import haystack_from_name, plain_text

    if tokenizer is None or samples < 1 or length < 1:
        raise ValueError(f"calibration needs a tokenizer, samples >= 1 and length >= 1; got {samples}, {length}")
    source, rows = haystack_from_name(haystack), []
    for i in range(samples):
        units = max(8, length // 8)
        while len(ids := tokenizer.encode(plain_text(source, seed + i, units))) < length:
            units *= 2
        rows.append(ids[:length])
    return np.asarray(rows, np.int32)


# ---------------------------------------------------------------------------------------------------------
# Files


def _model_shape(config: ModelConfig) -> dict[str, int]:
    return {
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
    }


def save_factors(
    directory: str | os.PathLike, factors: Factors, config: ModelConfig, metadata: dict | None = None
) -> Path:
    """Writes `directory/cskv_factors.npz` (float32 arrays and a JSON `meta` string; no pickle), replacing
    an older one only once the new one is complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rank_k, rank_v = factors["k_down"].shape[-1], factors["v_down"].shape[-1]
    want = factor_shapes(config, rank_k, rank_v)
    got = {name: tuple(np.shape(factors[name])) for name in FACTOR_NAMES}
    if got != want:
        raise ValueError(f"factors of shapes {got} do not fit the model (expected {want})")
    meta = {"format": FACTORS_FORMAT, **_model_shape(config), "rank_k": rank_k, "rank_v": rank_v, **(metadata or {})}
    tmp = directory / f".{FACTORS_FILE}.partial"
    with open(tmp, "wb") as f:
        np.savez(
            f,
            meta=np.asarray(json.dumps(meta)),
            **{name: np.asarray(factors[name], np.float32) for name in FACTOR_NAMES},
        )
    os.replace(tmp, directory / FACTORS_FILE)
    return directory / FACTORS_FILE


def load_factors(directory: str | os.PathLike, config: ModelConfig) -> tuple[Factors, dict]:
    """(float32 factors, their metadata) from `directory/cskv_factors.npz`, checked against `config`. Reads
    only that file, which must lie inside `directory` (a link pointing elsewhere is refused)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; CSKV factors are `DIR/{FACTORS_FILE}` (save_factors)")
    path = folder / FACTORS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {FACTORS_FILE}, so not a CSKV factors folder; write one with save_factors")
    if path.resolve().parent != folder.resolve():
        raise CheckpointError(f"{path}: points outside {folder}; refusing to read it")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {name: np.asarray(data[name], np.float32) for name in FACTOR_NAMES}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    if meta.get("format") != FACTORS_FORMAT:
        raise CheckpointError(f"{path}: unknown format {meta.get('format')!r}; expected {FACTORS_FORMAT}")
    fitted_for = {key: meta.get(key) for key in _model_shape(config)}
    if fitted_for != _model_shape(config):
        raise ValueError(f"{folder}: CSKV factors fitted for {fitted_for} do not fit this model {_model_shape(config)}")
    want = factor_shapes(config, arrays["k_down"].shape[-1], arrays["v_down"].shape[-1])
    got = {name: a.shape for name, a in arrays.items()}
    if got != want:
        raise CheckpointError(f"{path}: factors of shapes {got}, expected {want}")
    return {name: jnp.asarray(a) for name, a in arrays.items()}, meta
