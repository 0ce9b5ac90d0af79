"""Locret's retaining heads: the network, its stacked parameters and the files training writes.

A retaining head predicts, per token and KV head, how much attention the token will ever receive,
from that token's q, k, v straight from the projections (before RoPE), so a score depends on what a
token is, not where it sits: fc2(act(fc1(concat(q, k, v)))), both layers without bias.

On disk (written by training): `DIR/retaining_heads/` (orbax: fc1 float32[L, C, F], fc2
float32[L, F, K], C = (H + 2 Hkv) D) and `DIR/retaining_heads.json` (format, shapes, activation,
the model it was trained on).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from kvjax.checkpoint import CheckpointError
from kvjax.config import ModelConfig
from kvjax.models.llama import ACTIVATIONS

HEADS_DIR = "retaining_heads"
HEADS_JSON = "retaining_heads.json"
HEADS_FORMAT = "kvjax-locret-heads-1"

Heads = dict[str, jax.Array]  # {"fc1": [L, C, F], "fc2": [L, F, K]}, every layer stacked


def retaining_features(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """[B, T, (H + 2K) * D]: a retaining head's input, each token's q ([B, T, H, D] or grouped
    [B, T, K, G, D]), k and v ([B, T, K, D]) from the projections, flattened and concatenated."""
    b, t = q.shape[:2]
    return jnp.concatenate([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], axis=-1)


def retaining_head_scores(features: jax.Array, fc1: jax.Array, fc2: jax.Array, act: str) -> jax.Array:
    """float32[..., K]: fc2(act(fc1(features))); features [..., C], fc1 [C, F], fc2 [F, K]. The one
    implementation both inference (the Locret policy) and training run."""
    hidden = ACTIVATIONS[act](jnp.einsum("...c,cf->...f", features, fc1, preferred_element_type=jnp.float32))
    return jnp.einsum("...f,fk->...k", hidden.astype(fc2.dtype), fc2, preferred_element_type=jnp.float32)


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


def _model_shape(config: ModelConfig) -> dict:
    return {
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
    }


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
    info = {
        "format": HEADS_FORMAT,
        **_model_shape(config),
        "hidden": hidden,
        "activation": config.hidden_act,
        "input": "concat(q, k, v) from the projections, before RoPE",
        **(metadata or {}),
    }
    tmp = directory / f".{HEADS_JSON}.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, directory / HEADS_JSON)
    return directory


def load_retaining_heads(directory: str | os.PathLike, config: ModelConfig) -> tuple[Heads, dict]:
    """(float32 heads, their JSON) from a folder written by training, checked against `config`."""
    directory = Path(directory)
    info_file = directory / HEADS_JSON
    if not info_file.is_file():
        raise CheckpointError(
            f"{directory}: no {HEADS_JSON}, so not a Locret retaining-heads folder; train one "
            f"with `kvjax train-gates --method locret --out DIR`"
        )
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
