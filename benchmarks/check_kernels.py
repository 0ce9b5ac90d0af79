"""Checks every compiled kernel lowering on this machine's accelerator against its jnp reference.

The test suite runs the kernels interpreted on CPU; this script runs them compiled (Triton and
Mosaic GPU on a GPU, Mosaic TPU on a TPU) on fresh random inputs at shapes that are not multiples
of the blocks, with ragged lengths, GQA groups, split decode and chunked prefill, and compares
each with the reference computed in float32 at the highest matmul precision on the same device:
error = ||out - ref|| / ||ref||, bf16 inputs pass under 1e-2, and a NaN never passes. Each check
is isolated (a failure is recorded with its error and the rest go on). `--groups` picks which
run, so that a kernel that hangs (a barrier deadlock) can be run under `timeout` in a process of
its own. Writes JSON with the device and one row per check.

    PYTHONPATH=. python benchmarks/check_kernels.py --groups triton mosaic_gpu --out checks.json
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.policies import Full, StreamingLLM
from pallas_kernels import block_masks as bm
from pallas_kernels import kv_quant
from pallas_kernels.block_sparse_decode import DecodeConfig, block_sparse_decode, block_sparse_decode_reference
from pallas_kernels.block_sparse_prefill import PrefillConfig, block_sparse_prefill, block_sparse_prefill_reference
from pallas_kernels.quantized_decode_attention import (
    decode_attention,
    decode_attention_reference,
    quantized_decode_attention,
    quantized_decode_attention_reference,
)

BF16_TOLERANCE = 1e-2
DUO = bm.PerHead((bm.DenseCausal(), bm.SinkLocal(64, 256)))  # per KV head: retrieval, streaming
PREFILL_MASKS = {"dense": bm.DenseCausal(), "sink64_local256": bm.SinkLocal(64, 256), "duo": DUO}

Check = tuple[str, Callable[[], tuple[float, float]]]  # name, () -> (error, tolerance)


def relative_error(out: jax.Array, ref: jax.Array) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def normal(key, shape) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)


def qkv(seed: int, q_shape, kv_shape) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fresh bf16 q [q_shape] and k, v [kv_shape] from one seed."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return normal(kq, q_shape), normal(kk, kv_shape), normal(kv, kv_shape)


def reference(fn: Callable, *arrays, **kwargs) -> jax.Array:
    """fn on float32 copies of the bf16 arrays, with float32 matmuls (no TF32)."""
    with jax.default_matmul_precision("highest"):
        return fn(*(x.astype(jnp.float32) for x in arrays), **kwargs)


def prefill_checks(implementation: str, seed: Iterator[int]) -> Iterator[Check]:
    """Whole-sequence and chunk-mode prefill over the masks, head dims and key blocks."""
    key_blocks = (64, 128)
    for head_dim in (64, 128):
        for block_k in key_blocks:
            for mask_name, mask in PREFILL_MASKS.items():

                def run(head_dim=head_dim, block_k=block_k, mask=mask, key=next(seed)):
                    batch, heads, kv_heads, seq_len = 2, 8, 2, 1000  # T not a multiple of a block
                    q, k, v = qkv(key, (batch, heads, seq_len, head_dim), (batch, kv_heads, seq_len, head_dim))
                    lengths = jnp.array([seq_len, 777], jnp.int32)
                    out = jax.jit(
                        lambda q, k, v: block_sparse_prefill(
                            q,
                            k,
                            v,
                            mask,
                            lengths=lengths,
                            config=PrefillConfig(128, block_k),
                            implementation=implementation,
                        )
                    )(q, k, v)
                    ref = reference(block_sparse_prefill_reference, q, k, v, mask=mask, lengths=lengths)
                    return relative_error(out, ref), BF16_TOLERANCE

                yield f"prefill d{head_dim} bk{block_k} {mask_name}", run

        for mask_name in ("dense", "sink64_local256"):

            def chunk(head_dim=head_dim, mask=PREFILL_MASKS[mask_name], key=next(seed)):
                batch, heads, kv_heads, chunk_len, capacity = 2, 8, 2, 256, 1024
                q, k, v = qkv(key, (batch, heads, chunk_len, head_dim), (batch, kv_heads, capacity, head_dim))
                offsets = jnp.array([640, 300], jnp.int32)
                lengths = offsets + chunk_len - jnp.array([0, 9], jnp.int32)  # a ragged last row
                out = jax.jit(
                    lambda q, k, v, offsets: block_sparse_prefill(
                        q,
                        k,
                        v,
                        mask,
                        lengths=lengths,
                        q_offset=offsets,
                        config=PrefillConfig(128, 128),
                        implementation=implementation,
                    )
                )(q, k, v, offsets)
                ref = reference(block_sparse_prefill_reference, q, k, v, mask=mask, lengths=lengths, q_offset=offsets)
                return relative_error(out, ref), BF16_TOLERANCE

            yield f"prefill chunk d{head_dim} {mask_name}", chunk


def decode_checks(implementation: str, seed: Iterator[int]) -> Iterator[Check]:
    """Top-k page tables, dense rows and streaming masks, split and unsplit, GQA 4 and 8."""
    for head_dim in (64, 128):
        for page in (64, 128):
            for group, num_splits in ((4, 1), (4, 4), (8, 3)):

                def run(head_dim=head_dim, page=page, group=group, num_splits=num_splits, key=next(seed)):
                    batch, kv_heads, capacity = 2, 4, 4096
                    q, k, v = qkv(key, (batch, kv_heads * group, head_dim), (batch, kv_heads, capacity, head_dim))
                    lengths = jnp.array([capacity, 2500], jnp.int32)
                    k_min, k_max = bm.page_key_bounds(k, lengths, block_size=page)
                    table = bm.decode_table_top_k_pages(q, k_min, k_max, lengths, top_k=7, block_size=page)
                    config = DecodeConfig(block_size=page, num_splits=num_splits)
                    out = jax.jit(
                        lambda q, k, v: block_sparse_decode(
                            q, k, v, lengths, table, config=config, implementation=implementation
                        )
                    )(q, k, v)
                    ref = reference(block_sparse_decode_reference, q, k, v, lengths=lengths, table=table)
                    return relative_error(out, ref), BF16_TOLERANCE

                yield f"decode top-k d{head_dim} page{page} g{group} splits{num_splits}", run

        def streaming(head_dim=head_dim, key=next(seed)):
            batch, kv_heads, group, capacity = 3, 4, 4, 2048
            q, k, v = qkv(key, (batch, kv_heads * group, head_dim), (batch, kv_heads, capacity, head_dim))
            lengths = jnp.array([2048, 1001, 200], jnp.int32)
            mask = bm.PerHead((bm.DenseCausal(), bm.SinkLocal(64, 256)) * 2)
            out = jax.jit(
                lambda q, k, v: block_sparse_decode(
                    q, k, v, lengths, mask=mask, config=DecodeConfig(128, num_splits=2), implementation=implementation
                )
            )(q, k, v)
            ref = reference(block_sparse_decode_reference, q, k, v, lengths=lengths, mask=mask)
            return relative_error(out, ref), BF16_TOLERANCE

        yield f"decode duo mask d{head_dim}", streaming

    if implementation == "gpu":  # slot masks: Triton only

        def slots(key=next(seed)):
            batch, kv_heads, group, capacity, head_dim = 2, 2, 4, 1024, 128
            q, k, v = qkv(key, (batch, kv_heads * group, head_dim), (batch, kv_heads, capacity, head_dim))
            lengths = jnp.array([1024, 700], jnp.int32)
            slot_mask = jax.random.bernoulli(
                jax.random.fold_in(jax.random.key(key), 1), 0.05, (batch, kv_heads, capacity)
            )
            table = bm.decode_table_from_slots(slot_mask, block_size=128)
            out = jax.jit(
                lambda q, k, v: block_sparse_decode(
                    q,
                    k,
                    v,
                    lengths,
                    table,
                    config=DecodeConfig(128, num_splits=2),
                    implementation="gpu",
                    slot_mask=slot_mask,
                )
            )(q, k, v)
            ref = reference(block_sparse_decode_reference, q, k, v, lengths=lengths, table=table, slot_mask=slot_mask)
            return relative_error(out, ref), BF16_TOLERANCE

        yield "decode slot mask d128", slots


def quantized_checks(seed: Iterator[int]) -> Iterator[Check]:
    """The plain and int4 / int2 decode kernels (the backend's lowering), 1 and 4 queries."""
    batch, heads, kv_heads, capacity, window, head_dim = 2, 32, 8, 4096, 128, 128
    for queries in (1, 4):

        def plain(queries=queries, key=next(seed)):
            q, k, v = qkv(key, (batch, queries, heads, head_dim), (batch, kv_heads, capacity, head_dim))
            lengths = jnp.array([capacity, 3001], jnp.int32)
            out = decode_attention(q, k, v, lengths)
            ref = reference(decode_attention_reference, q, k, v, lengths=lengths)
            return relative_error(out, ref), BF16_TOLERANCE

        yield f"decode plain cache q{queries}", plain
        for bits in (4, 2):

            def quantized(queries=queries, bits=bits, key=next(seed)):
                kq, kk, kv, kr, ks = jax.random.split(jax.random.key(key), 5)
                q = normal(kq, (batch, queries, heads, head_dim))
                k, v = (jax.random.normal(x, (batch, kv_heads, capacity, head_dim)) for x in (kk, kv))
                cache = kv_quant.quantize_kv(k, v, bits)
                k_res, v_res = (normal(x, (batch, kv_heads, window, head_dim)) for x in (kr, ks))
                lengths = jnp.array([capacity, 2048], jnp.int32)
                res_lengths = jnp.array([window, 77], jnp.int32)
                out = quantized_decode_attention(q, cache, lengths, k_res, v_res, res_lengths)
                with jax.default_matmul_precision("highest"):
                    ref = quantized_decode_attention_reference(
                        q.astype(jnp.float32),
                        cache,
                        lengths,
                        k_res.astype(jnp.float32),
                        v_res.astype(jnp.float32),
                        res_lengths,
                    )
                return relative_error(out, ref), BF16_TOLERANCE

            yield f"decode int{bits} slab + window q{queries}", quantized


def kvjax_checks() -> Iterator[Check]:
    """kvjax's dispatch ("auto": the kernels) against attention_impl="reference": on the bundled
    model (loaded on the device, float32 weights so the two differ by rounding only), the logits of
    a decode step after a chunked prefill; and `attend` itself at Llama-3.1-8B's head shapes."""

    def run(policy):
        m = kvjax.load("needle-llama", dtype=jnp.float32)
        prompts = jax.random.randint(jax.random.key(5), (2, 3000), 0, m.config.vocab_size)
        lengths = np.array([3000, 2222], np.int32)

        def last_logits(impl):
            state = kvjax.prefill(m, prompts, policy, lengths=lengths, max_new_tokens=4, attention_impl=impl)
            logits, _ = kvjax.decode_step(m, state, prompts[:, 0], policy, attention_impl=impl)
            return logits

        with jax.default_matmul_precision("highest"):
            ref = last_logits("reference")
        return relative_error(last_logits("auto"), ref), 2e-3

    for name, policy in (("full", Full()), ("streaming sink4 window252", StreamingLLM(4, 252))):
        yield f"kvjax prefill + decode step {name}", lambda policy=policy: run(policy)

    def dispatch(chunk_len, key):
        """`attend` at Llama-3.1-8B's head shapes in bf16 (where Hopper takes Mosaic GPU) over a
        slot = position cache: a prefill chunk at an offset, or one decode token."""
        batch, kv_heads, group, head_dim, capacity = 2, 8, 4, 128, 2048
        q, k, v = qkv(key, (batch, chunk_len, kv_heads, group, head_dim), (batch, kv_heads, capacity, head_dim))
        ends = jnp.array([1536, 1100], jnp.int32)  # each row's keys end where its chunk does
        slots = jnp.arange(capacity, dtype=jnp.int32)
        k_pos = jnp.broadcast_to(jnp.where(slots < ends[:, None], slots, -1)[:, None], (batch, kv_heads, capacity))
        q_pos = (ends - chunk_len)[:, None] + jnp.arange(chunk_len, dtype=jnp.int32)  # [B, T]

        def run_impl(impl):
            return jax.jit(
                lambda q, k, v: kvjax.attention.attend(
                    q, k, v, k_pos, q_pos, None, head_dim**-0.5, impl, slot_is_position=True
                )
            )(q, k, v)

        with jax.default_matmul_precision("highest"):
            ref = jax.jit(
                lambda q, k, v: kvjax.attention.attend(q, k, v, k_pos, q_pos, None, head_dim**-0.5, "reference")
            )(*(x.astype(jnp.float32) for x in (q, k, v)))
        return relative_error(run_impl("auto"), ref), BF16_TOLERANCE

    yield "kvjax attend d128 bf16 prefill chunk 512", lambda: dispatch(512, 11)
    yield "kvjax attend d128 bf16 decode token", lambda: dispatch(1, 12)


def checks(group: str) -> Iterator[Check]:
    seed = iter(range(10_000))
    if group == "triton":
        yield from prefill_checks("gpu", seed)
        yield from decode_checks("gpu", seed)
    elif group == "mosaic_gpu":
        yield from prefill_checks("mosaic_gpu", seed)
        yield from decode_checks("mosaic_gpu", seed)
    elif group == "tpu":
        yield from prefill_checks("tpu", seed)
        yield from decode_checks("tpu", seed)
    elif group == "quantized":
        yield from quantized_checks(seed)
    elif group == "kvjax":
        yield from kvjax_checks()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--groups", nargs="+", required=True, choices=("triton", "mosaic_gpu", "tpu", "quantized", "kvjax")
    )
    parser.add_argument("--out", type=Path, default=Path("check_kernels.json"))
    args = parser.parse_args(argv)
    if jax.default_backend() == "cpu":
        parser.error("no accelerator: the test suite checks the kernels interpreted on CPU")
    rows = []
    for group in args.groups:
        for name, run in checks(group):
            start = time.perf_counter()
            row = {"group": group, "check": name}
            try:
                error, tolerance = run()
                row.update(error=error, tolerance=tolerance, passed=bool(error < tolerance))
            except Exception as e:  # recorded, and the other checks go on
                row.update(
                    passed=False, failure=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:]
                )
            row["seconds"] = round(time.perf_counter() - start, 2)
            rows.append(row)
            status = "ok  " if row["passed"] else "FAIL"
            detail = f"{row['error']:.2e}" if "error" in row else row["failure"].splitlines()[0][:150]
            print(f"{status} {group:10s} {name:45s} {detail}", flush=True)
    report = {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "passed": sum(r["passed"] for r in rows),
        "failed": sum(not r["passed"] for r in rows),
        "checks": rows,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{report['passed']} passed, {report['failed']} failed; wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
