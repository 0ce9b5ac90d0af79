"""LESS's learned feature maps, its recurrent state and how the state joins attention; its params file.

Per layer, query head and KV head (the authors' `KernelizedHeadAttention`, hdong920/LESS
src/train_kernels.py and src/inference/generative/llama_gen.py), on keys and queries after RoPE:

    phi_q(q) = |gelu(gelu(q Wq1) Wq2)|                                  Wq1 [D, F], Wq2 [F, R] per query head
    psi(k)   = |s1| * gelu(gelu(k Wk1) Wk2);  phi_k(k) = |psi + (psi M) * s2|   Wk1 [D, F], Wk2 [F, R], M [R, R]

The state of a KV head sums what eviction dropped: H = sum_e phi_k(k_e)^T v_e [R, D], z = sum_e phi_k(k_e)
[R]; a query's output over the kept entries S joins it in one normaliser:

    o = (sum_{j in S} exp(s_j) v_j + phi_q(q) H) / (sum_{j in S} exp(s_j) + phi_q(q) . z).

kvjax computes it from the kept entries' softmax output and log-sum-exp without the authors' 1e-6 floors
(on phi_q and on phi_q . z), so an empty state gives exactly the base policy's output. With GQA, phi_k
and the state belong to the KV head and phi_q to each query head (the authors' multi-query branch).

On disk (`save_less`): `DIR/less_state.npz` (numpy, no pickle): float32 q1 [L, K, G, D, F], q2
[L, K, G, F, R], k1 [L, K, D, F], k2 [L, K, F, R], mix [L, K, R, R], s1, s2 [L, K, R], and `meta`, a
JSON string (format, the model's shape, how the params were trained).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.checkpoint import CheckpointError
from kvjax.config import ModelConfig

PARAMS_FILE = "less_state.npz"
PARAMS_FORMAT = "kvjax-less-1"
PARAM_NAMES = ("q1", "q2", "k1", "k2", "mix", "s1", "s2")
SCALING_INIT = 1e-4  # the authors' initial |s1| and s2

Params = dict[str, jax.Array]  # PARAM_NAMES -> float32 arrays, every layer stacked on the leading axis


def gelu(x: jax.Array) -> jax.Array:
    """torch's F.gelu (the exact, erf form), the authors' activation and kernel function."""
    return jax.nn.gelu(x, approximate=False)


def param_shapes(config: ModelConfig, rank: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The stacked shapes of a model's LESS params (module docstring)."""
    lk, d, g = (config.num_layers, config.num_kv_heads), config.head_dim, config.group_size
    return {
        "q1": (*lk, g, d, hidden),
        "q2": (*lk, g, hidden, rank),
        "k1": (*lk, d, hidden),
        "k2": (*lk, hidden, rank),
        "mix": (*lk, rank, rank),
        "s1": (*lk, rank),
        "s2": (*lk, rank),
    }


def init_params(config: ModelConfig, rank: int = 8, hidden: int = 512, seed: int = 0) -> Params:
    """The authors' initialisation: Glorot-uniform matrices, s1 = s2 = 1e-4 (the state starts near empty)."""
    if rank < 1 or hidden < 1:
        raise ValueError(f"LESS needs rank >= 1 and hidden >= 1; got {rank}, {hidden}")
    shapes = param_shapes(config, rank, hidden)
    keys = dict(zip(PARAM_NAMES, jax.random.split(jax.random.key(seed), len(PARAM_NAMES))))

    def glorot(name):
        fan_in, fan_out = shapes[name][-2:]
        bound = math.sqrt(6 / (fan_in + fan_out))
        return jax.random.uniform(keys[name], shapes[name], jnp.float32, -bound, bound)

    params = {name: glorot(name) for name in ("q1", "q2", "k1", "k2", "mix")}
    params.update({name: jnp.full(shapes[name], SCALING_INIT, jnp.float32) for name in ("s1", "s2")})
    return params


def zero_state_params(params: Params) -> Params:
    """`params` with s1 = 0: phi_k = 0, so the state stays empty and LESS equals its base policy."""
    return {**params, "s1": jnp.zeros_like(params["s1"])}


def _hidden(h: jax.Array, dropout) -> jax.Array:
    """gelu(dropout(h)) for h = x W1 (the authors' order); `dropout`: None or (key, rate), training only."""
    if dropout is not None:
        key, rate = dropout
        keep = jax.random.bernoulli(key, 1 - rate, h.shape)
        h = jnp.where(keep, h / (1 - rate), 0.0)
    return gelu(h)


def query_features(q: jax.Array, q1: jax.Array, q2: jax.Array, dropout=None) -> jax.Array:
    """float32[B, T, K, G, R] = phi_q(q) for q [B, T, K, G, D]; q1 [K, G, D, F], q2 [K, G, F, R]."""
    h = _hidden(jnp.einsum("btkgd,kgdf->btkgf", q.astype(jnp.float32), q1), dropout)  # [B, T, K, G, F]
    return jnp.abs(gelu(jnp.einsum("btkgf,kgfr->btkgr", h, q2)))


