"""KV-state bytes of every policy on a Llama-3.1-8B-shaped config, from abstract shapes only.

`jax.eval_shape` of allocate (the prefill state) and finalize (the state decoding starts from): no
weights, no compute. Prints a markdown table (batch 1, bf16, prompt chunk 512) with the ratio to
Full at 4K and 32K prompts, plus room for `MAX_NEW` decode tokens.
Usage: python benchmarks/kv_bytes_table.py [--out benchmarks/kv_bytes_table.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

import kvjax
from kvjax.config import ModelConfig
from kvjax.policies import (
    A2SF,
    CSKV,
    H2O,
    KIVI,
    LESS,
    TOVA,
    VATP,
    AdaKV,
    DuoAttention,
    Full,
    Knorm,
    LazyLLM,
    MiKV,
    PromptSVD,
    PyramidInfer,
    PyramidKV,
    QuantizedPruning,
    Quest,
    RazorAttention,
    SnapKV,
    SqueezedAttention,
    StreamingLLM,
    ThinK,
    Twilight,
)
from kvjax.policies.base import bind_params, split_params
from kvjax.policies.cskv import factor_shapes
from kvjax.policies.less.kernels import param_shapes
from model_shapes import LLAMA31_8B

PROMPTS = (4096, 32768)
MAX_NEW = 256
CHUNK = 512
# Head splits for the head-wise policies: half of each layer's KV heads (DuoAttention's GQA
# deployment sparsity) and every 7th of the 256 heads (37, ~15%: RazorAttention's echo + induction share).
HALF = tuple(tuple(range(4)) for _ in range(32))
RAZOR = tuple(tuple(h for h in range(8) if (layer * 8 + h) % 7 == 0) for layer in range(32))
# CSKV's factors at density 0.5 (512 of 1024 channels), as shapes: only their ranks shape the cache.
CSKV_HALF = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in factor_shapes(LLAMA31_8B, 512, 512).items()}
# LESS's params at the authors' rank 8 and hidden 512, as shapes: the rank sizes the state.
LESS_RANK8 = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(LLAMA31_8B, 8, 512).items()}

# (label, policy): append new policies here; every entry is measured the same way.
POLICIES = [
    ("Full", Full()),
    ("StreamingLLM(sink=4, window=1020)", StreamingLLM()),
    ("H2O(heavy=512, window=512)", H2O()),
    ("A2SF(heavy=512, window=512, forgetting=0.95)", A2SF()),
    ("VATP(heavy=512, window=512)", VATP()),
    ("TOVA(budget_tokens=512)", TOVA()),
    ("SnapKV(budget_tokens=1024)", SnapKV()),
    ("PyramidKV(budget_tokens=1024, beta=20)", PyramidKV()),
    ("PyramidInfer(recent_ratio=0.2, decay_ratio=0.9): prefill in one chunk", PyramidInfer()),
    ("LazyLLM(depths=(0.25, 0.5, 0.75), percentiles=(0.3, 0.4, 0.5)): prefill in one chunk", LazyLLM()),
    ("AdaKV(SnapKV(budget_tokens=1024), alpha=0.2)", AdaKV(SnapKV())),
    ("Knorm(budget_tokens=1024, skip_layers=(0, 1))", Knorm()),
    ("DuoAttention(50% retrieval heads, sink=64, recent=256)", DuoAttention(HALF)),
    ("RazorAttention(~15% retrieval heads, sink=4, recent=max(4000, N // 5))", RazorAttention(RAZOR)),
    ("KIVI(bits=4)", KIVI(bits=4)),
    ("KIVI(bits=2)", KIVI(bits=2)),
    ("QuantizedPruning(SnapKV(budget_tokens=4096), bits=4)", QuantizedPruning(SnapKV(4096), 4)),
    ("ThinK(Full(), ratio=0.4)", ThinK(Full())),
    ("ThinK(SnapKV(budget_tokens=1024), ratio=0.4)", ThinK(SnapKV())),
    ("CSKV(residual=32), factors of rank 512 + 512 (density 0.5)", CSKV(params=CSKV_HALF)),
    ("LESS(H2O(heavy=512, window=512)), rank 8", LESS(H2O(), params=LESS_RANK8)),
    ("PromptSVD(key_density=0.5, value_density=0.5, residual=32)", PromptSVD()),
    ("MiKV(H2O(heavy=512, window=512), bits=4)", MiKV(H2O(), 4)),
    ("MiKV(H2O(heavy=512, window=512), bits=2)", MiKV(H2O(), 2)),
    ("SqueezedAttention(clusters=5%, keep=10%): frees nothing, reads less", SqueezedAttention()),
    ("Quest(budget_tokens=1024, page=16): frees nothing, reads less", Quest()),
    ("Twilight(budget_tokens=8192, top_p=0.85, bits=4): frees nothing, reads less", Twilight()),
]


def state_bytes(policy, config: ModelConfig, prompt_len: int) -> tuple[int, int]:
    """(prefill-state bytes, decode-ready bytes) for one prompt of `prompt_len` tokens, batch 1."""

    static, params = split_params(policy)

    def build(params):  # learned parameters as abstract shapes too
        p = bind_params(static, params)
        state = p.allocate(config, 1, prompt_len, MAX_NEW, CHUNK, jnp.bfloat16)
        return state, p.finalize(config, state, prompt_len, MAX_NEW)

    prefill, final = jax.eval_shape(build, params)
    return kvjax.kv_bytes(prefill), kvjax.kv_bytes(final)


def table(config: ModelConfig = LLAMA31_8B) -> str:
    full = {t: state_bytes(Full(), config, t)[1] for t in PROMPTS}
    head = "| policy | " + " | ".join(f"{t // 1024}K: state (MiB) | ratio | prefill state (MiB)" for t in PROMPTS)
    lines = [head + " |", "|---" * (1 + 3 * len(PROMPTS)) + "|"]
    for label, policy in POLICIES:
        cells = []
        for t in PROMPTS:
            prefill, final = state_bytes(policy, config, t)
            cells += [f"{final / 2**20:,.1f}", f"{final / full[t]:.4f}", f"{prefill / 2**20:,.1f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    intro = (
        f"KV-state bytes (`kvjax.kv_bytes`) on a Llama-3.1-8B shape (32 layers, 8 KV heads, D 128, bf16), "
        f"batch 1, room for {MAX_NEW} decode tokens, prefill chunk {CHUNK}; abstract shapes only. "
        f"'state' = after the prompt (what decoding holds); 'prefill state' = the buffers while prefilling; "
        f"ratio = state / Full's state at the same prompt length.\n\n"
    )
    text = intro + table() + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
