"""Tiny llama GGUF files written with `gguf.GGUFWriter` the way llama.cpp exports them (Q/K rows interleaved
per head), from tiny random transformers Llama weights, in any tensor type the converter reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# K-quant blocks span 256 values along a row (GGUF's innermost dim): every matrix's input size is a multiple.
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
SMALL = {"hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "head_dim": 16}
K_SIZED = {"hidden": 256, "intermediate": 256, "heads": 4, "kv_heads": 2, "head_dim": 64}
# The largest |dequantized weight| a random K-quant block reaches per unit of its fp16 scale `d`.
_K_SPAN = {"Q4_K": 63 * 15, "Q5_K": 63 * 31, "Q6_K": 127 * 32}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_TEXT = (
    "The quick brown fox jumps over the lazy dog. A needle hides in a haystack of many words; "
    "long contexts need small caches. Keys and values, queries and heads, tokens and positions. "
) * 4


def interleave_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's export of a Q or K projection [N*D, E]: each head's two rotary halves interleaved."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gpt2_vocab() -> dict:
    """A byte-level BPE vocabulary (tokens, merges, types) trained on a fixed text; ids 0-2 are control tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>", "<pad>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_TEXT], trainer)
    saved = json.loads(tok.to_str())["model"]
    tokens = sorted(saved["vocab"], key=saved["vocab"].get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in saved["merges"]]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return {
        "model": "gpt2",
        "pre": "gpt-2",
        "tokens": tokens,
        "merges": merges,
        "types": types,
        "bos": 0,
        "eos": 1,
        "pad": 2,
        "unk": None,
    }


def llama_vocab() -> dict:
    """A SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte pieces, then BPE pieces scored by merge order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.train_from_iterator([_TEXT], trainers.BpeTrainer(vocab_size=150, show_progress=False))
    vocab = tok.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return {
        "model": "llama",
        "tokens": tokens,
        "scores": scores,
        "types": types,
        "bos": 1,
        "eos": 2,
        "pad": None,
        "unk": 0,
    }


def _k_quant_blocks(rng, qtype: str, shape: tuple[int, int], target: float = 0.15) -> np.ndarray:
    """Validly structured random K-quant bytes for a [rows, cols] matrix: random bits, small finite scales."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    rows, cols = shape
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.0, (rows, cols // block, 2)) * target / _K_SPAN[qtype]).astype(np.float16)
    if qtype == "Q6_K":  # ql, qh, int8 scales, then d
        data[..., 208:210] = d[..., :1].view(np.uint8)
    else:  # d, dmin first
        data[..., 0:4] = d.view(np.uint8).reshape(rows, cols // block, 4)
    return data.reshape(rows, -1)


def _encode(rng, qtype: str, w: np.ndarray):
    """(array to write, raw GGML type) for a float32 weight in `qtype`; 1-D tensors stay F32 (as llama.cpp)."""
    from gguf import GGMLQuantizationType, quantize

    if w.ndim == 1 or qtype == "F32":
        return w.astype(np.float32), None
    if qtype == "F16":
        return w.astype(np.float16), None
    if qtype in K_QUANTS:
        return _k_quant_blocks(rng, qtype, w.shape), GGMLQuantizationType[qtype]
    return quantize(w, GGMLQuantizationType[qtype]), GGMLQuantizationType[qtype]


def llama_weights(sizes: dict, vocab_size: int, layers: int, tie: bool, seed: int) -> dict[str, np.ndarray]:
    """A tiny random transformers LlamaForCausalLM's float32 state dict."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=sizes["hidden"],
        intermediate_size=sizes["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=sizes["heads"],
        num_key_value_heads=sizes["kv_heads"],
        head_dim=sizes["head_dim"],
        tie_word_embeddings=tie,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def write_tiny_gguf(
    path,
    qtype: str = "F32",
    vocab: str = "gpt2",
    tie: bool = False,
    layers: int = 2,
    seed: int = 0,
    arch: str = "llama",
    drop_keys: tuple[str, ...] = (),
    drop_tensors: tuple[str, ...] = (),
    replace_tensors: dict | None = None,
    extra_metadata: dict | None = None,
    sizes: dict | None = None,
) -> Path:
    """Writes a tiny llama GGUF: metadata as llama.cpp names it, the tokenizer of `vocab` ('gpt2' or 'llama'),
    weights in `qtype` (norms F32), `sizes` as SMALL or K_SIZED. The drop/replace arguments make damaged files for the error tests."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    sizes = sizes or (K_SIZED if qtype in K_QUANTS else SMALL)
    spec = gpt2_vocab() if vocab == "gpt2" else llama_vocab()
    n_vocab = len(spec["tokens"])
    hf = llama_weights(sizes, n_vocab, layers, tie, seed)
    h, k, d, e = sizes["heads"], sizes["kv_heads"], sizes["head_dim"], sizes["hidden"]
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(layers):
        names.update({f"model.layers.{i}.{a}.weight": f"blk.{i}.{b}.weight" for a, b in per_layer.items()})
    tensors = {}
    for hf_name, w in hf.items():
        if hf_name == "lm_head.weight" and tie:
            continue
        name = names[hf_name]
        if name.endswith("attn_q.weight"):
            w = interleave_rows(w, h)
        elif name.endswith("attn_k.weight"):
            w = interleave_rows(w, k)
        tensors[name] = w
    tensors.update(replace_tensors or {})

    meta = {
        "llama.vocab_size": ("uint32", n_vocab),
        "llama.context_length": ("uint32", 2048),
        "llama.embedding_length": ("uint32", e),
        "llama.feed_forward_length": ("uint32", sizes["intermediate"]),
        "llama.block_count": ("uint32", layers),
        "llama.attention.head_count": ("uint32", h),
        "llama.attention.head_count_kv": ("uint32", k),
        "llama.rope.freq_base": ("float32", 10000.0),
        "llama.attention.layer_norm_rms_epsilon": ("float32", 1e-6),
        "llama.rope.dimension_count": ("uint32", d),
        "tokenizer.ggml.model": ("string", spec["model"]),
        "tokenizer.ggml.tokens": ("array", spec["tokens"]),
        "tokenizer.ggml.token_type": ("array", spec["types"]),
        "tokenizer.ggml.bos_token_id": ("uint32", spec["bos"]),
        "tokenizer.ggml.eos_token_id": ("uint32", spec["eos"]),
        "tokenizer.chat_template": ("string", CHAT_TEMPLATE),
    }
    if d != e // h:
        meta["llama.attention.key_length"] = ("uint32", d)
        meta["llama.attention.value_length"] = ("uint32", d)
    if spec["model"] == "gpt2":
        meta.update(
            {
                "tokenizer.ggml.pre": ("string", spec["pre"]),
                "tokenizer.ggml.merges": ("array", spec["merges"]),
                "tokenizer.ggml.padding_token_id": ("uint32", spec["pad"]),
                "tokenizer.ggml.add_bos_token": ("bool", True),
            }
        )
    else:
        meta.update(
            {
                "tokenizer.ggml.scores": ("array", spec["scores"]),
                "tokenizer.ggml.unknown_token_id": ("uint32", spec["unk"]),
            }
        )
    meta.update(extra_metadata or {})
    writer = gguf.GGUFWriter(str(path), arch)
    for key, (kind, value) in meta.items():
        if key not in drop_keys:
            getattr(writer, f"add_{kind}")(key, value)
    for name, w in tensors.items():
        if name not in drop_tensors:
            data, raw = _encode(rng, qtype, w) if w.dtype == np.float32 else (w, None)
            writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
