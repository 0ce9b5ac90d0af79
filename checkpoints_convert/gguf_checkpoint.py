"""`kvjax convert MODEL.gguf OUT_DIR`: a llama.cpp GGUF file -> a kvjax checkpoint, dequantized, all or nothing.

Reads with the `gguf` package (its reader and dequantizers); maps the `llama` architecture's metadata to a
ModelConfig, undoes llama.cpp's per-head Q/K row interleave (so kvjax's rotate-half RoPE applies), and
rebuilds the tokenizer as a `tokenizers` JSON from the vocabulary the file stores.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from checkpoints_convert.convert import _DTYPES, ConversionError, _nest
from checkpoints_convert.weight_map import hf_targets
from kvjax.checkpoint import check_output_dir, save_checkpoint
from kvjax.config import ModelConfig, RopeConfig, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
# The tensor types converted (the dequantizers of `gguf.quants`); the value is the name in messages.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# GGUF tensor name (per-layer ones after `blk.N.`) -> the Hugging Face name whose layout it shares.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# llama.cpp token types (tokenizer.ggml.token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# Byte-level BPE pre-tokenizer splits by `tokenizer.ggml.pre`, as llama.cpp names them (None: GPT-2's own).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BPE_PRE = {
    "default": None,
    "gpt-2": None,
    "gpt2": None,
    "smollm": "digits",
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


def is_gguf(path) -> bool:
    """Whether `path` is to be converted as GGUF: a `.gguf` name (so a damaged file still gets GGUF's errors)
    or a file that starts with GGUF's magic."""
    path = Path(path)
    if path.is_dir():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _reader(path: Path):
    from gguf import GGUFReader

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ConversionError(f"{path.name} is not a GGUF file: bad magic {magic!r} (expected {GGUF_MAGIC!r})")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as err:  # the reader's ways of running off the end
        raise ConversionError(f"{path.name}: truncated or corrupted GGUF header or tensor table ({err})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ConversionError(
                f"{path.name} is truncated: tensor {t.name!r} ends at byte "
                f"{t.data_offset + t.n_bytes}, the file has {size}"
            )
    return reader


def _value(reader, path: Path, key: str, default=...):
    """A metadata value (str, number, bool or list); missing keys are an error unless a default is given."""
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise ConversionError(f"{path.name} lacks metadata key {key!r}")
        return default
    return field.contents()


def _rope(reader, path: Path, head_dim: int, tensor_names: set[str]) -> RopeConfig:
    theta = float(_value(reader, path, "llama.rope.freq_base", 10000.0))
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedModelError(
            f"{path.name} stores rope_freqs.weight (llama3-style per-frequency rope factors), which kvjax cannot "
            "map back to a rope schedule; convert the Hugging Face checkpoint instead"
        )
    dims = _value(reader, path, "llama.rope.dimension_count", head_dim)
    if dims != head_dim:
        raise UnsupportedModelError(f"{path.name}: llama.rope.dimension_count {dims} differs from head_dim {head_dim}")
    kind = _value(reader, path, "llama.rope.scaling.type", None)
    factor = _value(reader, path, "llama.rope.scaling.factor", None)
    if kind is None and (old := _value(reader, path, "llama.rope.scale_linear", None)) is not None:
        kind, factor = "linear", old
    if kind in (None, "none") or (kind == "linear" and float(factor or 1.0) == 1.0):
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(factor))
    raise UnsupportedModelError(
        f"{path.name}: unsupported llama.rope.scaling.type {kind!r}; kvjax converts "
        "GGUF rope scaling 'none' and 'linear'"
    )


