"""Teacher-forced NLL of a continuation after a long prompt: Full, an eviction policy, and LESS on it.

Each row is plain haystack text (kvjax.eval.haystack, no needle) of prompt + new tokens; the prompt is
prefilled, then every continuation token is fed (teacher forcing) and its predicted log-probability
read before it: the mean NLL per policy over rows and tokens, and kv_bytes per sequence of each
policy's state after the last step. LESS comes from its trained file with the base it was trained on
(its `meta`), at `--budget`; the baseline is that base without the state, at each budget listed.

    python benchmarks/less_nll.py --model smollm2-135m-instruct \
        --less docs/learned_policies/smollm2/less/less_state.npz --budget 128 --baseline-budgets 128,136
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.checkpoint import load
from kvjax.eval.haystack import haystack_from_name, plain_text
from kvjax.policies import LESS, Full


def rows(tokenizer, samples: int, length: int, haystack: str, seed: int) -> np.ndarray:
    """int32[samples, length]: plain haystack text, row i from seed + i."""
    source, out = haystack_from_name(haystack), []
    for i in range(samples):
        units = max(8, length // 8)
        while len(ids := tokenizer.encode(plain_text(source, seed + i, units))) < length:
            units *= 2
        out.append(ids[:length])
    return np.asarray(out, np.int32)


def continuation_nll(m, policy, tokens: np.ndarray, prompt_len: int) -> tuple[np.ndarray, int]:
    """(float64[B]: each row's mean NLL of tokens[:, prompt_len:] given everything before, kv_bytes per
    sequence at the end)."""
    new = tokens.shape[1] - prompt_len
    state = kvjax.prefill(m, tokens[:, : prompt_len - 1], policy, max_new_tokens=new)
    total, rows_ = np.zeros(len(tokens)), np.arange(len(tokens))
    for i in range(new):  # feed token prompt_len - 1 + i, score token prompt_len + i
        logits, state = kvjax.decode_step(m, state, tokens[:, prompt_len - 1 + i], policy)
        total -= np.asarray(jax.nn.log_softmax(logits, axis=-1)[rows_, tokens[:, prompt_len + i]], np.float64)
    return total / new, kvjax.kv_bytes(state) // len(tokens)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--less", required=True, help="LESS params (less_state.npz or its folder)")
    p.add_argument("--budget", type=int, default=128, help="LESS's base budget")
    p.add_argument("--baseline-budgets", default="128", help="comma-separated budgets of the base without state")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new", type=int, default=128, help="continuation tokens scored")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--haystack", default="prose")
    p.add_argument("--seed", type=int, default=1000, help="first row's seed (training drew task prompts)")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    m = load(args.model, dtype=jnp.float32)
    tokens = rows(m.tokenizer, args.samples, args.prompt_len + args.new, args.haystack, args.seed)
    less = LESS.from_file(args.less, m.config).with_budget(args.budget)
    policies = {"full": Full(), f"less@{args.budget}": less}
    for b in (int(x) for x in args.baseline_budgets.split(",")):
        policies[f"{type(less.base).__name__.lower()}@{b}"] = less.base.with_budget(b)
    results = []
    for name, policy in policies.items():
        start = time.perf_counter()
        per_row, size = continuation_nll(m, policy, tokens, args.prompt_len)
        nll = float(per_row.mean())
        results.append(
            {"policy": name, "repr": repr(policy), "nll": nll, "ppl": float(np.exp(nll)), "kv_bytes": size}
            | {"nll_per_row": per_row.round(4).tolist()}
        )
        print(
            f"{name:>20}  nll {nll:.4f}  ppl {np.exp(nll):8.3f}  kv_bytes/seq {size:>9}  ({time.perf_counter() - start:.0f} s)"
        )
    if args.out:
        record = {"argv": sys.argv, "model": args.model, "rows": results, **vars(args)}
        Path(args.out).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
