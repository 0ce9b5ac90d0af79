"""Compiled memory of one DuoAttention gate-training step (Llama-3-8B shapes, bf16), without any weights.

The training step `kvjax train-gates --method duo` runs (loss, gradient w.r.t. the L x Hkv gates,
AdamW + clamp) is lowered and compiled for abstract arguments (jax.ShapeDtypeStruct: the frozen
model, the gates, the optimizer state, one batch row of `seq_len` tokens), and XLA's
`memory_analysis()` of the compiled executable is reported: argument bytes (the frozen weights the
step reads; the unused lm_head is pruned), output bytes and temporary bytes (activations, residuals
kept for the backward pass, attention scratch); weight_bytes is the whole model, which stays resident.
Nothing of model size is ever allocated, so it runs on a laptop CPU; the numbers are those of the
backend it compiles for (CPU by default, whose bf16 matmuls widen operands to f32; on a GPU host, the
GPU's).

Usage: python benchmarks/duo_gates_memory.py [--seq-len 32768] [--layers 1 2 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from kvjax.config import ModelConfig
from kvjax.language_model import abstract_model
from kvjax.policies.duo_attention.training import DuoGateConfig, make_loss_fn, make_optimizer
from kvjax.train.loop import _make_update
from model_shapes import LLAMA31_8B


def step_memory(config: ModelConfig, seq_len: int, train: DuoGateConfig = DuoGateConfig(), dtype=jnp.bfloat16) -> dict:
    """memory_analysis() of the compiled gate-training step for `config` at `seq_len` tokens (batch 1),
    plus the compile time; every argument is abstract."""
    model = abstract_model(config, dtype)
    gates = {"gates": jax.ShapeDtypeStruct((config.num_layers, config.num_kv_heads), jnp.float32)}
    optimizer = make_optimizer(train.lr, train.steps)
    opt_state = jax.eval_shape(optimizer.init, gates)
    batch = {
        "tokens": jax.ShapeDtypeStruct((1, seq_len), jnp.int32),
        "valid": jax.ShapeDtypeStruct((1, seq_len), jnp.bool_),
        "answer": jax.ShapeDtypeStruct((1, seq_len), jnp.float32),
        "model": model.params,
    }
    rng = jax.eval_shape(lambda: jax.random.key(0))
    update = _make_update(make_loss_fn(model.graphdef, train), optimizer)
    start = time.perf_counter()
    compiled = update.lower(gates, opt_state, batch, rng).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    return {
        "layers": config.num_layers,
        "seq_len": seq_len,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "weight_bytes": int(weights),
        "weights_plus_temp_bytes": int(weights + mem.temp_size_in_bytes),  # device footprint, about
        "compile_s": round(seconds, 1),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=32_768)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--chunk", type=int, default=DuoGateConfig.chunk, help="attention query chunk")
    parser.add_argument("--out", type=Path, help="write the JSON here as well as to stdout")
    args = parser.parse_args(argv)
    train = DuoGateConfig(chunk=args.chunk, max_len=args.seq_len, min_len=min(DuoGateConfig.min_len, args.seq_len))
    rows = []
    for layers in args.layers:
        config = dataclasses.replace(LLAMA31_8B, num_layers=layers)
        rows.append(step_memory(config, args.seq_len, train))
        print(json.dumps(rows[-1]), flush=True)
    # Least-squares temp bytes per added layer, over 2+ layers: with one layer the scans run once and
    # XLA compiles them away, a different program.
    fit = [(r["layers"], r["temp_bytes"]) for r in rows if r["layers"] >= 2]
    slope = None
    if len({x for x, _ in fit}) >= 2:
        mx, my = sum(x for x, _ in fit) / len(fit), sum(y for _, y in fit) / len(fit)
        slope = sum((x - mx) * (y - my) for x, y in fit) / sum((x - mx) ** 2 for x, _ in fit)
    base = dataclasses.asdict(LLAMA31_8B)
    base.pop("num_layers")
    report = {
        "what": "memory_analysis() of one compiled DuoAttention gate-training step (gradient + AdamW), abstract args",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "model": base,
        "dtype": "bfloat16",
        "batch": 1,
        "seq_len": args.seq_len,
        "chunk": args.chunk,
        "sink": train.sink,
        "recent": train.recent,
        "rows": rows,
        "temp_bytes_per_layer": None if slope is None else int(slope),
        "hidden_state_bytes": args.seq_len * LLAMA31_8B.hidden_size * 2,  # one bf16 [T, E]
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
