"""Locret (Huang et al., 2024): eviction ranked by learned per-layer retaining heads.

A retaining head (kvjax.models.llama.RetainingHead) predicts, for each token and KV head, how much
attention the token will ever receive, from that token's q, k, v straight from the projections
(before RoPE). The heads live in the model's parameters (`ModelConfig.retaining_hidden`), so jitted
prefill and generate take them as traced arguments like any weight; the policy itself is only its
hyperparameters. The model computes the scores only for a policy that reads them
(`reads_retaining_scores`) and hands them to `cache_step` as `retain_scores`.

Prefill (chunked, as the paper): after each chunk its entries join the layer's cache with their
predicted scores; unless the chunk completes the prompt, the `stabilizers` most recent entries
count as maximal; the top `budget_tokens` per (layer, sequence, KV head) survive, in position
order. The last `local_len` prompt tokens are kept on top of the budget without eviction. The
"last chunk" of a row is the one that holds its last token before those local ones: the paper
feeds the local tokens after the compressed prefix, and with static per-token scores this gives
the same kept set (local tokens that share a chunk with the prefix attend to it uncompressed, as
any chunk's tokens do). Decode: each new token enters with its predicted score and, once the
cache holds more than budget + local_len entries, the lowest-scoring entry outside the
`local_len` most recent tokens is evicted, so the local window slides with the generated text and
the newest token is always kept (local_len >= 1).

Capacities follow TokenEviction: budget + local_len + chunk slots while prefilling, budget +
local_len + 1 (rounded to 16) while decoding; a budget covering the prompt keeps it all (no error).

Heads on disk (written by kvjax.train.locret_heads): `DIR/retaining_heads/` (orbax: fc1
float32[L, C, F], fc2 float32[L, F, K], C = (H + 2 Hkv) D) and `DIR/retaining_heads.json` (format,
shapes, activation, the model it was trained on). `with_retaining_heads(model, DIR)` attaches them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from kvjax.attention import attend
from kvjax.cached_attention import merge_heads, take_heads
from kvjax.checkpoint import CheckpointError
from kvjax.config import ModelConfig
from kvjax.kv_state import KVSegment, count, evict_lowest, keep_top, write_entries, write_free_slot
from kvjax.language_model import LanguageModel, abstract_model
from kvjax.policies.token_eviction import TokenEviction, newest
from kvjax.rope import rope_tables
from kvjax.sharding import shard_model

HEADS_DIR = "retaining_heads"
HEADS_JSON = "retaining_heads.json"
HEADS_FORMAT = "kvjax-locret-heads-1"
_NO_HEADS = (
    "attach trained heads with kvjax.policies.locret.with_retaining_heads(model, DIR) (DIR from "
    "`kvjax train-gates --method locret --out DIR`)"
)

Heads = dict[str, jax.Array]  # {"fc1": [L, C, F], "fc2": [L, F, K]}, every layer stacked


@dataclasses.dataclass(frozen=True)
class Locret(TokenEviction):
    """Keeps, per KV head, the `budget_tokens` entries the retaining heads score highest (the most
    recent `stabilizers` protected between prefill chunks) plus the last `local_len` tokens."""

    budget_tokens: int = 6000
    stabilizers: int = 2500
    local_len: int = 100

    def __post_init__(self):
        if self.budget_tokens < 1 or self.local_len < 0:
            raise ValueError(f"Locret needs budget_tokens >= 1 and local_len >= 0; got {self.budget_tokens}, "
                             f"{self.local_len}")
        if not 0 <= self.stabilizers < self.budget_tokens:
            raise ValueError(f"Locret needs 0 <= stabilizers < budget_tokens (else the scores never choose); "
                             f"got stabilizers {self.stabilizers}, budget_tokens {self.budget_tokens}")

    def scored(self):
        return True

    def needs_attention(self, decoding):
        return False  # scores come from the retaining heads, not from attention weights

    def reads_retaining_scores(self):
        return True

    def budget(self, config, layer):
        return self.budget_tokens + self.local_len

    def layout(self, config, prompt_len, max_new_tokens, chunk):
        if config.retaining_hidden is None:
            raise ValueError(f"Locret needs a model with retaining heads and this one has none; {_NO_HEADS}")
        return super().layout(config, prompt_len, max_new_tokens, chunk)

    def priority(self, segment):
        """Decode (and finalize): the predicted score; the `local_len` most recent tokens are never evicted."""
        return jnp.where(segment.pos > newest(segment) - self.local_len, jnp.inf, segment.score)

    def keep_after_chunk(self, segment: KVSegment, q_pos: jax.Array, prompt_lengths: jax.Array) -> KVSegment:
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
        chosen = jnp.zeros(ranked.shape, bool).at[
            jnp.arange(b)[:, None, None], jnp.arange(hs)[None, :, None], top
        ].set(True)  # exactly the top budget, ties included or not by top_k's order
        keep = jnp.where(local, jnp.inf, jnp.where(chosen & (ranked > -jnp.inf), ranked, -jnp.inf))
        return keep_top(segment, keep, segment.budget, segment.capacity)

    def cache_step(self, layer, segments, q, k, v, q_pos, new_pos, window, scale, *, prompt_lengths=None,
                   retain_scores=None):
        """Writes the chunk (or decode token) with its predicted scores, attends, then evicts.

        retain_scores: float32[B, T, K] from the layer's retaining head (pre-RoPE q, k, v).
        """
        if retain_scores is None:
            raise ValueError("Locret's cache step needs the retaining heads' scores (retain_scores=); run it "
                             "directly as the policy of kvjax.prefill / generate (it cannot be wrapped)")
        decoding = prompt_lengths is None
        total = q.shape[2]
        outs, updated = [], []
        for seg in segments:
            k_seg, v_seg = take_heads(k, seg.heads, 2, total), take_heads(v, seg.heads, 2, total)
            s_seg = take_heads(retain_scores, seg.heads, 2, total)  # [B, T, Hs]
            if decoding:
                seg = write_free_slot(seg, k_seg, v_seg, new_pos, s_seg)
            else:
                seg = write_entries(seg, k_seg, v_seg, new_pos, count(seg), s_seg)
            q_seg = take_heads(q, seg.heads, 2, total)
            out = attend(q_seg, seg.k, seg.v, seg.pos, q_pos, window, scale, self.attention_impl)
            if decoding:
                seg = evict_lowest(seg, self.priority(seg), seg.budget)
            elif seg.budget < seg.capacity:
                seg = self.keep_after_chunk(seg, q_pos, prompt_lengths)
            outs.append(out)
            updated.append(seg)
        return merge_heads(outs, segments, axis=2), tuple(updated)


# ------------------------------------------------------------------------------------------------
# Retaining heads: shapes, random init, attaching to a model, and the files training writes.
# ------------------------------------------------------------------------------------------------


def head_shapes(config: ModelConfig, hidden: int) -> dict[str, tuple[int, ...]]:
    """Stacked shapes of a model's retaining heads: fc1 [L, (H + 2 Hkv) D, F], fc2 [L, F, Hkv]."""
    c = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    return {"fc1": (config.num_layers, c, hidden), "fc2": (config.num_layers, hidden, config.num_kv_heads)}


