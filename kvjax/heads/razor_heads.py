"""RazorAttention's retrieval-head probe: echo and induction scores on a repeated random sequence.

Probe = BOS (when the model has one) + `num_tokens` random ids repeated `repeats` times. For every
query whose token already occurred earlier, a head's *echo* mass is its attention to those earlier
copies of the same token and its *induction* mass its attention to the tokens that followed them;
a head's score is the mean mass over such queries. Heads are ranked over all layers: the top
`echo_frac` by echo plus the top `induction_frac` by induction are retrieval heads.

GQA: scores are per query head; a KV head scores the max over its query group (one strong copying
query head needs its KV head's whole history), and the fractions are taken over KV heads, so the
share of KV heads that keep everything is what the fractions say.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_MASKED = float(jnp.finfo(jnp.float32).min)

HeadSets = tuple[tuple[int, ...], ...]


def probe_tokens(
    vocab_size: int,
    num_tokens: int = 2500,
    repeats: int = 4,
    seed: int = 0,
    bos_id: int | None = None,
    exclude=(),
) -> np.ndarray:
    """int32[(1) + num_tokens * repeats]: BOS (if given), then random ids (never `exclude`d) repeated."""
    if num_tokens < 1 or repeats < 2:
        raise ValueError(f"the probe needs num_tokens >= 1 and repeats >= 2; got {num_tokens}, {repeats}")
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray([*exclude, *([] if bos_id is None else [bos_id])]))
    if allowed.size == 0:
        raise ValueError("no token id is left to draw the probe from")
    ids = np.random.default_rng(seed).choice(allowed, num_tokens)
    head = [] if bos_id is None else [bos_id]
    return np.concatenate([head, np.tile(ids, repeats)]).astype(np.int32)


def echo_induction_mass(probs: jax.Array, tokens: jax.Array, q_pos: jax.Array) -> tuple[jax.Array, ...]:
    """Per-head summed echo and induction mass over a block of queries, and how many queries count.

    probs: float32[B, K, G, S, T] attention of queries at positions q_pos int32[S] (>= T: padding)
    over keys 0..T-1; tokens: int32[B, T]. Returns echo, induction float32[B, K, G] and n float32[B].
    """
    t = tokens.shape[1]
    keys = jnp.arange(t)  # [T]
    q_tok = jnp.take(tokens, jnp.minimum(q_pos, t - 1), axis=1)  # [B, S]
    before = keys[None, :] < q_pos[:, None]  # [S, T]
    echo = (tokens[:, None, :] == q_tok[:, :, None]) & before  # [B, S, T] earlier copies
    prev = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)), constant_values=-1)  # [B, T] token before each key
    induction = (prev[:, None, :] == q_tok[:, :, None]) & (keys[None, :] <= q_pos[:, None])  # [B, S, T]
    counted = jnp.any(echo, axis=-1) & (q_pos < t)  # [B, S] queries with an earlier copy
    weight = counted[:, None, None, :, None]  # [B, 1, 1, S, 1]
    echo_mass = jnp.sum(jnp.where(echo[:, None, None] & weight, probs, 0.0), axis=(-2, -1))  # [B, K, G]
    ind_mass = jnp.sum(jnp.where(induction[:, None, None] & weight, probs, 0.0), axis=(-2, -1))  # [B, K, G]
    return echo_mass, ind_mass, jnp.sum(counted, axis=-1, dtype=jnp.float32)


def _probe_step(tokens, block, ctx, carry, shared, x):
    """A layer step that attends causally over the whole probe in query blocks and adds the scores."""
    q, k, v, window, scale = x.q, x.k, x.v, ctx.window, ctx.scale
    b, t, kh, g, d = q.shape
    pad = -t % block
    q_blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))  # [B, T + pad, K, G, D]
    q_blocks = q_blocks.reshape(b, -1, block, kh, g, d).swapaxes(0, 1)  # [N, B, S, K, G, D]
    starts = jnp.arange(q_blocks.shape[0]) * block  # [N]
    keys = jnp.arange(t)

    def one(args):
        qb, start = args  # [B, S, K, G, D], scalar
        pos = start + jnp.arange(block)  # [S]
        logits = jnp.einsum("bskgd,btkd->bkgst", qb, k, preferred_element_type=jnp.float32) * scale
        visible = keys[None, :] <= pos[:, None]  # [S, T]
        if window is not None:
            visible &= keys[None, :] > pos[:, None] - window
        probs = jax.nn.softmax(jnp.where(visible, logits, _MASKED), axis=-1)  # [B, K, G, S, T]
        out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v)  # [B, S, K, G, D]
        return out, echo_induction_mass(probs, tokens, pos)

    out, (echo, ind, n) = jax.lax.map(one, (q_blocks, starts))
    out = out.swapaxes(0, 1).reshape(b, -1, kh, g, d)[:, :t]  # [B, T, K, G, D]
    echo_sum, ind_sum, n_sum = carry
    return out, (echo_sum + echo.sum(0), ind_sum + ind.sum(0), n_sum + n.sum(0)), shared


@functools.partial(jax.jit, static_argnames=("graphdef", "block"))
def _probe_forward(graphdef, params, tokens, block):
    model = nnx.merge(graphdef, params)
    cfg = model.config
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    zeros = jnp.zeros((b, cfg.num_kv_heads, cfg.group_size), jnp.float32)
    carry = ((zeros, zeros, jnp.zeros((b,), jnp.float32)),) * cfg.num_layers
    _, carry, _ = model(tokens, positions, jnp.ones((b, t), bool), carry, functools.partial(_probe_step, tokens, block))
    echo = jnp.stack([c[0] for c in carry])  # [L, B, K, G]
    ind = jnp.stack([c[1] for c in carry])  # [L, B, K, G]
    n = carry[0][2]  # [B]
    per = lambda x: jnp.sum(x, axis=1).reshape(cfg.num_layers, -1) / jnp.sum(n)  # noqa: E731  [L, H]
    return per(echo), per(ind)


def probe_scores(m, tokens, query_block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(echo, induction) float32[L, H] per query head on a probe int32[T] (or [B, T]), one forward."""
    tokens = jnp.asarray(tokens, jnp.int32)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    if tokens.shape[1] > m.config.max_position_embeddings:
        raise ValueError(f"probe of {tokens.shape[1]} tokens exceeds the model's {m.config.max_position_embeddings}")
    echo, ind = _probe_forward(m.graphdef, m.params, tokens, min(query_block, tokens.shape[1]))
    return np.asarray(echo), np.asarray(ind)


