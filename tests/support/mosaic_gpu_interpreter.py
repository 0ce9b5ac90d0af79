"""JAX's Mosaic GPU interpreter, extended by what the Hopper kernels use and JAX 0.10 lacks.

`pallas_kernels.block_sparse_mosaic_gpu` cannot run on JAX 0.10's GPU interpreter as shipped:
its wgmma callback reads only untransposed shared-memory operands (our S = Q K^T passes K
transposed; P V passes P from registers), and `layout_cast` (register layouts, meaningless on
CPU) has no CPU lowering. `interpreted()` adds those three for the duration of a `with` block,
so the real kernels, warpgroups (as host threads), barriers and TMA copies, compute numbers
here. What it adds does no more than its name: the wgmma operand reads go through the
interpreter's own checked read (bounds, race detection), then transpose; the product is a
float32 matmul like the original. It also compiles each warpgroup's program once instead of
at every grid point (a speed-up only). It touches JAX internals, so it names the JAX version
it was written against when they move.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import jax
import numpy as np

try:
    from jax._src import callback
    from jax._src import core as jax_core
    from jax._src.interpreters import mlir
    from jax._src.pallas.mosaic.interpret import thread_map
    from jax._src.pallas.mosaic.interpret import utils as interpret_utils
    from jax._src.pallas.mosaic_gpu import core as gpu_core
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks, jaxpr_interpret
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams, force_gpu_interpret_mode
    from jax._src.state import indexing
    from jax._src.state import types as state_types
except ImportError as error:  # pragma: no cover - only when JAX moves its internals
    raise ImportError(
        f"tests/mosaic_gpu_interpreter.py was written against JAX 0.10.2's "
        f"GPU interpreter; JAX {jax.__version__} moved it: {error}"
    ) from error


def _read_operand(operand, transforms, token, device_id, coords, thread_id, source_info):
    """A wgmma operand: registers as they are, or a shared-memory ref read through the
    interpreter's checked `_get` (integer/slice indexing first), then its transposes."""
    if transforms is None:
        return np.asarray(operand)
    kept = [t for t in transforms if not isinstance(t, gpu_callbacks.NOOP_TRANSFORMS)]
    indexers = [t for t in kept if isinstance(t, indexing.NDIndexer)]
    transposes = kept[len(indexers) :]
    if kept[: len(indexers)] != indexers or not all(isinstance(t, state_types.TransposeTransform) for t in transposes):
        raise ValueError(f"wgmma operand transforms {kept}: only indexing, then transposes, are interpreted")
    _, value = gpu_callbacks._get(
        token=token,
        device_id=device_id,
        grid_point_coords=coords,
        thread_id=thread_id,
        allocation_key_as_array=operand,
        transforms=tuple(indexers),
        source_info=source_info,
    )
    value = np.asarray(value)
    for t in transposes:
        value = np.transpose(value, t.permutation)
    return value


def _wgmma(token, device_id, coords, thread_id, acc, a, b, transforms, *, a_in_registers, acc_dtype, source_info):
    """acc += a @ b on the host, as JAX's own wgmma callback, with transposed or register
    operands."""
    acc_transforms, a_transforms, b_transforms = transforms
    read = functools.partial(
        _read_operand, token=token, device_id=device_id, coords=coords, thread_id=thread_id, source_info=source_info
    )
    lhs = read(a, None if a_in_registers else a_transforms)
    rhs = read(b, b_transforms)
    memory = gpu_callbacks._get_shared_memory()
    thread = memory.get_global_thread_id(int(device_id), int(thread_id))
    info = interpret_utils.GPULoggingInfo(
        device_id=int(device_id),
        grid_point_coords=tuple(int(c) for c in coords),
        thread_id=int(thread_id),
        source_info=source_info,
    )
    key = gpu_callbacks.HostAllocationKey.from_array(acc)
    acc_range = interpret_utils.to_range(jax.tree.map(int, gpu_callbacks._remove_noop_transforms(acc_transforms)))
    value, _, _ = memory.get_buffer_content(key, acc_range, thread, logging_info=info)
    memory.store_buffer_content(key, acc_range, value + np.matmul(lhs, rhs, dtype=acc_dtype), thread, logging_info=info)
    return token


def _interpret_wgmma(self, eqn, token, get_invals):
    """Replaces `JaxprInterpreter._interpret_wgmma_ref_p`: the same io_callback protocol."""
    acc, a, b, *leaves = get_invals()
    empty = jax.tree.structure([])
    trees = tuple(eqn.params[f"{name}_transforms_tree"] or empty for name in ("acc", "a", "b"))
    transforms = jax.tree.unflatten(jax.tree_util.treedef_tuple(trees), leaves)
    a_in_registers = not isinstance(eqn.invars[1].aval, state_types.AbstractRef)
    run = functools.partial(
        _wgmma, a_in_registers=a_in_registers, acc_dtype=eqn.invars[0].aval.dtype, source_info=eqn.source_info
    )
    token = callback.io_callback(
        run,
        gpu_callbacks.TOKEN_SHAPE_DTYPE,
        token,
        self.device_info.device_id,
        self.grid_point_coords,
        self.thread_id,
        acc,
        a,
        b,
        transforms,
        ordered=True,
    )
    return token, []


class _CompiledThreads:
    """Replaces `thread_map._run_jaxpr`, which traces and compiles a warpgroup's program at
    every grid point: here once per program and argument types (a lock keeps the threads
    of one thread block from compiling it side by side)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._compiled = {}

    def __call__(self, jaxpr, consts, *args):
        key = (jaxpr, *((np.shape(x), np.asarray(x).dtype) for x in (*consts, *args)))
        with self._lock:
            if key not in self._compiled:
                run = jax.jit(lambda consts, *args: jax_core.eval_jaxpr(jaxpr, consts, *args))
                self._compiled[key] = run.trace(consts, *args).lower().compile()
        self._compiled[key](consts, *args)


def _layout_cast(x, new_layout):
    del new_layout  # register layouts do not exist on CPU
    return x


@contextlib.contextmanager
def interpreted(detect_races: bool = True):
    """Inside: every Mosaic GPU kernel traced runs on JAX's GPU interpreter (with race
    detection), extended as the module says. Yields a function returning whether the
    interpreter found a data race in the last kernel it ran."""
    interpreter = jaxpr_interpret.JaxprInterpreter
    original, run_thread = interpreter._interpret_wgmma_ref_p, thread_map._run_jaxpr
    cpu_rules = mlir._platform_specific_lowerings["cpu"]
    had_rule = gpu_core.layout_cast_p in cpu_rules
    interpreter._interpret_wgmma_ref_p = _interpret_wgmma
    thread_map._run_jaxpr = _CompiledThreads()
    if not had_rule:
        mlir.register_lowering(
            gpu_core.layout_cast_p, mlir.lower_fun(_layout_cast, multiple_results=False), platform="cpu"
        )
    try:
        with force_gpu_interpret_mode(InterpretGPUParams(detect_races=detect_races)):
            yield lambda: gpu_callbacks.get_races().races_found
    finally:
        interpreter._interpret_wgmma_ref_p, thread_map._run_jaxpr = original, run_thread
        if not had_rule:
            del cpu_rules[gpu_core.layout_cast_p]
        gpu_callbacks.reset_gpu_interpret_mode_state()