def random_retaining_heads(config: ModelConfig, hidden: int = 1024, seed: int = 0) -> Heads:
    """float32 heads for every layer, normal with 1/sqrt(fan-in) scale (where training starts)."""
    if hidden < 1:
        raise ValueError(f"retaining head hidden size must be >= 1; got {hidden}")
    key1, key2 = jax.random.split(jax.random.key(seed))
    shapes = head_shapes(config, hidden)
    c = shapes["fc1"][1]
    return {
        "fc1": jax.random.normal(key1, shapes["fc1"], jnp.float32) * c**-0.5,  # [L, C, F]
        "fc2": jax.random.normal(key2, shapes["fc2"], jnp.float32) * hidden**-0.5,  # [L, F, K]
    }


def retaining_heads_of(m: LanguageModel) -> Heads:
    """The heads a model carries, stacked over layers (in the model's dtype)."""
    if m.config.retaining_hidden is None:
        raise ValueError(f"model {m.name or ''} carries no retaining heads; {_NO_HEADS}")
    blocks = nnx.to_pure_dict(m.params)["blocks"]
    layers = [blocks[i]["attn"]["retain"] for i in range(m.config.num_layers)]
    return {name: jnp.stack([layer[name] for layer in layers]) for name in ("fc1", "fc2")}


def attach_retaining_heads(m: LanguageModel, heads: Heads) -> LanguageModel:
    """A new model carrying `heads` (cast to the model's dtype) as each layer's `attn.retain`, with
    config.retaining_hidden set; existing heads are replaced. The original model is unchanged."""
    fc1, fc2 = heads.get("fc1"), heads.get("fc2")
    if fc1 is None or fc2 is None or fc1.ndim != 3:
        raise ValueError("retaining heads must be {'fc1': [L, C, F], 'fc2': [L, F, K]}")
    want = head_shapes(m.config, fc1.shape[-1])
    if tuple(fc1.shape) != want["fc1"] or tuple(fc2.shape) != want["fc2"]:
        raise ValueError(
            f"retaining heads of shapes fc1 {tuple(fc1.shape)}, fc2 {tuple(fc2.shape)} do not fit this model "
            f"(expected fc1 {want['fc1']}, fc2 {want['fc2']}: {m.config.num_layers} layers, {m.config.num_heads} "
            f"query and {m.config.num_kv_heads} KV heads of dim {m.config.head_dim})"
        )
    dtype = m.dtype
    config = dataclasses.replace(m.config, retaining_hidden=int(fc1.shape[-1]))
    shell = abstract_model(config, dtype)
    pure = nnx.to_pure_dict(m.params)
    for i in range(config.num_layers):
        pure["blocks"][i]["attn"]["retain"] = {"fc1": jnp.asarray(fc1[i], dtype), "fc2": jnp.asarray(fc2[i], dtype)}
    params = shell.params
    nnx.replace_by_pure_dict(params, pure)
    m = dataclasses.replace(m, config=config, graphdef=shell.graphdef, params=params)
    return m if m.mesh is None else shard_model(m, m.mesh)  # the new heads join the model's devices


