"""Runs NVIDIA kvpress's presses on a saved Hugging Face checkpoint, in kvpress's own environment.

kvpress pins transformers<5.3, which the kvjax test environment cannot share (transformers 5.2 fails
kvjax's Phi-3 and GGUF parity tests), so tests/test_kvpress_parity.py runs this file with the Python of
a separate environment (.venv-kvpress, made by .ci/run) and reads back what each press kept. It imports
torch, transformers, numpy and kvpress only, never kvjax.

Input (JSON on stdin): {"model": HF dir, "tokens": [[ids]], "out": .npz path, "presses": [{"name", "expr",
optional "keys": true, optional "duo": {"sink", "recent", "gates"}}], "patterns": [{"name", "dir", "sparsity"}]}. `expr` is a
Python expression over kvpress's classes. Output (.npz): per press NAME, "NAME/kept" bool[L, Hkv, T] (the
prompt positions its cache holds), "NAME/channels" bool[L, Hkv, D] for presses that zero key channels
(ThinK), with "keys" "NAME/keys" float32[L, Hkv, n, D] (its cache's keys); per pattern, "NAME/retrieval" bool[L, Hkv].
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import kvpress
import numpy as np
import torch
import transformers
from kvpress import DuoAttentionPress
from transformers import DynamicCache


def forward(model, ids, press=None) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if press is None:
            model(ids, past_key_values=cache)
        else:
            with press(model):
                model(ids, past_key_values=cache)
    return cache


def kept_by_values(full: DynamicCache, cache: DynamicCache, layers: int) -> np.ndarray:
    """bool[L, Hkv, T]: the prompt positions whose value vectors the cache holds (gathers copy them
    exactly, and values are never altered, unlike ThinK's zeroed key channels)."""
    out = []
    for layer in range(layers):
        every, held = full.layers[layer].values[0].numpy(), cache.layers[layer].values[0].numpy()  # [H, T|n, D]
        out.append((held[:, :, None, :] == every[:, None, :, :]).all(-1).any(1))  # [H, T]
    return np.stack(out)


def kept_by_mask(model, t: int) -> np.ndarray:
    """bool[L, Hkv, T] for head-wise presses (AdaKV, DuoAttention), which mask keys instead of gathering."""
    heads = model.config.num_key_value_heads
    out = []
    for layer in model.model.layers:
        kept = np.ones((heads, t), bool)
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        if masked is not None:
            _, h, s = (x.numpy() for x in masked)
            kept[h, s] = False
        out.append(kept)
    return np.stack(out)


def with_pattern(sink: int, recent: int, gates) -> None:
    """DuoAttentionPress reads its pattern from the network; serve this one instead (its load path's
    clip to [0, 1] included), so post_init_from_model runs kvpress's own head selection on it."""
    scores = np.clip(np.asarray(gates, float), 0, 1)
    DuoAttentionPress.load_attention_pattern = staticmethod(lambda model: (sink, recent, scores))


def main() -> None:
    spec = json.load(sys.stdin)
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    ids = torch.tensor(spec["tokens"], dtype=torch.long)
    layers, t = model.config.num_hidden_layers, ids.shape[1]
    full = forward(model, ids)
    names = {name: getattr(kvpress, name) for name in dir(kvpress) if name.endswith("Press")}
    out: dict[str, np.ndarray] = {}
    for item in spec["presses"]:
        if "duo" in item:
            with_pattern(item["duo"]["sink"], item["duo"]["recent"], item["duo"]["gates"])
        press = eval(item["expr"], {}, names)  # noqa: S307  (test-provided expressions over kvpress's classes)
        cache = forward(model, ids, press)
        name = item["name"]
        headwise = isinstance(press, (kvpress.AdaKVPress, DuoAttentionPress))
        out[f"{name}/kept"] = kept_by_mask(model, t) if headwise else kept_by_values(full, cache, layers)
        if item.get("keys"):
            out[f"{name}/keys"] = np.stack([cache.layers[layer].keys[0].numpy() for layer in range(layers)])
        if "ThinK" in item["expr"]:  # pruned channels are zeroed in every kept key of the head
            out[f"{name}/channels"] = np.stack(
                [(cache.layers[layer].keys[0] != 0).any(dim=1).numpy() for layer in range(layers)]
            )
    for item in spec["patterns"]:
        folder = Path(item["dir"])
        config = json.loads((folder / "config.json").read_text())
        gates = np.loadtxt(folder / "full_attention_heads.tsv", dtype=float, delimiter="\t")
        with_pattern(config["sink_size"], config["recent_size"], gates)
        press = DuoAttentionPress(head_compression_ratio=item["sparsity"])
        fake = types.SimpleNamespace(device="cpu", config=types.SimpleNamespace(name_or_path=item["name"]))
        press.post_init_from_model(fake)
        out[f"{item['name']}/retrieval"] = ~press.streaming_mask.numpy()
    np.savez(spec["out"], **out)


if __name__ == "__main__":
    main()
