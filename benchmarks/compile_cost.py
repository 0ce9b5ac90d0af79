"""Compile time and compile memory of `generate` (its jitted prefill and decode loop) against model depth.

Every argument is abstract (jax.ShapeDtypeStruct), so a Llama-3.1-8B shape compiles on a laptop CPU
without its weights. Each (shape, depth, policy) compiles in a fresh subprocess, whose peak resident
memory above its level before compiling is the compile memory. Depths: the shape's own and 3 layers,
whose ratio says whether compile cost grows with depth.

Usage: python benchmarks/compile_cost.py [--shapes smollm2-135m llama-3.1-8b] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from model_shapes import LLAMA31_8B, SMOLLM2_135M

SHAPES = {"smollm2-135m": SMOLLM2_135M, "llama-3.1-8b": LLAMA31_8B}
POLICIES = {"full": "Full()", "snapkv": "SnapKV(budget_tokens=256)", "pyramidkv": "PyramidKV(budget_tokens=256)"}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(shape: str, layers: int, policy_name: str, prompt: int, new_tokens: int) -> dict:
    """Lower and compile prefill, then the decode loop, for abstract arguments; seconds and MiB."""
    from kvjax import inference, policies
    from kvjax.language_model import abstract_model
    from kvjax.sampling import SamplingParams

    config = dataclasses.replace(SHAPES[shape], num_layers=layers)
    m = abstract_model(config, jnp.bfloat16)
    policy = eval(POLICIES[policy_name], vars(policies))  # noqa: S307 - a fixed table above
    chunk, padded = inference._chunking(prompt, inference.DEFAULT_CHUNK)
    tokens = jax.ShapeDtypeStruct((1, padded), jnp.int32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    new_api = "policy_params" in inspect.signature(inference._prefill).parameters  # the layer-scan version
    extra = {"run": inference.Execution()} if new_api else {}
    lead = (None,) if new_api else ()
    statics = dict(policy=policy, chunk=chunk, max_new_tokens=new_tokens, **extra)
    rss0 = _rss_mib()
    start = time.perf_counter()
    lowered = inference._prefill.lower(m.graphdef, m.params, *lead, tokens, lengths, **statics)
    lower_prefill = time.perf_counter() - start
    lowered.compile()
    prefill_s = time.perf_counter() - start
    rss_prefill = _rss_mib()
    state, _ = jax.eval_shape(
        functools.partial(inference._prefill, **statics), m.graphdef, m.params, *lead, tokens, lengths
    )
    token = jax.ShapeDtypeStruct((1,), jnp.int32)
    loop = jax.eval_shape(functools.partial(inference._open_loop, steps=new_tokens), state, token)
    sampling = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), SamplingParams.create(1))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    eos = jax.ShapeDtypeStruct((1,), jnp.int32)
    start = time.perf_counter()
    inference._decode.lower(
        m.graphdef, m.params, *lead, loop, sampling, eos, scalar, scalar, policy=policy, **extra
    ).compile()
    decode_s = time.perf_counter() - start
    return {
        "shape": shape,
        "layers": layers,
        "policy": policy_name,
        "prompt": prompt,
        "new_tokens": new_tokens,
        "layer_scan": new_api,
        "prefill_lower_s": lower_prefill,
        "prefill_compile_s": prefill_s,
        "decode_compile_s": decode_s,
        "compile_s": prefill_s + decode_s,
        "prefill_compile_mib": rss_prefill - rss0,
        "compile_mib": _rss_mib() - rss0,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--policies", nargs="+", default=["full", "snapkv"], choices=list(POLICIES))
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", nargs=3, metavar=("SHAPE", "LAYERS", "POLICY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # the child: one measurement, printed as JSON
        shape, layers, policy = args.one
        print(json.dumps(measure(shape, int(layers), policy, args.prompt, args.new_tokens)))
        return
    rows = []
    for shape in args.shapes:
        for policy in args.policies:
            for layers in (SHAPES[shape].num_layers, 3):
                child = [
                    sys.executable,
                    __file__,
                    "--one",
                    shape,
                    str(layers),
                    policy,
                    "--prompt",
                    str(args.prompt),
                    "--new-tokens",
                    str(args.new_tokens),
                ]
                out = subprocess.run(child, capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    for row in rows:  # depth ratio: the shape's own depth over 3 layers
        base = next(r for r in rows if (r["shape"], r["policy"], r["layers"]) == (row["shape"], row["policy"], 3))
        row["compile_s_vs_3_layers"] = row["compile_s"] / base["compile_s"]
        row["compile_mib_vs_3_layers"] = row["compile_mib"] / max(base["compile_mib"], 1.0)
    report = {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": len(np.atleast_1d(jax.devices())),
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
