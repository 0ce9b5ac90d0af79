"""Decode tokens/s of a Llama-3.1-8B-shaped model (random bf16 weights) against the HBM roofline, and
Quest's and Twilight's page-selecting decode and PromptSVD's low-rank cache against Full's in the same run.

Roofline time per token = (weight bytes read + KV bytes read) / bandwidth (3.1 TB/s by default, an
H100's; see results/kernel_notes.md). Quest(budget) reads budget tokens per KV head in its sparse layers, so
its speedup over Full grows with the context. Twilight(budget) estimates attention over those candidates
from 4-bit keys and reads only the pages covering top_p of it; the cache here holds random keys, whose
attention is diffuse, so it keeps most candidates: its row times the estimate's overhead at its worst.
PromptSVD(density) holds density x the channels per token but rebuilds every key and value each step: its row
shows what that arithmetic costs against the bytes it saves. SqueezedAttention(keep) clusters the random
context keys once (k-means in finalize, not timed) and each step reads the 16-slot pages holding the keys
of the clusters its centroids select (`--squeezed-hierarchical` also times the authors' two-level lookup).
Writes JSON with the device, shapes, times and ratios.
Usage: python benchmarks/bench_decode.py [--contexts 8192 32768] [--quest-budgets 1024] [--twilight-budgets 8192]
       [--prompt-svd-densities 0.5] [--squeezed-keeps 0.1] [--squeezed-hierarchical] [--profile-top N] [--scan-layers]
       [--smoke] [--out FILE]
`--profile-top N` also traces one more decode loop per row under the profiler and adds the N operations
and kernel kinds that take a token's device time (`op_profile.py`) as the row's "device_ops".
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.config import ModelConfig
from kvjax.inference import greedy_decode
from kvjax.kv_state import KVSegment
from kvjax.policies import Full, Policy, PromptSVD, Quest, SqueezedAttention, Twilight
from model_shapes import LLAMA31_8B
from op_profile import profile_ops

SMOKE = ModelConfig(
    family="llama",
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
)


@functools.partial(jax.jit, static_argnums=range(6))
def filled_state(
    config: ModelConfig, batch: int, context: int, room: int, dtype, policy: Policy = Full()
) -> kvjax.KVState:
    """The decode state of a policy that prefills in the Full layout (Full, Quest, Twilight, PromptSVD, Squeezed
    Attention), from `context` random entries per sequence (and random calibration queries for Squeezed
    Attention): no prefill is needed to time decode. Jitted, so every leaf is its own buffer (Squeezed
    Attention's finalize shares one threshold array between layers; a donating decode must not see it twice)."""
    state = policy.allocate(config, batch, context, room, context, dtype)

    def fill(seg, layer):
        k1, k2 = jax.random.split(jax.random.key(layer))
        if not isinstance(seg, KVSegment):  # Squeezed Attention's recorded queries, scaled by 1/sqrt(D)
            return seg.replace(q=jax.random.normal(k1, seg.q.shape, jnp.float32) * config.head_dim**-0.5)
        shape = seg.k.shape
        used = jnp.arange(shape[2]) < context
        pos = jnp.where(used, jnp.arange(shape[2]), -1).astype(jnp.int32)
        return seg.replace(
            k=jax.random.normal(k1, shape, dtype),
            v=jax.random.normal(k2, shape, dtype),
            pos=jnp.broadcast_to(pos, shape[:3]),
        )

    layers = tuple(tuple(fill(seg, i) for seg in layer) for i, layer in enumerate(state.layers))
    state = state.replace(layers=layers, length=jnp.full((batch,), context, jnp.int32))
    return policy.finalize(config, state, context, room)


def held_bytes(config: ModelConfig, batch: int, context: int, room: int, dtype, policy: Policy = Full()) -> int:
    """`kvjax.kv_bytes` of `filled_state` from abstract shapes: nothing is allocated for the count."""
    return kvjax.kv_bytes(jax.eval_shape(lambda: filled_state(config, batch, context, room, dtype, policy)))


def weight_bytes_per_token(m: kvjax.LanguageModel) -> int:
    """Bytes of parameters a decode step reads: all but the embedding table (one row is gathered)."""
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(m.params))
    embed = m.params["embed"][...]
    return int(total - (0 if m.config.tie_word_embeddings else embed.size * embed.dtype.itemsize))


def time_decode(
    m, batch: int, context: int, steps: int, repeats: int, policy: Policy = Full(), scan_layers: bool = False
) -> float:
    """Median seconds per decoded token of generate's jitted while_loop decode; layers unrolled unless
    `scan_layers` (kvjax.inference.Execution)."""
    times = []
    for r in range(repeats + 1):  # the first run compiles
        state = jax.block_until_ready(filled_state(m.config, batch, context, steps, m.dtype, policy))
        start = time.perf_counter()
        jax.block_until_ready(
            greedy_decode(m, state, np.ones((batch,), np.int32), steps, policy, scan_layers=scan_layers)
        )
        if r:
            times.append((time.perf_counter() - start) / steps)
    return float(np.median(times))


def profile_decode(
    m, batch: int, context: int, steps: int, top: int, policy: Policy = Full(), scan_layers: bool = False
) -> dict:
    """`op_profile.profile_ops` of one decode loop of `steps` tokens (compiled by `time_decode` at these
    shapes): which kernels and fusions a token's time goes to."""
    state = jax.block_until_ready(filled_state(m.config, batch, context, steps, m.dtype, policy))
    run = functools.partial(
        greedy_decode, m, state, np.ones((batch,), np.int32), steps, policy, scan_layers=scan_layers
    )
    return profile_ops(run, steps, top, module="jit__decode")  # the loop, not the eager checks before it


