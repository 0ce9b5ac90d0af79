"""Benchmark the block-sparse prefill and decode kernels against XLA and cuDNN attention.

Measures, on the default device (numbers only mean something on a GPU or TPU):
  * full causal prefill: kernel vs cuDNN (and XLA where its T x T scores fit in memory);
  * DuoAttention prefill, half the KV heads streaming (sink 64, recent 256): kernel vs full
    causal cuDNN on every head, and vs cuDNN split by head group (full causal for retrieval
    heads, a sink+recent-sized local window for streaming heads), the honest baseline;
  * decode visiting 10% of the cache pages (Quest-style top-k): kernel vs full-cache XLA and
    cuDNN decode; reported with and without the page selection itself, each timed twice: calls
    chained on device in one executable (as kvjax's jitted decode loop runs them) and calls
    dispatched back to back from Python (bounded below by the host's dispatch);
  * chunked prefill attention as `kvjax.prefill` dispatches it (`kvjax.attention.attend` over a
    slot = position cache, one chunk after another in a `lax.scan`): the prefill kernel in chunk
    mode vs the jnp reference dispatch, and vs one-shot full causal cuDNN as a bound.
Ratios are baseline time / kernel time measured in the same run (> 1: the kernel is faster).

    pip install --no-deps -e .   # or run with PYTHONPATH=. from the repository root
    python benchmarks/bench_block_sparse.py --out bench_block_sparse.json
    python benchmarks/bench_block_sparse.py --smoke   # tiny shapes, CPU, kernels interpreted

The decode row "with_selection" includes the top-k over page bounds but not the bounds
themselves, which a serving cache maintains incrementally as tokens are appended.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from kvjax.attention import attend
from pallas_kernels import block_masks as bm
from pallas_kernels.block_sparse_decode import DecodeConfig, block_sparse_decode, block_sparse_decode_reference
from pallas_kernels.block_sparse_prefill import PrefillConfig, block_sparse_prefill, block_sparse_prefill_reference
from timing import chained_seconds, median_seconds  # benchmarks/timing.py


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Problem sizes of one benchmark run."""

    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    lengths: tuple[int, ...]
    dtype: str
    sink: int
    recent: int
    decode_page: int
    decode_fraction: float


FULL = Shapes(
    batch=1,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    lengths=(8192, 32768, 131072),
    dtype="bfloat16",
    sink=64,
    recent=256,
    decode_page=64,
    decode_fraction=0.1,
)
SECTIONS = ("prefill", "decode", "chunked")
REFERENCE_MAX_LEN = 8192  # DuoAttention prefill checked against the dense reference up to here
SMOKE = Shapes(
    batch=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    lengths=(100,),
    dtype="bfloat16",
    sink=4,
    recent=16,
    decode_page=16,
    decode_fraction=0.25,
)


def try_time(timer: Callable, fn: Callable, *args, **kwargs) -> float | str:
    """timer(fn, *args, **kwargs) in seconds, or the reason the call failed (no cuDNN on this
    device, out of memory, ...)."""
    try:
        return timer(fn, *args, **kwargs)
    except Exception as e:  # a baseline that cannot run here is reported, not fatal
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def summarize(name: str, seq_len: int, kernel: float, baselines: dict[str, float | str], **extra) -> dict:
    """One result row: times in ms and speedups against every baseline that ran."""
    ok = {k: v for k, v in baselines.items() if isinstance(v, float)}
    row = {
        "name": name,
        "seq_len": seq_len,
        "kernel_ms": kernel * 1e3,
        "baselines_ms": {k: (v * 1e3 if isinstance(v, float) else v) for k, v in baselines.items()},
        "speedup": {k: v / kernel for k, v in ok.items()},
        **extra,
    }
    print(json.dumps(row), flush=True)
    return row


def cudnn_or_xla(implementation: str, **kwargs) -> Callable:
    """jax.nn.dot_product_attention in [B, T, N, D] layout with a fixed implementation."""
    return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=implementation, **kwargs))


