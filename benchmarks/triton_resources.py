"""Registers, spills and shared memory of kvjax's Triton kernels on an H100, found without a GPU.

Each kernel is lowered for CUDA exactly as `jax.jit` would send it to XLA; its Triton module is
then compiled for sm_90a by the `triton` package, and ptxas's own report (registers, spill bytes)
is read back with the shared memory Triton allocates and the SASS instruction count. From these
follow the CTAs one SM can hold (65536 registers, 228 KB of shared memory, 64 warps).

Why: a kernel that spills registers to local memory inside its main loop waits on memory for
every spilled value; this is invisible to interpret-mode tests and cheap to find here. What it is
not: a timing. XLA compiles the same module with the Triton it bundles, whose passes can differ
from the `triton` package's, so treat the numbers as a strong hint, and time on a GPU.

    pip install triton   # the compiler and ptxas, no GPU needed
    python benchmarks/triton_resources.py --out triton_resources.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import lowering as triton_lowering

from pallas_kernels import block_masks as bm
from pallas_kernels import kv_quant
from pallas_kernels.block_sparse_decode import DecodeConfig, block_sparse_decode
from pallas_kernels.block_sparse_prefill import PrefillConfig, block_sparse_prefill
from pallas_kernels.quantized_decode_attention import (
    QuantizedDecodeConfig,
    decode_attention,
    quantized_decode_attention,
)

SM90_REGISTERS = 65536  # per SM
SM90_SHARED_BYTES = 233472  # 228 KB per SM; each CTA also holds 1 KB reserved by the driver
SM90_MAX_WARPS = 64
SM90_MAX_CTAS = 32

# Llama-3.1-8B attention: 32 query / 8 KV heads, head dim 128, bf16, batch 1.
BATCH, HEADS, KV_HEADS, HEAD_DIM, CONTEXT = 1, 32, 8, 128, 32768


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel at one config: `build(config)` -> (function, argument shapes)."""

    kernel: str
    config: object
    build: Callable


