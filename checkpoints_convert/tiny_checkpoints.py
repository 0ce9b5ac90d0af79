"""Tiny random Hugging Face checkpoints of every supported family and rope variant.

For tests and demos with no download: each is saved with `save_pretrained` (safetensors) next to a
small byte-level BPE tokenizer.json. Needs the `test` extra (transformers, torch).
Usage: python -m checkpoints_convert.tiny_checkpoints VARIANT OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    initializer_range=0.2,
    rms_norm_eps=1e-5,
)
_LONGROPE_PAIRS = 8  # head_dim 16 -> 8 rotary frequency pairs

VARIANTS: dict[str, dict] = {
    "llama2": dict(
        family="llama", num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
    ),
    "llama3": dict(
        family="llama",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ),
    "llama_linear": dict(
        family="llama",
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    ),
    "mistral": dict(family="mistral", sliding_window=48, num_key_value_heads=1),
    "qwen2": dict(
        family="qwen2", tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
    ),
    "qwen2_sliding": dict(family="qwen2", use_sliding_window=True, sliding_window=40, max_window_layers=1),
    "phi3": dict(
        family="phi3",
        num_key_value_heads=4,
        original_max_position_embeddings=256,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(_LONGROPE_PAIRS)],
            "long_factor": [1.0 + 2.0 * i for i in range(_LONGROPE_PAIRS)],
        },
    ),
}

_TEXT = (
    "The quick brown fox jumps over the lazy dog. A needle hides in a haystack of many words; "
    "long contexts need small caches. Keys and values, queries and heads, tokens and positions. "
)
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(out_dir: Path, vocab_size: int = 320) -> int:
    """Trains a byte-level BPE on a fixed sentence (deterministic); returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TEXT] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": _CHAT_TEMPLATE})
    )
    return tok.get_vocab_size()


def hf_config(variant: str, vocab_size: int):
    """The transformers config object of a variant."""
    import transformers

    spec = dict(VARIANTS[variant])
    family = spec.pop("family")
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "phi3": transformers.Phi3Config,
    }[family]
    return cls(**{**_COMMON, **spec}, vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def build(variant: str, out_dir, seed: int = 0, with_tokenizer: bool = True, **save_kwargs) -> Path:
    """Saves a tiny random `variant` model (fp32 safetensors) and its tokenizer to out_dir."""
    import torch
    import transformers

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out_dir) if with_tokenizer else 320
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(variant, vocab), dtype=torch.float32)
    model.save_pretrained(out_dir, **save_kwargs)
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.variant, args.out_dir, args.seed))


if __name__ == "__main__":
    main()