def select_retrieval_heads(
    echo,
    induction,
    num_kv_heads: int,
    echo_frac: float = 0.01,
    induction_frac: float = 0.14,
) -> HeadSets:
    """Per layer, the KV heads among the top `echo_frac` by echo or top `induction_frac` by induction.

    echo, induction: float[L, H] per query head; a KV head scores the max over its query group;
    ranking is over all L x Hkv KV heads, ceil(frac * L * Hkv) heads each, ties to the earlier head.
    """
    echo, induction = np.asarray(echo, np.float64), np.asarray(induction, np.float64)
    if echo.shape != induction.shape or echo.ndim != 2 or echo.shape[1] % num_kv_heads:
        raise ValueError(
            f"echo {echo.shape} and induction {induction.shape} must be float[L, H], H a multiple "
            f"of num_kv_heads={num_kv_heads}"
        )
    layers = echo.shape[0]
    per_kv = lambda s: s.reshape(layers, num_kv_heads, -1).max(-1).reshape(-1)  # noqa: E731  [L * Hkv]
    keep = np.zeros(layers * num_kv_heads, bool)
    for scores, frac in ((per_kv(echo), echo_frac), (per_kv(induction), induction_frac)):
        if not 0 <= frac <= 1:
            raise ValueError(f"head fractions must lie in [0, 1]; got {frac}")
        keep[np.argsort(-scores, kind="stable")[: math.ceil(frac * scores.size)]] = True
    keep = keep.reshape(layers, num_kv_heads)
    return tuple(tuple(int(h) for h in np.flatnonzero(row)) for row in keep)


def identify_retrieval_heads(
    m,
    seed: int = 0,
    num_tokens: int = 2500,
    repeats: int = 4,
    echo_frac: float = 0.01,
    induction_frac: float = 0.14,
    query_block: int = 256,
) -> HeadSets:
    """RazorAttention's retrieval KV heads of model `m`, per layer (~15% of heads by default)."""
    cfg = m.config
    specials = [*cfg.eos_token_ids, *([] if cfg.pad_token_id is None else [cfg.pad_token_id])]
    tokens = probe_tokens(cfg.vocab_size, num_tokens, repeats, seed, cfg.bos_token_id, specials)
    echo, induction = probe_scores(m, tokens, query_block)
    return select_retrieval_heads(echo, induction, cfg.num_kv_heads, echo_frac, induction_frac)