def bench_prefill(shapes: Shapes, seq_len: int, kernel_kwargs: dict, repeats: int) -> list[dict]:
    batch, heads, kv_heads, dim = (shapes.batch, shapes.num_heads, shapes.num_kv_heads, shapes.head_dim)
    dtype = jnp.dtype(shapes.dtype)
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (batch, heads, seq_len, dim), dtype)  # [B, H, T, D]
    k = jax.random.normal(kk, (batch, kv_heads, seq_len, dim), dtype)  # [B, Hkv, T, D]
    v = jax.random.normal(kv, (batch, kv_heads, seq_len, dim), dtype)
    q_t, k_t, v_t = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, T, N, D] for jax.nn

    full_baselines = {
        impl: try_time(median_seconds, cudnn_or_xla(impl, is_causal=True), q_t, k_t, v_t, repeats=repeats)
        for impl in ("cudnn", "xla")
    }
    dense = jax.jit(lambda q, k, v: block_sparse_prefill(q, k, v, bm.DenseCausal(), **kernel_kwargs))
    agreement = {}  # same computation: the kernel must agree with the baselines that ran
    for impl, seconds in full_baselines.items():
        if isinstance(seconds, float):
            expected = cudnn_or_xla(impl, is_causal=True)(q_t, k_t, v_t).transpose(0, 2, 1, 3)
            diff = jnp.abs(dense(q, k, v).astype(jnp.float32) - expected.astype(jnp.float32))
            agreement[f"max_abs_diff_vs_{impl}"] = float(diff.max())
    rows = [
        summarize(
            "prefill_full_causal", seq_len, median_seconds(dense, q, k, v, repeats=repeats), full_baselines, **agreement
        )
    ]

    # DuoAttention: first half of the KV heads retrieval (dense), second half streaming.
    streaming = bm.SinkLocal(shapes.sink, shapes.recent)
    half = kv_heads // 2
    duo = bm.PerHead((bm.DenseCausal(),) * half + (streaming,) * (kv_heads - half))
    duo_kernel = jax.jit(lambda q, k, v: block_sparse_prefill(q, k, v, duo, **kernel_kwargs))
    window = shapes.sink + shapes.recent  # cuDNN has no sink: a window of the same size

    def split_by_group(implementation):
        full = cudnn_or_xla(implementation, is_causal=True)
        local = cudnn_or_xla(implementation, is_causal=True, local_window_size=(window - 1, 0))
        g_half = heads // 2
        return jax.jit(
            lambda q, k, v: jnp.concatenate(
                [
                    full(q[:, :, :g_half], k[:, :, :half], v[:, :, :half]),
                    local(q[:, :, g_half:], k[:, :, half:], v[:, :, half:]),
                ],
                axis=2,
            )
        )

    duo_baselines = dict(full_baselines)
    for impl in ("cudnn", "xla"):
        duo_baselines[f"{impl}_split_by_head_group"] = try_time(
            median_seconds, split_by_group(impl), q_t, k_t, v_t, repeats=repeats
        )
    duo_agreement = {}
    if seq_len <= REFERENCE_MAX_LEN:  # the dense reference holds H x T x T float32 scores
        diff = jnp.abs(
            duo_kernel(q, k, v).astype(jnp.float32) - block_sparse_prefill_reference(q, k, v, duo).astype(jnp.float32)
        )
        duo_agreement["max_abs_diff_vs_reference"] = float(diff.max())
    rows.append(
        summarize(
            "prefill_duo_attention_50pct_streaming",
            seq_len,
            median_seconds(duo_kernel, q, k, v, repeats=repeats),
            duo_baselines,
            sink=shapes.sink,
            recent=shapes.recent,
            **duo_agreement,
        )
    )
    return rows


