"""Prefill time and padding of a ragged batch with and without prepacking (`kvjax.packing`).

Draws `--count` prompt lengths uniformly from [--min-len, --max-len] (random token ids), prefills them
with Full (`kvjax.prefill`) unpacked (right-padded to the longest prompt) and packed
(`packing=Packing(fit=...)`), and records per variant: the rows and positions computed, the fraction of
those that are padding, the first call's wall and process CPU seconds (compile included) and the medians of
`--repeats` more calls, their ratios to the unpacked baseline of the same run, and the largest difference
between the two states' held keys and values (beside the largest of them).

Usage: nice -n 19 python benchmarks/prepacking.py [--model smollm2-135m-instruct] [--count 32]
       [--min-len 100] [--max-len 1000] [--out benchmarks/results/prepacking_cpu.json]
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
from kvjax import inference
from kvjax.packing import Packing, pack
from timing import environment  # benchmarks/timing.py


def timed(fn, repeats: int) -> tuple[dict, object]:
    """Wall and process CPU seconds (all threads: the work done, less sensitive than wall time to other jobs on
    a shared CPU) of the first call and the medians of `repeats` more; and the last result."""
    walls, cpus = [], []
    for _ in range(1 + repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(fn())
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    times = dict(first_call_s=walls[0], first_call_cpu_s=cpus[0])
    if repeats:
        times.update(median_s=statistics.median(walls[1:]), median_cpu_s=statistics.median(cpus[1:]))
    return times, out


def held_difference(a: kvjax.KVState, b: kvjax.KVState) -> tuple[float, float]:
    """(largest |a - b|, largest |a|) over the keys and values both states hold (their pos must agree)."""
    worst = largest = 0.0
    for layer_a, layer_b in zip(a.layers, b.layers):
        for seg_a, seg_b in zip(layer_a, layer_b):
            pos = np.asarray(seg_a.pos)
            if not np.array_equal(pos, np.asarray(seg_b.pos)):
                raise AssertionError("packed and unpacked states hold different positions")
            held = (pos >= 0)[..., None]
            for x, y in ((seg_a.k, seg_b.k), (seg_a.v, seg_b.v)):
                worst = max(worst, float(np.abs(np.where(held, np.asarray(x) - np.asarray(y), 0)).max()))
                largest = max(largest, float(np.abs(np.where(held, np.asarray(x), 0)).max()))
    return worst, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after the first (compiling) one")
    parser.add_argument("--fits", nargs="+", default=["best"], choices=["best", "first"])
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. why the range is small)")
    parser.add_argument("--out", default="benchmarks/results/prepacking_cpu.json")
    args = parser.parse_args()

    m = kvjax.load(args.model, dtype=jnp.float32)
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_len, args.max_len + 1, args.count).astype(np.int32)
    prompts = [rng.integers(3, m.config.vocab_size, n).astype(np.int32) for n in lengths]
    real = int(lengths.sum())

    chunk, padded = inference._chunking(int(lengths.max()), inference.DEFAULT_CHUNK)
    times, baseline = timed(lambda: kvjax.prefill(m, prompts), args.repeats)
    rows = [
        dict(
            variant="unpacked",
            rows=args.count,
            row_width=padded,
            computed_positions=args.count * padded,
            padding_fraction=1 - real / (args.count * padded),
            **times,
        )
    ]
    for fit in args.fits:
        packing = Packing(fit=fit)
        plan = pack(lengths, packing)
        width = inference._chunking(plan.row_length, inference.DEFAULT_CHUNK)[1]
        times, state = timed(lambda packing=packing: kvjax.prefill(m, prompts, packing=packing), args.repeats)
        rows.append(
            dict(
                variant=f"packed (fit={fit})",
                rows=plan.num_rows,
                row_width=width,
                computed_positions=plan.num_rows * width,
                padding_fraction=plan.padded_tokens(width) / (plan.num_rows * width),
                **times,
                **dict(
                    zip(("max_abs_kv_difference_vs_unpacked", "max_abs_kv_unpacked"), held_difference(baseline, state))
                ),
            )
        )
        del state
    for row in rows:
        for key in [key for key in row if key.endswith("_s")]:
            row[key.removesuffix("_s") + "_ratio_to_unpacked"] = row[key] / rows[0][key]

    result = dict(
        benchmark="prepacking prefill",
        **environment(),
        model=args.model,
        dtype="float32",
        policy="Full()",
        prefill_chunk=chunk,
        count=args.count,
        length_range=[args.min_len, args.max_len],
        seed=args.seed,
        lengths=lengths.tolist(),
        real_tokens=real,
        repeats=args.repeats,
        note=args.note,
        results=rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