def key_features(k: jax.Array, p: Params, dropout=None) -> jax.Array:
    """float32[B, K, C, R] = phi_k(k) for keys k [B, K, C, D]; p holds one layer's k1 [K, D, F], k2 [K, F, R],
    mix [K, R, R], s1, s2 [K, R] (for the keys' KV heads)."""
    h = _hidden(jnp.einsum("bkcd,kdf->bkcf", k.astype(jnp.float32), p["k1"]), dropout)  # [B, K, C, F]
    psi = jnp.abs(p["s1"])[:, None, :] * gelu(jnp.einsum("bkcf,kfr->bkcr", h, p["k2"]))
    return jnp.abs(psi + jnp.einsum("bkcr,krs->bkcs", psi, p["mix"]) * p["s2"][:, None, :])


def absorb(
    h: jax.Array, z: jax.Array, k: jax.Array, v: jax.Array, dropped: jax.Array, p: Params
) -> tuple[jax.Array, jax.Array]:
    """The state after the entries flagged in `dropped` bool[B, K, C] leave the cache: H += phi_k(k)^T v,
    z += phi_k(k) summed over them. h float32[B, K, R, D], z float32[B, K, R]; k, v [B, K, C, D]."""
    phi = key_features(k, p) * dropped[..., None]  # [B, K, C, R]
    return (
        h + jnp.einsum("bkcr,bkcd->bkrd", phi, v.astype(jnp.float32)),
        z + jnp.sum(phi, axis=2),
    )


def join(out: jax.Array, lse: jax.Array, num: jax.Array, den: jax.Array) -> jax.Array:
    """(exp(lse) out + num) / (exp(lse) + den), in the log domain: the softmax output `out` [B, T, K, G, D]
    over the kept entries, whose log-sum-exp of scaled logits is `lse` float32[B, T, K, G], joined with the
    state's numerator `num` [B, T, K, G, D] and normaliser `den` >= 0 [B, T, K, G]. den = 0 returns `out`."""
    some = den > 0
    norm = jnp.where(some, jnp.logaddexp(lse, jnp.log(jnp.where(some, den, 1.0))), lse)
    state_weight = jnp.where(some, jnp.exp(-norm), 0.0)
    return (jnp.exp(lse - norm)[..., None] * out.astype(jnp.float32) + state_weight[..., None] * num).astype(out.dtype)


def read_state(phi_q: jax.Array, h: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(num [B, T, K, G, D], den [B, T, K, G]) = (phi_q H, phi_q . z) for phi_q float32[B, T, K, G, R]."""
    return jnp.einsum("btkgr,bkrd->btkgd", phi_q, h), jnp.einsum("btkgr,bkr->btkg", phi_q, z)


# ---------------------------------------------------------------------------------------------------------
# Files


def _model_shape(config: ModelConfig) -> dict[str, int]:
    return {
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
    }


def check_params(params: Params, config: ModelConfig) -> None:
    """Raises ValueError unless `params` holds every LESS array in the shapes a model of `config` needs."""
    if not isinstance(params, dict) or set(params) != set(PARAM_NAMES):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"LESS params must be a dict of {', '.join(PARAM_NAMES)}; got {got}")
    rank, hidden = params["k2"].shape[-1], params["k2"].shape[-2]
    want = param_shapes(config, rank, hidden)
    got = {name: tuple(np.shape(params[name])) for name in PARAM_NAMES}
    if got != want:
        raise ValueError(f"LESS params of shapes {got} do not fit this model {_model_shape(config)} (expected {want})")


def save_less(directory: str | os.PathLike, params: Params, config: ModelConfig, metadata: dict | None = None) -> Path:
    """Writes `directory/less_state.npz` (float32 arrays and a JSON `meta` string; no pickle), replacing an
    older one only once the new one is complete."""
    check_params(params, config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rank, hidden = params["k2"].shape[-1], params["k2"].shape[-2]
    meta = {"format": PARAMS_FORMAT, **_model_shape(config), "rank": rank, "hidden": hidden, **(metadata or {})}
    tmp = directory / f".{PARAMS_FILE}.partial"
    with open(tmp, "wb") as f:
        np.savez(f, meta=np.asarray(json.dumps(meta)), **{n: np.asarray(params[n], np.float32) for n in PARAM_NAMES})
    os.replace(tmp, directory / PARAMS_FILE)
    return directory / PARAMS_FILE


def load_less(path: str | os.PathLike, config: ModelConfig) -> tuple[Params, dict]:
    """(float32 params, their metadata) from `path` (a less_state.npz, or the folder holding one), checked
    against `config`."""
    path = Path(path)
    if path.is_dir():
        path = path / PARAMS_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such file; LESS params are DIR/{PARAMS_FILE} from `kvjax train-gates --method less`"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            params = {name: np.asarray(data[name], np.float32) for name in PARAM_NAMES}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable as LESS params ({type(err).__name__}: {err})") from err
    if meta.get("format") != PARAMS_FORMAT:
        raise CheckpointError(f"{path}: unknown format {meta.get('format')!r}; expected {PARAMS_FORMAT}")
    trained_for = {key: meta.get(key) for key in _model_shape(config)}
    if trained_for != _model_shape(config):
        raise ValueError(f"{path}: LESS params trained for {trained_for} do not fit this model {_model_shape(config)}")
    check_params(params, config)
    return {name: jnp.asarray(a) for name, a in params.items()}, meta