def bench_decode(
    shapes: Shapes,
    seq_len: int,
    kernel_kwargs: dict,
    page: int,
    num_splits: int | None,
    num_stages: int,
    num_warps: int,
    repeats: int,
    inner: int,
) -> list[dict]:
    batch, heads, kv_heads, dim = (shapes.batch, shapes.num_heads, shapes.num_kv_heads, shapes.head_dim)
    dtype = jnp.dtype(shapes.dtype)
    capacity = -(-seq_len // page) * page  # whole pages; the last one may be partly filled
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (batch, heads, dim), dtype)  # [B, H, D]
    k = jax.random.normal(kk, (batch, kv_heads, capacity, dim), dtype)  # [B, Hkv, C, D]
    v = jax.random.normal(kv, (batch, kv_heads, capacity, dim), dtype)
    lengths = jnp.full((batch,), seq_len, jnp.int32)
    top_k = max(1, round(shapes.decode_fraction * capacity / page))
    k_min, k_max = jax.jit(lambda k: bm.page_key_bounds(k, lengths, block_size=page))(k)

    config = DecodeConfig(block_size=page, num_splits=num_splits, num_stages=num_stages, num_warps=num_warps)
    select = jax.jit(
        lambda q, k_min, k_max: bm.decode_table_top_k_pages(q, k_min, k_max, lengths, top_k=top_k, block_size=page)
    )
    table = select(q, k_min, k_max)
    kernel = jax.jit(
        lambda q, k, v, table: block_sparse_decode(q, k, v, lengths, table, config=config, **kernel_kwargs)
    )
    select_and_kernel = jax.jit(
        lambda q, k, v, k_min, k_max: block_sparse_decode(
            q,
            k,
            v,
            lengths,
            bm.decode_table_top_k_pages(q, k_min, k_max, lengths, top_k=top_k, block_size=page),
            config=config,
            **kernel_kwargs,
        )
    )

    group = heads // kv_heads

    @jax.jit
    def xla_decode(q, k, v):  # full cache, plain einsums
        qg = q.reshape(batch, kv_heads, group, dim)  # [B, Hkv, g, D]
        s = jnp.einsum("bhgd,bhcd->bhgc", qg, k, preferred_element_type=jnp.float32)
        s = jnp.where(jnp.arange(capacity) < seq_len, s * dim**-0.5, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)  # [B, Hkv, g, C]
        out = jnp.einsum("bhgc,bhcd->bhgd", p.astype(v.dtype), v)  # [B, Hkv, g, D]
        return out.reshape(batch, heads, dim)

    q_t = q[:, None]  # [B, 1, H, D]
    k_t, v_t = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, C, Hkv, D]
    # name: (function, arguments); each function's output has its first argument's shape.
    measured = {
        "decode_top_k_pages_kernel_only": (kernel, (q, k, v, table)),
        "decode_top_k_pages_with_selection": (select_and_kernel, (q, k, v, k_min, k_max)),
    }
    baseline_calls = {
        "xla_full_cache": (xla_decode, (q, k, v)),
        "cudnn_full_cache": (cudnn_or_xla("cudnn", key_value_seq_lengths=lengths), (q_t, k_t, v_t)),
    }
    diff = jnp.abs(
        kernel(q, k, v, table).astype(jnp.float32)
        - block_sparse_decode_reference(q, k, v, lengths, table).astype(jnp.float32)
    )
    extra = dict(
        page=page,
        pages_visited=top_k,
        pages_total=capacity // page,
        num_splits=num_splits or "auto",
        num_stages=num_stages,
        num_warps=num_warps,
        calls_per_sample=inner,
        max_abs_diff_vs_reference=float(diff.max()),
    )
    rows, kw = [], dict(repeats=repeats, inner=inner)
    # Chained on device (as generate's loop runs), then dispatched back to back by the host.
    for timing, timer in (("chained", chained_seconds), ("dispatched", median_seconds)):
        baselines = {name: try_time(timer, fn, *a, **kw) for name, (fn, a) in baseline_calls.items()}
        for name, (fn, a) in measured.items():
            rows.append(summarize(name, seq_len, timer(fn, *a, **kw), baselines, timing=timing, **extra))
    return rows


