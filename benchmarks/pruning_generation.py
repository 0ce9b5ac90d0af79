"""LazyLLM's time to first token and PyramidInfer's decode cache, next to Full, on one real model.

Time to first token: `kvjax.generate(..., max_new_tokens=1)` on one prompt of random token ids at each of
`--lengths`, for Full (its default 512-token prefill chunks, and the whole prompt in one chunk, as the pruning
policies prefill) and LazyLLM(): the first call's wall seconds (compile included) and the median of `--repeats`
more (wall and process CPU); ratios to Full's medians in the same run.

PyramidInfer's decode cache: at the first length, the state after `--new` greedy decode steps (prefilled with
room for exactly those; the first step feeds the prompt's last token again, then greedy) - its `kv_bytes` and the entries each layer holds - for Full, PyramidInfer() and
PyramidInfer(gen_interval=0) (no generation stage); and, from abstract shapes only, the `kv_bytes` of states
prefilled with room for each of `--rooms` tokens (the generation stage's first block comes due after about
n / 4 + 20 generated tokens, so only long rooms shrink).

Usage: nice -n 10 python benchmarks/pruning_generation.py [--model smollm2-135m-instruct] [--lengths 2048 4096]
       [--new 64] [--rooms 64 512 1024 2048] [--out benchmarks/results/pruning_generation_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.policies import Full, LazyLLM, PyramidInfer
from timing import environment  # benchmarks/timing.py


def timed(fn, repeats: int) -> dict:
    """Wall and process CPU seconds of the first call (compile included) and the medians of `repeats` more (CPU
    seconds sum over threads, but other processes on a shared machine stretch them far less than wall time)."""
    walls, cpus = [], []
    for _ in range(1 + repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return dict(
        first_call_s=walls[0],
        median_s=statistics.median(walls[1:]),
        median_cpu_s=statistics.median(cpus[1:]),
    )


def abstract_bytes(m, policy, prompt_len: int, room: int) -> int:
    """kv_bytes of the state a prompt of `prompt_len` decodes from with room for `room` tokens (shapes only)."""

    def build():
        state = policy.allocate(m.config, 1, prompt_len, room, prompt_len, jnp.float32)
        return policy.finalize(m.config, state, prompt_len, room)

    return kvjax.kv_bytes(jax.eval_shape(build))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rooms", type=int, nargs="+", default=[64, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/pruning_generation_cpu.json")
    args = parser.parse_args()

    m = kvjax.load(args.model, dtype=jnp.float32)
    rng = np.random.default_rng(args.seed)
    prompts = {n: rng.integers(3, m.config.vocab_size, (1, n)).astype(np.int32) for n in args.lengths}

    ttft = []
    for n, tokens in prompts.items():
        rows = []
        for label, policy, chunk in [
            ("Full() 512-token chunks", Full(), None),
            ("Full() one chunk", Full(), n),
            ("LazyLLM()", LazyLLM(), None),
        ]:
            row = dict(prompt_tokens=n, policy=label, chunk_size=chunk)
            row.update(timed(lambda: kvjax.generate(m, tokens, 1, policy, chunk_size=chunk), args.repeats))
            rows.append(row)
            print(json.dumps(row), flush=True)
        for row in rows:
            for key in ("median_s", "median_cpu_s"):
                row[f"{key}_ratio_to_full_chunked"] = row[key] / rows[0][key]
                row[f"{key}_ratio_to_full_one_chunk"] = row[key] / rows[1][key]
        ttft += rows

    n = args.lengths[0]
    decode = []
    for label, policy in [
        ("Full()", Full()),
        ("PyramidInfer()", PyramidInfer()),
        ("PyramidInfer(gen_interval=0)", PyramidInfer(gen_interval=0)),
    ]:
        state = kvjax.prefill(m, prompts[n], policy, max_new_tokens=args.new)
        logits, state = kvjax.decode_step(m, state, prompts[n][:, -1], policy)  # then greedy
        for _ in range(args.new - 1):
            logits, state = kvjax.decode_step(m, state, np.asarray(jnp.argmax(logits, -1)), policy)
        held = [int(jnp.sum(layer[0].pos[0, 0] >= 0)) for layer in state.layers]
        row = dict(prompt_tokens=n, new_tokens=args.new, policy=label, kv_bytes=kvjax.kv_bytes(state))
        row.update(entries_per_layer=held, entries_total=sum(held))
        row["rooms_kv_bytes"] = {str(r): abstract_bytes(m, policy, n, r) for r in args.rooms}
        decode.append(row)
        print(json.dumps(row), flush=True)
        del state
    for row in decode:
        row["kv_bytes_ratio_to_full"] = row["kv_bytes"] / decode[0]["kv_bytes"]
        row["entries_ratio_to_full"] = row["entries_total"] / decode[0]["entries_total"]
        row["rooms_ratio_to_full"] = {r: b / decode[0]["rooms_kv_bytes"][r] for r, b in row["rooms_kv_bytes"].items()}
    first_due = PyramidInfer().generation_due([n], max(args.rooms))[0]
    result = dict(
        benchmark="LazyLLM time to first token; PyramidInfer decode cache (generation stage)",
        **environment(),
        model=args.model,
        dtype="float32",
        batch=1,
        seed=args.seed,
        repeats=args.repeats,
        load_average_at_end=os.getloadavg(),  # other processes on the machine (wall times stretch under load)
        shapes=dict(num_layers=m.config.num_layers, num_kv_heads=m.config.num_kv_heads, head_dim=m.config.head_dim),
        pyramidinfer_first_block_due_at_step=int(first_due[0] - n + 1) if first_due[0] >= 0 else None,
        time_to_first_token=ttft,
        decode_cache=decode,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