def gguf_config(reader, path: Path) -> ModelConfig:
    """The ModelConfig of a `llama` GGUF file's metadata (tied embeddings when there is no output.weight)."""
    arch = _value(reader, path, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(
            f"{path.name}: unsupported architecture {arch!r}; kvjax converts GGUF files of architecture 'llama'"
        )
    names = {t.name for t in reader.tensors}
    hidden = int(_value(reader, path, "llama.embedding_length"))
    heads = int(_value(reader, path, "llama.attention.head_count"))
    head_dim = int(_value(reader, path, "llama.attention.key_length", hidden // heads))
    value_dim = int(_value(reader, path, "llama.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise UnsupportedModelError(f"{path.name}: key_length {head_dim} differs from value_length {value_dim}")
    vocab = _value(reader, path, "llama.vocab_size", None)
    if vocab is None:
        vocab = len(_value(reader, path, "tokenizer.ggml.tokens"))
    eos = _value(reader, path, "tokenizer.ggml.eos_token_id", None)
    return ModelConfig(
        family="llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_value(reader, path, "llama.feed_forward_length")),
        num_layers=int(_value(reader, path, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(_value(reader, path, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(_value(reader, path, "llama.context_length")),
        rms_norm_eps=float(_value(reader, path, "llama.attention.layer_norm_rms_epsilon")),
        rope=_rope(reader, path, head_dim, names),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_value(reader, path, "tokenizer.ggml.bos_token_id", None),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=_value(reader, path, "tokenizer.ggml.padding_token_id", None),
    )


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> its numpy shape (GGUF lists dims innermost first; numpy's order is the reverse)."""
    e, h, k, d, f, v = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
    )
    shapes = {"token_embd.weight": (v, e), "output_norm.weight": (e,)}
    if not cfg.tie_word_embeddings:
        shapes["output.weight"] = (v, e)
    per_layer = {
        "attn_norm.weight": (e,),
        "attn_q.weight": (h * d, e),
        "attn_k.weight": (k * d, e),
        "attn_v.weight": (k * d, e),
        "attn_output.weight": (e, h * d),
        "ffn_norm.weight": (e,),
        "ffn_gate.weight": (f, e),
        "ffn_up.weight": (f, e),
        "ffn_down.weight": (e, f),
    }
    for i in range(cfg.num_layers):
        shapes.update({f"blk.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K export: [N*D, E] rows per head ordered (pair, 2) -> Hugging Face's (2, pair).

    llama.cpp interleaves each head's two rotary halves so that its RoPE rotates adjacent pairs; kvjax (as
    transformers) rotates the halves, so row `2i + c` of a head goes back to row `c * D/2 + i`.
    """
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _check_tensors(reader, path: Path, cfg: ModelConfig) -> None:
    """Every tensor present, expected, well shaped and of a supported type, before anything is dequantized."""
    expected = _expected_shapes(cfg)
    seen = set()
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if t.name not in expected:
            raise ConversionError(f"unexpected tensor {t.name!r} in {path.name}: no llama parameter takes it")
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ConversionError(
                f"tensor {t.name!r} in {path.name} has type {t.tensor_type.name}, which kvjax "
                f"does not convert (supported: {', '.join(SUPPORTED_TYPES)})"
            )
        if shape != expected[t.name]:
            raise ConversionError(
                f"tensor {t.name!r} in {path.name} has shape {shape}; the config implies {expected[t.name]}"
            )
        seen.add(t.name)
    missing = [name for name in expected if name not in seen]
    if missing:
        raise ConversionError(
            f"{path.name} lacks tensors {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )


def _dequantized(t) -> np.ndarray:
    """The tensor in float32, numpy order; a fresh array (never a view of the memory-mapped file)."""
    from gguf import GGMLQuantizationType, dequantize

    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    if t.tensor_type == GGMLQuantizationType.F32:
        return np.array(t.data, dtype=np.float32).reshape(shape)
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def _gpt2_tokenizer(tokens, merges, pre):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if pre not in _BPE_PRE:
        raise ConversionError(f"unsupported tokenizer.ggml.pre {pre!r}; kvjax rebuilds {', '.join(sorted(_BPE_PRE))}")
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ConversionError(f"tokenizer.ggml.merges entry {merge!r} is not two tokens")
        pairs.append(tuple(parts))
    split = _BPE_PRE[pre]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, pairs, ignore_merges=split is _LLAMA3_SPLIT))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":  # llama.cpp's smollm: each digit alone, then GPT-2's split
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_merges(tokens, scores, types) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies: every split of a normal piece into two vocabulary
    pieces, best (highest) score of the merged piece first, a longer left part first among equals."""
    index = {t: i for i, t in enumerate(tokens)}
    mergeable = {t for t, kind in zip(tokens, types) if kind in (_NORMAL, _USER_DEFINED)}
    ranked = []
    for token, score, kind in zip(tokens, scores, types):
        if kind != _NORMAL:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, -len(left), index[token], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def _llama_tokenizer(tokens, scores, types, unk, add_space_prefix):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    merges = sentencepiece_merges(tokens, scores, types)
    unk_token = tokens[unk] if unk is not None else None
    tok = Tokenizer(
        models.BPE({t: i for i, t in enumerate(tokens)}, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", split=False, prepend_scheme="first" if add_space_prefix else "never"
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tok


def write_gguf_tokenizer(reader, path: Path, out_dir: Path) -> dict[str, Path]:
    """tokenizer.json and tokenizer_config.json (special tokens, chat template) from the file's vocabulary,
    for `tokenizer.ggml.model` gpt2 (byte-level BPE) and llama (SentencePiece pieces and scores)."""
    from tokenizers import AddedToken, processors

    kind = _value(reader, path, "tokenizer.ggml.model")
    tokens = _value(reader, path, "tokenizer.ggml.tokens")
    types = _value(reader, path, "tokenizer.ggml.token_type", None) or [_NORMAL] * len(tokens)
    if len(set(tokens)) != len(tokens) or len(types) != len(tokens):
        raise ConversionError(f"{path.name}: tokenizer.ggml.tokens has repeats or does not match token_type")
    ids = {
        key: _value(reader, path, f"tokenizer.ggml.{key}_token_id", None)
        for key in ("bos", "eos", "padding", "unknown")
    }
    for key, value in ids.items():
        if value is not None and not 0 <= value < len(tokens):
            raise ConversionError(f"{path.name}: tokenizer.ggml.{key}_token_id {value} is outside the vocabulary")
    if kind == "gpt2":
        tok = _gpt2_tokenizer(
            tokens, _value(reader, path, "tokenizer.ggml.merges"), _value(reader, path, "tokenizer.ggml.pre", "default")
        )
        add_bos_default = False
    elif kind == "llama":
        scores = _value(reader, path, "tokenizer.ggml.scores")
        tok = _llama_tokenizer(
            tokens, scores, types, ids["unknown"], _value(reader, path, "tokenizer.ggml.add_space_prefix", True)
        )
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    else:
        raise ConversionError(f"{path.name}: unsupported tokenizer.ggml.model {kind!r}; kvjax rebuilds gpt2 and llama")
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == _CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    )
    add_bos = bool(_value(reader, path, "tokenizer.ggml.add_bos_token", add_bos_default)) and ids["bos"] is not None
    add_eos = bool(_value(reader, path, "tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
    if add_bos or add_eos:
        bos, eos = tokens[ids["bos"]] if add_bos else None, tokens[ids["eos"]] if add_eos else None
        single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
        pair = " ".join(
            [f"{bos}:0"] * add_bos
            + ["$A:0"]
            + [f"{eos}:0"] * add_eos
            + [f"{bos}:1"] * add_bos
            + ["$B:1"]
            + [f"{eos}:1"] * add_eos
        )
        specials = [(t, ids[k]) for t, k, on in ((bos, "bos", add_bos), (eos, "eos", add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    names = {"bos_token": "bos", "eos_token": "eos", "pad_token": "padding", "unk_token": "unknown"}
    config = {name: tokens[ids[key]] for name, key in names.items() if ids[key] is not None}
    config.update(add_bos_token=add_bos, add_eos_token=add_eos)
    template = _value(reader, path, "tokenizer.chat_template", None)
    if template is not None:
        config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return {"tokenizer.json": out_dir / "tokenizer.json", "tokenizer_config.json": out_dir / "tokenizer_config.json"}


def _metadata(reader) -> dict:
    """The file's scalar metadata (vocabularies and other arrays left out), kept next to the checkpoint."""
    return {
        key: field.contents()
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.") and len(field.types) == 1
    }


def convert_gguf(gguf_path, out_dir, dtype: str | None = None, progress: bool = True) -> Path:
    """Converts a `llama` GGUF file into a kvjax checkpoint at `out_dir` (which must not exist).

    Tensor by tensor: each is dequantized from the memory-mapped file to float32, un-permuted (Q, K),
    laid out as kvjax's parameter and cast to the storage dtype; only the converted copy is kept.
    The default storage dtype is float32: dequantized weights are exact there (scale times integer, as
    llama.cpp computes them), where bfloat16 would round them a second time; pass `dtype` to halve the size.
    """
    from tqdm import tqdm

    path, out_dir = Path(gguf_path), Path(out_dir)
    try:
        check_output_dir(out_dir)  # before any tensor is read
    except OSError as err:
        raise ConversionError(str(err)) from None
    if not path.is_file():
        raise ConversionError(f"{path} is not a file")
    dtype = dtype or "float32"
    if dtype not in _DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    storage = _DTYPES[dtype]
    reader = _reader(path)
    try:
        config = gguf_config(reader, path)
    except (ValueError, TypeError) as err:  # UnsupportedModelError, or a config that does not add up
        raise ConversionError(str(err)) from err
    _check_tensors(reader, path, config)
    with tempfile.TemporaryDirectory(prefix="kvjax-gguf-tokenizer-") as tmp:
        tokenizer_files = write_gguf_tokenizer(reader, path, Path(tmp))  # its errors before the long part
        arrays: dict[tuple, np.ndarray] = {}
        bar = tqdm(reader.tensors, desc="dequantizing", unit="tensor", disable=not progress)
        try:  # closed before an error propagates, so its last redraw cannot follow the message
            for t in bar:
                w = _dequantized(t)
                if t.name.endswith("attn_q.weight"):
                    w = unpermute_rows(w, config.num_heads)
                elif t.name.endswith("attn_k.weight"):
                    w = unpermute_rows(w, config.num_kv_heads)
                for target, value in hf_targets(config, _hf_name(t.name), w):
                    arrays[target] = np.ascontiguousarray(value, dtype=storage)
                del w
        finally:
            bar.close()
        return save_checkpoint(
            out_dir,
            config,
            _nest(arrays),
            tokenizer_files,
            metadata={"converted_from": str(path.absolute()), "gguf_metadata": _metadata(reader)},
        )