def label(policy: Policy) -> str:
    """The policy with its hyperparameters, as a result row names it."""
    fields = (f for f in dataclasses.fields(policy) if f.repr)  # its hyperparameters, not learned `params`
    return f"{type(policy).__name__}({', '.join(f'{f.name}={getattr(policy, f.name)}' for f in fields)})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--quest-budgets",
        type=int,
        nargs="*",
        default=[1024],
        help="Quest token budgets to time against Full (none: Full only)",
    )
    parser.add_argument(
        "--twilight-budgets",
        type=int,
        nargs="*",
        default=[],
        help="Twilight candidate budgets (top_p 0.85) to time against Full",
    )
    parser.add_argument(
        "--prompt-svd-densities",
        type=float,
        nargs="*",
        default=[],
        help="PromptSVD key and value densities to time against Full",
    )
    parser.add_argument(
        "--squeezed-keeps",
        type=float,
        nargs="*",
        default=[],
        help="Squeezed Attention keep shares (5%% clusters) to time against Full",
    )
    parser.add_argument(
        "--squeezed-hierarchical",
        action="store_true",
        help="time each Squeezed Attention keep with the hierarchical lookup too",
    )
    parser.add_argument(
        "--profile-top",
        type=int,
        default=0,
        help="add each row's N costliest device operations per token (0: no profile)",
    )
    parser.add_argument(
        "--scan-layers",
        action="store_true",
        help="decode with runs of layers under one lax.scan (default: unrolled, kvjax's fastest "
        "decode where memory bandwidth rules; kvjax.inference.Execution)",
    )
    parser.add_argument("--bandwidth", type=float, default=3.1e12, help="bytes/s of HBM (H100: 3.1e12)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and contexts (CPU check only)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.profile_top < 0:
        parser.error(f"--profile-top must be 0 (no profile) or more, got {args.profile_top}")
    config = SMOKE if args.smoke else LLAMA31_8B
    contexts = [256, 512] if args.smoke else args.contexts
    sparse = (
        [Quest(budget_tokens=b) for b in ([64] if args.smoke else args.quest_budgets)]
        + [Twilight(budget_tokens=b) for b in ([64] if args.smoke else args.twilight_budgets)]
        + [PromptSVD(d, d) for d in ([0.5] if args.smoke else args.prompt_svd_densities)]
        + [
            SqueezedAttention(keep=k, hierarchical=h)
            for k in ([0.1] if args.smoke else args.squeezed_keeps)
            for h in ((False, True) if args.smoke or args.squeezed_hierarchical else (False,))
        ]
    )
    m = kvjax.init_model(config, seed=0, dtype=jnp.bfloat16)
    w_bytes = weight_bytes_per_token(m)
    rows = []

    def profiled(row: dict, policy: Policy) -> dict:
        if not args.profile_top:
            return row
        try:
            row["device_ops"] = profile_decode(
                m, args.batch, row["context"], args.steps, args.profile_top, policy, args.scan_layers
            )
        except RuntimeError as error:  # a trace without operations (no CUPTI, say): keep the timings
            row["device_ops"] = {"error": str(error)}
            print(f"    no profile: {error}")
            return row
        for kind in row["device_ops"]["kinds"][:5]:
            print(f"    {kind['us_per_step']:10.1f} us/token {kind['share']:6.1%}  {kind['kind']}")
        return row

    for context in contexts:
        per_token = time_decode(m, args.batch, context, args.steps, args.repeats, scan_layers=args.scan_layers)
        kv_read = held_bytes(config, args.batch, context, args.steps, m.dtype)
        floor = (w_bytes + kv_read) / args.bandwidth
        print(f"context {context:>6}: {args.batch / per_token:8.1f} tok/s, {floor / per_token:6.1%} of roofline")
        rows.append(
            profiled(
                {
                    "policy": "Full",
                    "context": context,
                    "batch": args.batch,
                    "seconds_per_token": per_token,
                    "tokens_per_second": args.batch / per_token,
                    "weight_bytes": w_bytes,
                    "kv_bytes": kv_read,
                    "roofline_seconds_per_token": floor,
                    "fraction_of_roofline": floor / per_token,
                },
                Full(),
            )
        )
        for policy in sparse:
            sparse_per_token = time_decode(m, args.batch, context, args.steps, args.repeats, policy, args.scan_layers)
            print(
                f"context {context:>6}: {label(policy)} {args.batch / sparse_per_token:8.1f} tok/s, "
                f"{per_token / sparse_per_token:5.2f}x Full"
            )
            rows.append(
                profiled(
                    {
                        "policy": label(policy),
                        "context": context,
                        "batch": args.batch,
                        "seconds_per_token": sparse_per_token,
                        "tokens_per_second": args.batch / sparse_per_token,
                        "kv_bytes": held_bytes(config, args.batch, context, args.steps, m.dtype, policy),
                        "speedup_vs_full": per_token / sparse_per_token,
                    },
                    policy,
                )
            )
    report = {
        "benchmark": "decode",
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "model": "smoke" if args.smoke else "llama-3.1-8b-shaped",
        "dtype": "bfloat16",
        "bandwidth_bytes_per_s": args.bandwidth,
        "steps": args.steps,
        "scan_layers": args.scan_layers,
        "results": rows,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