def triton_modules(fn: Callable, *shapes) -> list[str]:
    """Lowers fn for CUDA and returns the Triton module (text) of every Pallas call in it."""
    modules, lower = [], triton_lowering.lower_jaxpr_to_triton_module

    def recording(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    triton_lowering.lower_jaxpr_to_triton_module = recording
    try:
        jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = lower
    return modules


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas(ptx_path: str, cubin_path: str) -> str:
    """ptxas -v's report; the first bundled ptxas that accepts the PTX's version."""
    errors = []
    for name in ("ptxas", "ptxas-blackwell"):
        done = subprocess.run(
            [_nvidia_tool(name), "-v", "--gpu-name", "sm_90a", ptx_path, "-o", cubin_path],
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            return done.stderr
        errors.append(f"{name}: {done.stderr.strip()[-200:]}")
    raise RuntimeError("no bundled ptxas compiled the PTX: " + "; ".join(errors))


def resident_ctas(registers: int, warps: int, shared_bytes: int) -> int:
    """CTAs one SM holds at once (registers are allocated 256 per warp at a time)."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = SM90_REGISTERS // (per_warp * warps)
    by_shared = SM90_SHARED_BYTES // (shared_bytes + 1024)
    return min(by_registers, by_shared, SM90_MAX_WARPS // warps, SM90_MAX_CTAS)


def compile_sm90(module: str, num_warps: int, num_stages: int) -> dict:
    """Compiles one Triton module for sm_90a: ptxas's registers and spills, Triton's shared memory,
    and the SASS instruction count (the whole kernel, the loop body once)."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        ttir = os.path.join(tmp, "kernel.ttir")
        with open(ttir, "w") as f:
            f.write(module)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # triton's knob-default notices
            compiled = triton.compile(
                ttir, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
            )
        ptx, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = _ptxas(ptx, cubin)
        sass = subprocess.run(
            [_nvidia_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True
        ).stdout
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    opcodes = collections.Counter(
        match.group(1).split(".")[0]
        for match in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    )
    shared = int(compiled.metadata.shared)
    return {
        "registers": registers,
        "spill_store_bytes": int(spills.group(1)),
        "spill_load_bytes": int(spills.group(2)),
        "shared_bytes": shared,
        "resident_ctas_per_sm": resident_ctas(registers, num_warps, shared),
        "sass_instructions": sum(opcodes.values()),
        "local_memory_instructions": opcodes["LDL"] + opcodes["STL"],
    }


# ----------------------------------------------------------------------------------------
# The kernels, at Llama-3.1-8B shapes.
# ----------------------------------------------------------------------------------------


def _shape(*dims, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(dims, dtype)


def _quantized(bits: int, config: QuantizedDecodeConfig):
    slab = jax.eval_shape(functools.partial(kv_quant.empty_quantized_kv, BATCH, KV_HEADS, CONTEXT, HEAD_DIM, bits))
    no_window = _shape(BATCH, KV_HEADS, 0, HEAD_DIM)  # only the slab's kernel is lowered
    lengths = _shape(BATCH, dtype=jnp.int32)

    def run(q, slab, lengths, k_res, v_res, res_lengths):
        return quantized_decode_attention(
            q, slab, lengths, k_res, v_res, res_lengths, config=config, implementation="gpu"
        )

    return run, (_shape(BATCH, HEADS, HEAD_DIM), slab, lengths, no_window, no_window, lengths)


def _plain(config: QuantizedDecodeConfig):
    kv = _shape(BATCH, KV_HEADS, CONTEXT, HEAD_DIM)

    def run(q, k, v, lengths):
        return decode_attention(q, k, v, lengths, config=config, implementation="gpu")

    return run, (_shape(BATCH, HEADS, HEAD_DIM), kv, kv, _shape(BATCH, dtype=jnp.int32))


def _block_sparse_decode(config: DecodeConfig):
    kv = _shape(BATCH, KV_HEADS, CONTEXT, HEAD_DIM)

    def run(q, k, v, lengths):
        return block_sparse_decode(q, k, v, lengths, mask=bm.DenseCausal(), config=config, implementation="gpu")

    return run, (_shape(BATCH, HEADS, HEAD_DIM), kv, kv, _shape(BATCH, dtype=jnp.int32))


def _block_sparse_prefill(config: PrefillConfig):
    q = _shape(BATCH, HEADS, 8192, HEAD_DIM)
    kv = _shape(BATCH, KV_HEADS, 8192, HEAD_DIM)

    def run(q, k, v):
        return block_sparse_prefill(q, k, v, bm.DenseCausal(), config=config, implementation="gpu")

    return run, (q, kv, kv)


def cases() -> list[Case]:
    quantized = [
        QuantizedDecodeConfig(block_k=k, num_splits=32, num_warps=w, num_stages=s)
        for k, w, s in itertools.product((64, 128, 256), (4, 8), (2, 3))
    ]
    return [
        *(
            Case(f"quantized_decode_int{bits}", c, functools.partial(_quantized, bits))
            for bits in (4, 2)
            for c in quantized
        ),
        *(
            Case("plain_decode_bf16", QuantizedDecodeConfig(block_k=k, num_splits=32, num_warps=w), _plain)
            for k, w in itertools.product((128, 256), (4, 8))
        ),
        *(
            Case(
                "block_sparse_decode",
                DecodeConfig(block_size=p, num_splits=32, num_warps=w, num_stages=s),
                _block_sparse_decode,
            )
            for p, w, s in itertools.product((64, 128), (4, 8), (2, 4))
        ),
        *(
            Case(
                "block_sparse_prefill",
                PrefillConfig(block_q=q, block_k=k, num_warps=w, num_stages=s),
                _block_sparse_prefill,
            )
            for (q, k), w, s in itertools.product(((128, 128), (128, 64), (64, 64)), (4, 8), (2, 3))
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="triton_resources.json")
    parser.add_argument("--kernels", nargs="+", help="only these kernels (names as in the JSON)")
    args = parser.parse_args(argv)
    try:
        import triton
    except ImportError:
        print("needs the `triton` package (its compiler and ptxas): pip install triton", file=sys.stderr)
        return 2
    rows = []
    selected = [c for c in cases() if not args.kernels or c.kernel in args.kernels]
    for i, case in enumerate(selected):
        fn, shapes = case.build(case.config)
        module, *_ = triton_modules(fn, *shapes)  # the first call is the kernel itself
        row = {
            "kernel": case.kernel,
            "config": dataclasses.asdict(case.config),
            **compile_sm90(module, case.config.num_warps, case.config.num_stages),
        }
        rows.append(row)
        print(
            f"[{i + 1}/{len(selected)}] {case.kernel} {row['config']}: {row['registers']} registers, "
            f"{row['spill_store_bytes']} B spilled, {row['shared_bytes'] // 1024} KB shared, "
            f"{row['resident_ctas_per_sm']} CTA/SM, {row['sass_instructions']} SASS",
            flush=True,
        )
    report = {
        "what": "static sm_90a resources of kvjax's Triton kernels, compiled on a machine without a GPU",
        "target": "sm_90a (H100)",
        "triton_version": triton.__version__,
        "jax_version": jax.__version__,
        "shapes": {
            "batch": BATCH,
            "heads": HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "decode_context": CONTEXT,
            "prefill_length": 8192,
            "dtype": "bfloat16",
        },
        "caveat": "XLA compiles these modules with its bundled Triton, whose passes may differ",
        "gpu_defaults": {
            "quantized_decode": dict(
                dataclasses.asdict(QuantizedDecodeConfig()), block_k=QuantizedDecodeConfig().block_for("gpu")
            ),
            "block_sparse_decode": dataclasses.asdict(DecodeConfig()),
            "block_sparse_prefill": dataclasses.asdict(PrefillConfig()),
        },
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