def _model_shape(config: ModelConfig) -> dict:
    return {"num_layers": config.num_layers, "num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads,
            "head_dim": config.head_dim}


def save_retaining_heads(
    directory: str | os.PathLike, heads: Heads, config: ModelConfig, metadata: dict | None = None
) -> Path:
    """Writes `directory/retaining_heads/` (orbax, float32) and `directory/retaining_heads.json`; an older
    copy is replaced only once the new one is complete."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    hidden = int(heads["fc1"].shape[-1])
    want = head_shapes(config, hidden)
    if tuple(heads["fc1"].shape) != want["fc1"] or tuple(heads["fc2"].shape) != want["fc2"]:
        raise ValueError(f"heads of shapes {heads['fc1'].shape}, {heads['fc2'].shape} do not fit the model ({want})")
    staging = Path(tempfile.mkdtemp(prefix=f".{HEADS_DIR}.partial-", dir=directory))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / "params", {k: np.asarray(v, np.float32) for k, v in heads.items()})
        checkpointer.wait_until_finished()
        target = directory / HEADS_DIR
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging / "params", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    info = {"format": HEADS_FORMAT, **_model_shape(config), "hidden": hidden, "activation": config.hidden_act,
            "input": "concat(q, k, v) from the projections, before RoPE", **(metadata or {})}
    tmp = directory / f".{HEADS_JSON}.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, directory / HEADS_JSON)
    return directory


def load_retaining_heads(directory: str | os.PathLike, config: ModelConfig) -> tuple[Heads, dict]:
    """(float32 heads, their JSON) from a folder written by training, checked against `config`."""
    directory = Path(directory)
    info_file = directory / HEADS_JSON
    if not info_file.is_file():
        raise CheckpointError(f"{directory}: no {HEADS_JSON}, so not a Locret retaining-heads folder; train one "
                              f"with `kvjax train-gates --method locret --out DIR`")
    try:
        info = json.loads(info_file.read_text())
        hidden = int(info["hidden"])
        trained_for = {key: int(info[key]) for key in _model_shape(config)}
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{info_file}: unreadable ({type(err).__name__}: {err})") from err
    if info.get("format") != HEADS_FORMAT:
        raise CheckpointError(f"{info_file}: unknown format {info.get('format')!r}; expected {HEADS_FORMAT}")
    if trained_for != _model_shape(config) or info.get("activation") != config.hidden_act:
        raise ValueError(
            f"{directory}: retaining heads trained for {trained_for} ({info.get('activation')}) do not fit this "
            f"model {_model_shape(config)} ({config.hidden_act}); train heads for it with `kvjax train-gates "
            f"--method locret`"
        )
    target = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in head_shapes(config, hidden).items()}
    try:
        heads = ocp.StandardCheckpointer().restore((directory / HEADS_DIR).absolute(), target)
    except Exception as err:  # orbax raises many types for missing, truncated or mismatched data
        raise CheckpointError(
            f"{directory}: corrupted or incomplete retaining heads ({type(err).__name__}: {err})"
        ) from err
    return {k: jnp.asarray(heads[k], jnp.float32) for k in ("fc1", "fc2")}, info


def with_retaining_heads(m: LanguageModel, directory: str | os.PathLike) -> LanguageModel:
    """`m` carrying the retaining heads trained into `directory`, ready for `Locret` (a new model)."""
    heads, _ = load_retaining_heads(directory, m.config)
    return attach_retaining_heads(m, heads)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _scores(graphdef, params, tokens, offset):
    model = nnx.merge(graphdef, params)
    b, t = tokens.shape
    positions = jnp.broadcast_to(offset + jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T]
    valid = jnp.ones((b, t), bool)
    rope = rope_tables(model.config.rope, model.config.head_dim, positions, offset + t)
    x = model.embed[...][tokens]  # [B, T, E]
    scores = []
    for block in model.blocks:
        scores.append(block.attn.retain(*block.attn.project(block.input_norm(x))))  # [B, T, K]
        x, _ = block(x, positions, valid, rope, None, None)
    return jnp.stack(scores)  # [L, B, T, K]


def retaining_scores(m: LanguageModel, tokens, *, offset: int = 0) -> jax.Array:
    """float32[L, B, T, Hkv]: every layer's retaining-head score of each token in a full causal forward
    (no cache, no eviction) of int32[B, T] tokens at positions offset, offset + 1, ... (for inspection)."""
    if m.config.retaining_hidden is None:
        raise ValueError(f"model {m.name or ''} carries no retaining heads; {_NO_HEADS}")
    tokens = jnp.asarray(tokens, jnp.int32)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    return _scores(m.graphdef, m.params, tokens, jnp.int32(offset))
