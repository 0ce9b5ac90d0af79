"""Prefill time and time to first token of the policies that prune tokens between layers (PyramidInfer,
LazyLLM) next to Full, on one prompt of random token ids.

Per policy: `kvjax.prefill` (the state) and `kvjax.generate(..., max_new_tokens=1)` (prefill, last-token
logits and the first token: the time to first token), each timed as the first call's wall and process CPU
seconds (compile included) and the medians of `--repeats` more; their ratios to Full's in the same run (Full
in one chunk, as the pruning policies prefill, and at its default 512-token chunks); the prefill state's
`kv_bytes`; and the share of the token-layers the prefill computes (the schedule's sum over layers / L x T,
what the projections and MLPs cost relative to Full).

Usage: nice -n 19 python benchmarks/prefill_pruning.py [--model smollm2-135m-instruct] [--length 4096]
       [--repeats 3] [--out benchmarks/results/prefill_pruning_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.policies import Full, LazyLLM, PyramidInfer
from timing import environment  # benchmarks/timing.py


def timed(fn, repeats: int) -> tuple[dict, object]:
    """Wall and process CPU seconds of the first call (compile included) and the medians of `repeats` more."""
    walls, cpus = [], []
    for _ in range(1 + repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(fn())
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return dict(
        first_call_s=walls[0],
        first_call_cpu_s=cpus[0],
        median_s=statistics.median(walls[1:]),
        median_cpu_s=statistics.median(cpus[1:]),
    ), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default="benchmarks/results/prefill_pruning_cpu.json")
    args = parser.parse_args()

    m = kvjax.load(args.model, dtype=jnp.float32)
    tokens = np.random.default_rng(args.seed).integers(3, m.config.vocab_size, (1, args.length)).astype(np.int32)
    runs = [
        ("Full() one chunk", Full(), args.length),
        ("Full() 512-token chunks", Full(), None),
        ("PyramidInfer()", PyramidInfer(), None),
        ("LazyLLM()", LazyLLM(), None),
    ]
    layers = m.config.num_layers
    rows = []
    for label, policy, chunk in runs:
        row = dict(policy=label, chunk_size=chunk)
        schedule = getattr(policy, "layer_tokens", None)
        per_layer = [args.length] * layers if schedule is None else schedule(layers, [args.length])[:, 0].tolist()
        row.update(tokens_per_layer=per_layer, token_layers_share=sum(per_layer) / (layers * args.length))
        prefill, state = timed(lambda: kvjax.prefill(m, tokens, policy, chunk_size=chunk), args.repeats)
        row.update({f"prefill_{k}": v for k, v in prefill.items()}, kv_bytes=kvjax.kv_bytes(state))
        del state
        ttft, first = timed(lambda: kvjax.generate(m, tokens, 1, policy, chunk_size=chunk), args.repeats)
        row.update({f"ttft_{k}": v for k, v in ttft.items()}, first_token=int(first[0, 0]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        for key in [k for k in row if k.endswith("_s") and "first_call" not in k]:
            base = key.removesuffix("_s")
            row[f"{base}_ratio_to_full_one_chunk"] = row[key] / rows[0][key]
            row[f"{base}_ratio_to_full_chunked"] = row[key] / rows[1][key]
        row["kv_bytes_ratio_to_full"] = row["kv_bytes"] / rows[0]["kv_bytes"]

    result = dict(
        benchmark="prefill pruning: prefill time and time to first token",
        **environment(),
        model=args.model,
        dtype="float32",
        prompt_tokens=args.length,
        batch=1,
        seed=args.seed,
        repeats=args.repeats,
        note=args.note,
        results=rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
