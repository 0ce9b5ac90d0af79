"""How each Hugging Face tensor becomes a kvjax parameter, per family (fused Phi-3 projections split)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import numpy as np

from kvjax.config import ModelConfig

# A kvjax parameter path (as in `nnx.to_pure_dict`) and the array to store there.
Target = tuple[tuple, np.ndarray]
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Buffers some checkpoints carry that are not weights (recomputed from the config).
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _heads(w: np.ndarray, n: int, d: int) -> np.ndarray:
    """[N*D, E] projection -> [E, N, D]."""
    return w.T.reshape(w.shape[1], n, d)


def _layer_targets(cfg: ModelConfig, i: int, name: str, w: np.ndarray) -> Iterator[Target]:
    h, k, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    block = ("blocks", i)
    simple: dict[str, tuple[tuple, Callable[[np.ndarray], np.ndarray]]] = {
        "input_layernorm.weight": (("input_norm", "weight"), lambda w: w),
        "post_attention_layernorm.weight": (("post_attention_norm", "weight"), lambda w: w),
        "self_attn.q_proj.weight": (("attn", "q_proj"), lambda w: _heads(w, h, d)),
        "self_attn.k_proj.weight": (("attn", "k_proj"), lambda w: _heads(w, k, d)),
        "self_attn.v_proj.weight": (("attn", "v_proj"), lambda w: _heads(w, k, d)),
        "self_attn.o_proj.weight": (("attn", "o_proj"), lambda w: w.T.reshape(h, d, w.shape[0])),
        "self_attn.q_proj.bias": (("attn", "q_bias"), lambda w: w.reshape(h, d)),
        "self_attn.k_proj.bias": (("attn", "k_bias"), lambda w: w.reshape(k, d)),
        "self_attn.v_proj.bias": (("attn", "v_bias"), lambda w: w.reshape(k, d)),
        "self_attn.o_proj.bias": (("attn", "o_bias"), lambda w: w),
        "mlp.gate_proj.weight": (("mlp", "gate_proj"), lambda w: w.T),
        "mlp.up_proj.weight": (("mlp", "up_proj"), lambda w: w.T),
        "mlp.down_proj.weight": (("mlp", "down_proj"), lambda w: w.T),
        "mlp.gate_proj.bias": (("mlp", "gate_bias"), lambda w: w),
        "mlp.up_proj.bias": (("mlp", "up_bias"), lambda w: w),
        "mlp.down_proj.bias": (("mlp", "down_bias"), lambda w: w),
    }
    if name in simple:
        path, transform = simple[name]
        yield block + path, transform(w)
    elif name == "self_attn.qkv_proj.weight":  # Phi-3: rows are [q; k; v]
        q, kk, v = np.split(w, [h * d, (h + k) * d], axis=0)
        yield block + ("attn", "q_proj"), _heads(q, h, d)
        yield block + ("attn", "k_proj"), _heads(kk, k, d)
        yield block + ("attn", "v_proj"), _heads(v, k, d)
    elif name == "mlp.gate_up_proj.weight":  # Phi-3: rows are [gate; up]
        gate, up = np.split(w, [f], axis=0)
        yield block + ("mlp", "gate_proj"), gate.T
        yield block + ("mlp", "up_proj"), up.T
    else:
        raise KeyError(name)


def hf_targets(cfg: ModelConfig, name: str, w: np.ndarray) -> Iterator[Target]:
    """The kvjax parameters one Hugging Face tensor fills; KeyError for a tensor kvjax has no place for."""
    if _IGNORED.match(name):
        return
    if name == "model.embed_tokens.weight":
        yield ("embed",), w
    elif name == "model.norm.weight":
        yield ("final_norm", "weight"), w
    elif name == "lm_head.weight":
        if not cfg.tie_word_embeddings:  # tied checkpoints may still carry a copy; it is the embedding
            yield ("lm_head",), w.T
    elif (match := _LAYER.match(name)) and int(match.group(1)) < cfg.num_layers:
        yield from _layer_targets(cfg, int(match.group(1)), match.group(2), w)
    else:
        raise KeyError(name)


def hf_shape(cfg: ModelConfig, name: str) -> tuple[int, ...] | None:
    """The shape a Hugging Face tensor of this name has in a checkpoint of `cfg` (None: a name kvjax does
    not know, left to `hf_targets`). Checked before any reshaping, so a wrong shape is reported as found."""
    h, k, d, f, e, v = (
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.hidden_size,
        cfg.vocab_size,
    )
    top = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,), "lm_head.weight": (v, e)}
    if name in top:
        return top[name]
    match = _LAYER.match(name)
    if not match or int(match.group(1)) >= cfg.num_layers:
        return None
    return {
        "input_layernorm.weight": (e,),
        "post_attention_layernorm.weight": (e,),
        "self_attn.q_proj.weight": (h * d, e),
        "self_attn.k_proj.weight": (k * d, e),
        "self_attn.v_proj.weight": (k * d, e),
        "self_attn.o_proj.weight": (e, h * d),
        "self_attn.q_proj.bias": (h * d,),
        "self_attn.k_proj.bias": (k * d,),
        "self_attn.v_proj.bias": (k * d,),
        "self_attn.o_proj.bias": (e,),
        "self_attn.qkv_proj.weight": ((h + 2 * k) * d, e),
        "mlp.gate_proj.weight": (f, e),
        "mlp.up_proj.weight": (f, e),
        "mlp.down_proj.weight": (e, f),
        "mlp.gate_proj.bias": (f,),
        "mlp.up_proj.bias": (f,),
        "mlp.down_proj.bias": (e,),
        "mlp.gate_up_proj.weight": (2 * f, e),
    }.get(match.group(2))
