"""Decode attention over int4 / int2 / bf16 caches vs XLA (and cuDNN) attention on the bf16 cache.

On a GPU or a TPU: batch 1/8/32 x context 8K/32K/128K, 32 query / 8 KV heads, head dim 128. For
each shape it times the quantized kernel (int4, int2; slab of `context` tokens plus a full
128-token bf16 window), the plain bf16 kernel, and `jax.nn.dot_product_attention` (XLA, and
cuDNN on a GPU) on the bf16 cache of the same context, all in the same run; reports median
times per call of `--inner` calls chained on device in one executable (as kvjax's decode loop
runs; `dispatched_median_us`: the same calls dispatched back to back from Python, which the
host's dispatch bounds from below), bytes read / time as a fraction of `--bandwidth`, and each
kernel's time over the faster baseline. The kernel is the backend's lowering (Triton on GPU,
Mosaic TPU on TPU). Writes JSON.
`--smoke` runs tiny shapes on any backend (off GPU and TPU the kernel is interpreted: the GPU
one, or the TPU one with `--implementation tpu`) to check the script itself; its times mean nothing.

  python benchmarks/bench_quantized_decode.py --out bench_quantized_decode.json
  python benchmarks/bench_quantized_decode.py --bandwidth 8.19e11 --out tpu.json  # TPU v5e
  python benchmarks/bench_quantized_decode.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys

import jax
import jax.numpy as jnp

from pallas_kernels import kv_quant
from pallas_kernels.kv_quant import QuantizedKV
from pallas_kernels.quantized_decode_attention import (
    QuantizedDecodeConfig,
    decode_attention,
    quantized_decode_attention,
)
from timing import chained_seconds, median_seconds  # benchmarks/timing.py

H100_BYTES_PER_S = 3.1e12  # H100 read bandwidth measured with an XLA reduction (results/kernel_notes.md)


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    context: int
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    window: int = 128  # full-precision residual window next to the quantized slab


FULL = tuple(Shape(b, c) for b in (1, 8, 32) for c in (8192, 32768, 131072))
SMOKE = (Shape(1, 256, 4, 2, 64, 32), Shape(2, 512, 4, 2, 64, 32))


def _random_slab(key, shape: Shape, bits: int) -> QuantizedKV:
    """Random packed codes and statistics (timing does not depend on the values)."""
    per, g = kv_quant.codes_per_byte(bits), kv_quant.DEFAULT_GROUP_SIZE
    b, h, c, d = shape.batch, shape.kv_heads, shape.context, shape.head_dim
    keys = jax.random.split(key, 6)
    codes = lambda k: jax.random.bits(k, (b, h, c // per, d), jnp.uint8)  # noqa: E731
    stat = lambda k, s: (0.1 * jax.random.normal(k, s)).astype(jnp.bfloat16)  # noqa: E731
    return QuantizedKV(
        k_codes=codes(keys[0]),
        k_scale=stat(keys[1], (b, h, c // g, d)),
        k_zero=stat(keys[2], (b, h, c // g, d)),
        v_codes=codes(keys[3]),
        v_scale=stat(keys[4], (b, h, d // g, c)),
        v_zero=stat(keys[5], (b, h, d // g, c)),
        bits=bits,
    )


def _nbytes(*arrays) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(arrays)))


def bench_shape(shape: Shape, args, backend: str) -> dict:
    key = jax.random.key(0)
    kq, kk, kv, kr, ks = jax.random.split(key, 5)
    b, c, d = shape.batch, shape.context, shape.head_dim
    q = jax.random.normal(kq, (b, shape.q_heads, d), jnp.bfloat16)  # [B, H, D]
    implementation = args.implementation or ("tpu" if backend == "tpu" else "gpu")
    block_k = args.block_k or QuantizedDecodeConfig().block_for(implementation)
    config = QuantizedDecodeConfig(
        block_k=min(block_k, c),
        num_splits=args.num_splits,
        num_warps=args.num_warps,
        tpu_stage_tokens=args.tpu_stage_tokens,
    )
    kernel_kw = dict(config=config, implementation=implementation, interpret=backend not in ("gpu", "tpu"))
    lengths = jnp.full((b,), c, jnp.int32)
    times, dispatched, read = {}, {}, {}
    kw = dict(repeats=args.repeats, inner=args.inner)

    def timed(name, fn, *fn_args):
        """Seconds per call, chained on device (the reported time) and host-dispatched."""
        times[name] = chained_seconds(fn, *fn_args, **kw)
        dispatched[name] = median_seconds(fn, *fn_args, **kw)

    # bf16 cache [B, Hkv, C, D]: the plain kernel, then XLA / cuDNN on [B, C, Hkv, D].
    k = jax.random.normal(kk, (b, shape.kv_heads, c, d), jnp.bfloat16)
    v = jax.random.normal(kv, (b, shape.kv_heads, c, d), jnp.bfloat16)
    plain = jax.jit(functools.partial(decode_attention, **kernel_kw))
    timed("bf16_kernel", plain, q, k, v, lengths)
    read["bf16_kernel"] = _nbytes(q, k, v)
    k_bthd, v_bthd = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, C, Hkv, D]
    del k, v
    for name in ("xla", "cudnn"):
        if name == "cudnn" and backend != "gpu":
            times[name] = dispatched[name] = None  # cuDNN exists only on NVIDIA GPUs
            continue
        sdpa = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation=name))
        try:
            timed(name, sdpa, q[:, None], k_bthd, v_bthd)
        except Exception as e:  # noqa: BLE001  (report why a baseline is missing, keep going)
            times[name] = dispatched[name] = None
            print(f"  {name} baseline failed: {type(e).__name__}: {e}"[:300], file=sys.stderr)
        read[name] = _nbytes(q, k_bthd, v_bthd)
    del k_bthd, v_bthd

    # Quantized slab of `context` tokens plus a full bf16 window.
    window = jax.random.normal(kr, (b, shape.kv_heads, shape.window, d), jnp.bfloat16)
    res_lengths = jnp.full((b,), shape.window, jnp.int32)
    quantized = jax.jit(functools.partial(quantized_decode_attention, **kernel_kw))
    for bits in (4, 2):
        slab = _random_slab(ks, shape, bits)
        name = f"int{bits}_kernel"
        timed(name, quantized, q, slab, lengths, window, window, res_lengths)
        read[name] = _nbytes(q, slab, window, window)
        del slab

    baselines = [times[n] for n in ("xla", "cudnn") if times[n] is not None]
    best = min(baselines) if baselines else None
    return {
        **dataclasses.asdict(shape),
        "config": dataclasses.asdict(config),
        "median_us": {n: None if t is None else t * 1e6 for n, t in times.items()},
        "dispatched_median_us": {n: None if t is None else t * 1e6 for n, t in dispatched.items()},
        "bytes_read": read,
        "hbm_fraction": {n: read[n] / t / args.bandwidth for n, t in times.items() if t is not None},
        "time_over_best_baseline": {
            n: t / best for n, t in times.items() if t is not None and best and n.endswith("_kernel")
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any backend")
    parser.add_argument("--out", default="bench_quantized_decode.json")
    parser.add_argument("--block-k", type=int, default=None, help="tokens per KV block (default: the lowering's own)")
    parser.add_argument("--num-splits", type=int, default=None, help="default: fill the GPU; 1 on TPU")
    parser.add_argument("--num-warps", type=int, default=QuantizedDecodeConfig.num_warps, help="GPU: warps per program")
    parser.add_argument("--batches", type=int, nargs="+", help="only these batch sizes")
    parser.add_argument("--contexts", type=int, nargs="+", help="only these contexts")
    parser.add_argument(
        "--implementation",
        choices=("gpu", "tpu"),
        default=None,
        help="kernel lowering (default: the backend's; off GPU/TPU interpreted)",
    )
    parser.add_argument(
        "--tpu-stage-tokens",
        type=int,
        default=QuantizedDecodeConfig.tpu_stage_tokens,
        help="TPU: tokens per DMA ring stage",
    )
    parser.add_argument(
        "--bandwidth",
        type=float,
        default=H100_BYTES_PER_S,
        help="bytes/s of HBM for the roofline column (H100: 3.1e12 measured; "
        "TPU v5e: 8.19e11, v6e: 1.64e12, v5p: 2.76e12 spec sheets)",
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--inner", type=int, default=None, help="calls per timing sample")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    if backend not in ("gpu", "tpu") and not args.smoke:
        print(
            "no GPU or TPU: the full benchmark needs one (times on CPU mean nothing); use --smoke to check the script",
            file=sys.stderr,
        )
        return 2
    args.repeats = args.repeats or (2 if args.smoke else 7)
    args.inner = args.inner or (1 if args.smoke else 20)
    shapes = [
        s
        for s in (SMOKE if args.smoke else FULL)
        if (not args.batches or s.batch in args.batches) and (not args.contexts or s.context in args.contexts)
    ]
    results = []
    for shape in shapes:
        print(f"batch {shape.batch} context {shape.context} ...", flush=True)
        results.append(bench_shape(shape, args, backend))
        print("  " + json.dumps(results[-1]["median_us"]), flush=True)
    report = {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "smoke": args.smoke,
        "note": "smoke: interpreted kernels, times are meaningless"
        if args.smoke
        else "quantized kernels also read a full 128-token bf16 window beyond `context`",
        "hbm_bytes_per_s": args.bandwidth,
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
