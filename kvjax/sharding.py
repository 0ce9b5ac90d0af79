"""Scale-out with JAX's own sharding: a ("data", "model") mesh, parameters and KV state laid out on it
(batch over "data"; attention heads, MLP width and vocabulary over "model"), and `shard_map` around
the Pallas kernels, which XLA's partitioner cannot split by itself.

A model carries its mesh (`shard_model`, or `kvjax.load(..., mesh=)`); kvjax's entry points run under
it (`on_model_mesh`), so everything traced inside sees it through `jax.sharding.get_abstract_mesh()`
and needs no extra argument. A dimension that the mesh axis does not divide stays replicated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvjax.kv_state import KVState

if TYPE_CHECKING:
    from kvjax.language_model import LanguageModel

DATA, MODEL = "data", "model"

# Which axis of each parameter (by its attribute name) is split over "model" (Megatron layout: the
# column-parallel projections split their output heads or width, the row-parallel ones their input,
# so each block needs one all-reduce after attention and one after the MLP). Absent: replicated.
_PARAM_MODEL_AXIS = {
    "q_proj": 1,
    "k_proj": 1,
    "v_proj": 1,  # [E, H | K, D]
    "q_bias": 0,
    "k_bias": 0,
    "v_bias": 0,  # [H | K, D]
    "o_proj": 0,  # [H, D, E]
    "gate_proj": 1,
    "up_proj": 1,  # [E, F]
    "gate_bias": 0,
    "up_bias": 0,  # [F]
    "down_proj": 0,  # [F, E]
    "embed": 0,  # [V, E]: vocabulary-parallel lookup (and tied output head)
    "lm_head": 1,  # [E, V]
}


def make_mesh(model: int | None = None, data: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all), `model` defaulting to all not used by `data`.

    Axes are Auto: XLA propagates shardings from the parameters and the KV state, so the model code
    stays free of per-op sharding annotations.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or len(devices) % data:
        raise ValueError(f"data={data} must be a positive divisor of the {len(devices)} devices")
    model = len(devices) // data if model is None else model
    if model < 1 or data * model > len(devices):
        raise ValueError(f"a {data} x {model} mesh needs {data * model} devices; {len(devices)} available")
    return jax.make_mesh(
        (data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[: data * model]
    )


def _split(mesh, name: str, size: int) -> str | None:
    """`name` if that mesh axis divides `size` (and is more than one device), else None (replicate)."""
    n = mesh.shape.get(name, 1)
    return name if n > 1 and size % n == 0 else None


def param_spec(mesh, name: str, shape: tuple[int, ...]) -> P:
    """The partition spec of a parameter from its attribute name (`q_proj`, `embed`, ...) and shape."""
    axis = _PARAM_MODEL_AXIS.get(name)
    if axis is None:
        return P()
    spec = [None] * len(shape)
    spec[axis] = _split(mesh, MODEL, shape[axis])
    return P(*spec)


def _param_name(path: tuple) -> str:
    """A parameter's attribute name: the last string key of its path (nnx.State paths end in `.value`)."""
    return next(k.key for k in reversed(path) if isinstance(getattr(k, "key", None), str))


def param_shardings(mesh: Mesh, params: Any) -> Any:
    """A NamedSharding per parameter leaf, for an nnx.State or its pure dict (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(mesh, _param_name(path), x.shape)), params
    )


def shard_model(m: LanguageModel, mesh: Mesh) -> LanguageModel:
    """The model with its parameters laid out on `mesh`, which kvjax's entry points then run under."""
    params = jax.device_put(m.params, param_shardings(mesh, m.params))
    return dataclasses.replace(m, params=params, mesh=mesh)


def on_model_mesh(fn: Callable) -> Callable:
    """Runs `fn(m, ...)` under `m.mesh` (when it has one), so what it traces sees the mesh."""

    @functools.wraps(fn)
    def under_mesh(m, *args, **kwargs):
        if m.mesh is None:
            return fn(m, *args, **kwargs)
        with jax.set_mesh(m.mesh):
            return fn(m, *args, **kwargs)

    return under_mesh


def batch_head_spec(mesh, batch: int, heads: int | None = None, head_axis: int = 1) -> P:
    """[B, ..., heads, ...] split over "data" on axis 0 and "model" on `head_axis`, each only where the
    mesh axis divides the dimension; dimensions after the last named one stay replicated."""
    spec = [_split(mesh, DATA, batch)] + [None] * (head_axis - 1)
    if heads is not None:
        spec.append(_split(mesh, MODEL, heads))
    return P(*spec)


def constrain_state(state: KVState) -> KVState:
    """The KV state pinned to batch over "data", KV heads over "model" under the active mesh (a no-op
    without one). Every segment leaf is [B, Hs, ...] or [B]; `shared` is left to XLA."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return state
    batch = state.batch_size

    def pin(x):
        heads = x.shape[1] if x.ndim > 1 else None
        return jax.lax.with_sharding_constraint(x, batch_head_spec(mesh, batch, heads))

    return state.replace(layers=jax.tree.map(pin, state.layers), length=pin(state.length))


def per_device(
    fn: Callable, batch: int, kv_heads: int, in_head_axes: Sequence[int | None], out_head_axis: int | tuple[int, ...]
) -> Callable:
    """`fn` run by `shard_map` on each device's block of (sequences, KV heads) under the active mesh;
    `fn` itself without one. Attention is independent per sequence and KV head, so a kernel needs no
    communication: each device runs it on its own rows and heads.

    in_head_axes: per positional argument, the axis holding heads in every leaf of that argument
    (None: batch only, e.g. lengths [B]); out_head_axis: the output's, or a tuple, one per output.
    Query heads are KV-head-major (K * G), so they split with the KV heads, and "model" is used only
    where it divides the KV heads.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn

    def spec(axis: int | None) -> P:
        return batch_head_spec(mesh, batch) if axis is None else batch_head_spec(mesh, batch, kv_heads, axis)

    def run(*args):
        in_specs = tuple(jax.tree.map(lambda _, a=axis: spec(a), arg) for arg, axis in zip(args, in_head_axes))
        out_specs = tuple(map(spec, out_head_axis)) if isinstance(out_head_axis, tuple) else spec(out_head_axis)
        return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)

    return run


def device_kv_bytes(state: Any) -> int:
    """The most bytes of a (sharded) KV state held on any one device: what must fit per accelerator."""
    held: dict = {}
    for leaf in jax.tree_util.tree_leaves(state):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return int(max(held.values(), default=0))
