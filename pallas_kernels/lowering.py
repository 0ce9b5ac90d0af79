"""Which lowering a kernel entry point runs: Mosaic TPU, GPU (Triton or Mosaic GPU), or the jnp
reference."""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

IMPLEMENTATIONS = ("tpu", "gpu", "reference")
WITH_MOSAIC_GPU = (*IMPLEMENTATIONS, "mosaic_gpu")  # kernels that also have a Hopper lowering


def pick_implementation(implementation: str | None, interpret: bool | pltpu.InterpretParams,
                        choices: tuple[str, ...] = IMPLEMENTATIONS) -> str:
    """An explicit choice among `choices`, else `jax.default_backend()`: tpu and gpu get their
    kernel; cpu gets the reference, or the TPU kernel in interpret mode when interpret is set.
    `pltpu.InterpretParams` (eager DMAs, race detection) configure the TPU kernel's only."""
    chosen = _choose(implementation, interpret, choices)
    if isinstance(interpret, pltpu.InterpretParams) and chosen != "tpu":
        raise ValueError(f"pltpu.InterpretParams configure the TPU kernel's interpreter, not "
                         f"implementation={chosen!r}")
    return chosen


def _choose(implementation, interpret, choices) -> str:
    if implementation is None:
        backend = jax.default_backend()
        if backend in ("tpu", "gpu"):
            return backend
        return "tpu" if interpret else "reference"
    if implementation not in choices:
        raise ValueError(f"implementation must be one of {choices} or None, "
                         f"got {implementation!r}")
    if implementation == "mosaic_gpu" and interpret:
        raise ValueError("the Mosaic GPU kernels cannot run interpreted here: JAX 0.10's GPU "
                         "interpreter lacks their transposed and register-operand wgmma "
                         "(the test suite adds them: tests/mosaic_gpu_interpreter.py)")
    return implementation


def tpu_interpret(interpret: bool | pltpu.InterpretParams) -> pltpu.InterpretParams | bool:
    """pallas_call's `interpret` for a Mosaic TPU kernel: the given params, default ones for True."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False