def bench_chunked_prefill(shapes: Shapes, seq_len: int, chunk: int, kernel_impl: str, repeats: int) -> list[dict]:
    """Attention of a whole prompt, chunk by chunk, through kvjax's dispatch (`attend` with
    slot_is_position=True, what Full's prefill calls) at kernel_impl and at "reference"."""
    batch, heads, kv_heads, dim = (shapes.batch, shapes.num_heads, shapes.num_kv_heads, shapes.head_dim)
    group, dtype = heads // kv_heads, jnp.dtype(shapes.dtype)
    num_chunks = -(-seq_len // chunk)
    capacity = -(-num_chunks * chunk // 128) * 128  # as kvjax rounds a Full cache; 128-blocks here
    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(kq, (num_chunks, batch, chunk, kv_heads, group, dim), dtype)  # [N, B, S, K, G, D]
    k = jax.random.normal(kk, (batch, kv_heads, capacity, dim), dtype)  # [B, K, C, D] slot = position
    v = jax.random.normal(kv, (batch, kv_heads, capacity, dim), dtype)
    slots = jnp.arange(capacity, dtype=jnp.int32)

    def prompt_attention(impl: str) -> Callable:
        def step(carry, inputs):
            q_chunk, start = inputs  # [B, S, K, G, D], scalar
            q_pos = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))
            written = jnp.where(slots < jnp.minimum(start + chunk, seq_len), slots, -1)  # [C]
            k_pos = jnp.broadcast_to(written, (batch, kv_heads, capacity))  # [B, K, C]
            out = attend(q_chunk, k, v, k_pos, q_pos, None, dim**-0.5, impl, slot_is_position=True)
            return carry, out

        starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk
        return jax.jit(lambda q: jax.lax.scan(step, None, (q, starts))[1])  # [N, B, S, K, G, D]

    kernel = prompt_attention(kernel_impl)
    reference = prompt_attention("reference")
    q_t = q.transpose(1, 0, 2, 3, 4, 5).reshape(batch, num_chunks * chunk, heads, dim)[:, :seq_len]
    k_t, v_t = (x.transpose(0, 2, 1, 3)[:, :seq_len] for x in (k, v))  # [B, T, Hkv, D]
    baselines = {
        "reference_dispatch": try_time(median_seconds, reference, q, repeats=repeats),
        "cudnn_one_shot_full_causal": try_time(
            median_seconds, cudnn_or_xla("cudnn", is_causal=True), q_t, k_t, v_t, repeats=repeats
        ),
    }
    extra = dict(chunk=chunk, num_chunks=num_chunks, capacity=capacity, impl=kernel_impl)
    if isinstance(baselines["reference_dispatch"], float):  # both ran: they must agree
        diff = jnp.abs(kernel(q).astype(jnp.float32) - reference(q).astype(jnp.float32))
        # Rows past the prompt are padding: the kernel zeroes them, the reference attends them.
        real = jnp.arange(num_chunks)[:, None] * chunk + jnp.arange(chunk) < seq_len  # [N, S]
        extra["max_abs_diff_vs_reference"] = float(jnp.where(real[:, None, :, None, None, None], diff, 0.0).max())
    return [
        summarize(
            "chunked_prefill_dispatch_full_causal",
            seq_len,
            median_seconds(kernel, q, repeats=repeats),
            baselines,
            **extra,
        )
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes; on CPU the kernels run interpreted (proves it runs)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_block_sparse.json"))
    parser.add_argument("--lengths", type=int, nargs="*", help="override sequence lengths")
    parser.add_argument("--batch", type=int, help="override the batch size")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-k", type=int, default=128)
    parser.add_argument(
        "--num-splits",
        type=int,
        nargs="+",
        help="decode splits per (sequence, KV head); several: one row each "
        "(default: the kernel's pick, two programs per SM)",
    )
    parser.add_argument("--pages", type=int, nargs="+", help="decode page sizes; several: one row each (default: 64)")
    parser.add_argument(
        "--decode-inner",
        type=int,
        default=20,
        help="decode calls per timing sample, chained on device in one "
        "executable (rows timing=chained) or dispatched back to back by "
        "the host (timing=dispatched)",
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--num-stages", type=int, default=2, help="K/V blocks in flight (Triton pipelining; Mosaic GPU stage ring)"
    )
    parser.add_argument(
        "--num-warps", type=int, default=None, help="Triton: warps per program (default: each kernel config's own)"
    )
    parser.add_argument("--chunk", type=int, default=512, help="kvjax prefill chunk (dispatch row)")
    parser.add_argument(
        "--implementation",
        choices=("auto", "tpu", "gpu", "mosaic_gpu"),
        default="auto",
        help="force a lowering (default: from jax.default_backend()); "
        "mosaic_gpu: the Hopper kernels (prefill block_q 128)",
    )
    args = parser.parse_args(argv)

    shapes = SMOKE if args.smoke else FULL
    if args.lengths:
        shapes = dataclasses.replace(shapes, lengths=tuple(args.lengths))
    if args.batch:
        shapes = dataclasses.replace(shapes, batch=args.batch)
    backend = jax.default_backend()
    interpret = backend == "cpu"
    if interpret and not args.smoke:
        parser.error("no accelerator: only --smoke runs on CPU (kernels interpreted)")
    repeats = 1 if args.smoke else args.repeats
    mosaic = args.implementation == "mosaic_gpu"
    if mosaic and interpret:
        parser.error(
            "the Mosaic GPU kernels need a GPU here (JAX's GPU interpreter runs them "
            "only as the tests extend it: tests/mosaic_gpu_interpreter.py)"
        )
    blocks = (16, 16) if args.smoke else (args.block_q, args.block_k)
    kernel_kwargs = dict(implementation=args.implementation, interpret=interpret)
    prefill_kwargs = dict(
        kernel_kwargs,
        config=PrefillConfig(*blocks, num_warps=args.num_warps or PrefillConfig.num_warps, num_stages=args.num_stages),
    )
    # kvjax's attention_impl for the dispatch row (the kernels' names): the lowering asked for on an
    # accelerator ("auto": the kernel's own pick, Mosaic GPU prefill on Hopper where it fits, else
    # Triton), an interpreter on CPU (the TPU one unless --implementation gpu).
    dispatch_impl = args.implementation
    if interpret:
        dispatch_impl = f"{'tpu' if args.implementation == 'auto' else args.implementation}-interpret"
    chunk = 32 if args.smoke else args.chunk

    inner = 1 if args.smoke else args.decode_inner
    results = []
    for seq_len in shapes.lengths:
        if "prefill" in args.sections:
            results += bench_prefill(shapes, seq_len, prefill_kwargs, repeats)
        if "decode" in args.sections:
            for page, num_splits in itertools.product(args.pages or [shapes.decode_page], args.num_splits or [None]):
                results += bench_decode(
                    shapes,
                    seq_len,
                    kernel_kwargs,
                    page,
                    num_splits,
                    args.num_stages,
                    args.num_warps or DecodeConfig.num_warps,
                    repeats,
                    inner,
                )
        if "chunked" in args.sections:
            results += bench_chunked_prefill(shapes, seq_len, chunk, dispatch_impl, repeats)
    report = {
        "device": jax.devices()[0].device_kind,
        "backend": backend,
        "jax_version": jax.__version__,
        "smoke": args.smoke,
        "interpreted": interpret,
        "note": (
            "interpreted on CPU: times are meaningless"
            if interpret
            else "median wall time after warm-up; speedup = baseline / kernel, same run"
        ),
        "shapes": dataclasses.asdict(shapes),
        "kernel_implementation": (
            args.implementation
            if args.implementation != "auto"
            else "tpu"
            if interpret
            else f"{backend}: the kernels' default"
        ),
        "prefill_blocks": list(blocks),
        "num_stages": args.num_stages,
        "num_warps": args.num_warps or "each config's default",
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
