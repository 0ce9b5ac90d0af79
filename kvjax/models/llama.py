"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Phi-3) as Flax NNX modules.

The KV cache is never stored in a module: each attention layer takes its layer's KV segments in
and returns the updated segments, so the hot path stays a pure function of (params, state).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx, struct

from kvjax.attention import attend
from kvjax.config import ModelConfig
from kvjax.layer_step import LayerContext, StepInputs
from kvjax.rope import apply_rope, rope_tables

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

# What the model calls per layer with a cache: the policy's `layer_step` for the current phase,
# (LayerContext, layer state, shared state, StepInputs) -> (output [B, T, K, G, D], layer state, shared).
LayerFn = Callable[[LayerContext, Any, Any, StepInputs], tuple[jax.Array, Any, Any]]
# What the model calls where a prefill drops tokens before `layer` (a policy's `Policy.prune`):
# (layer, tokens that continue n, positions int32[B, T], valid bool[B, T], shared) ->
# (int32[B, n] indices of the continuing tokens, bool[B, n] which of them stay valid, the new shared).
PruneFn = Callable[[int, int, jax.Array, jax.Array, Any], tuple[jax.Array, jax.Array, Any]]


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, fan_in: int) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype) * fan_in**-0.5)


class RMSNorm(nnx.Module):
    """Root-mean-square norm, computed in float32 and cast back (as the reference implementations)."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with rotary embeddings and optional q/k/v and output biases."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        e, h, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.config = config
        self.q_proj = _param(rngs, (e, h, d), dtype, e)  # [E, H, D]
        self.k_proj = _param(rngs, (e, k, d), dtype, e)  # [E, K, D]
        self.v_proj = _param(rngs, (e, k, d), dtype, e)  # [E, K, D]
        self.o_proj = _param(rngs, (h, d, e), dtype, h * d)  # [H, D, E]
        if config.qkv_bias:
            self.q_bias = nnx.Param(jnp.zeros((h, d), dtype))
            self.k_bias = nnx.Param(jnp.zeros((k, d), dtype))
            self.v_bias = nnx.Param(jnp.zeros((k, d), dtype))
        if config.o_bias:
            self.o_bias = nnx.Param(jnp.zeros((e,), dtype))

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B, T, H, D], k and v [B, T, K, D], before rotary embedding."""
        q = jnp.einsum("bte,ehd->bthd", x, self.q_proj[...])
        k = jnp.einsum("bte,ekd->btkd", x, self.k_proj[...])
        v = jnp.einsum("bte,ekd->btkd", x, self.v_proj[...])
        if self.config.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        return q, k, v

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        valid: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        ctx: LayerContext,
        segments: Any,
        shared: Any,
        layer_fn: LayerFn | None,
    ) -> tuple[jax.Array, Any, Any]:
        """Output [B, T, E], the layer's new state and the new shared state. Without a cache
        (`layer_fn` None) the chunk attends causally to itself."""
        cfg = self.config
        b, t, _ = x.shape
        q_raw, k_raw, v = self.project(x)
        q, k = apply_rope(q_raw, *rope), apply_rope(k_raw, *rope)
        grouped = "b t (k g) d -> b t k g d"  # query head h = k * G + g attends with KV head k
        new_pos = jnp.where(valid, positions, -1)  # [B, T]
        if layer_fn is None:
            k_pos = jnp.broadcast_to(new_pos[:, None, :], (b, cfg.num_kv_heads, t))  # [B, K, T]
            out = attend(
                rearrange(q, grouped, k=cfg.num_kv_heads),
                rearrange(k, "b t k d -> b k t d"),
                rearrange(v, "b t k d -> b k t d"),
                k_pos,
                positions,
                ctx.window,
                ctx.scale,
                ctx.impl,
            )
        else:
            inputs = StepInputs(
                q=rearrange(q, grouped, k=cfg.num_kv_heads),
                k=k,
                v=v,
                q_raw=rearrange(q_raw, grouped, k=cfg.num_kv_heads),
                k_raw=k_raw,
                q_pos=positions,
                new_pos=new_pos,
            )
            out, segments, shared = layer_fn(ctx, segments, shared, inputs)
        # One contracting axis (H * D): with two, XLA's CPU dots transposed the [H, D, E] weight on every call.
        out = jnp.einsum(
            "btf,fe->bte", rearrange(out, "b t k g d -> b t (k g d)"), rearrange(self.o_proj[...], "h d e -> (h d) e")
        )
        if cfg.o_bias:
            out = out + self.o_bias[...]
        return out, segments, shared


class MLP(nnx.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        e, f = config.hidden_size, config.intermediate_size
        self.act = ACTIVATIONS[config.hidden_act]
        self.gate_proj = _param(rngs, (e, f), dtype, e)  # [E, F]
        self.up_proj = _param(rngs, (e, f), dtype, e)  # [E, F]
        self.down_proj = _param(rngs, (f, e), dtype, f)  # [F, E]
        self.bias = config.mlp_bias
        if config.mlp_bias:
            self.gate_bias = nnx.Param(jnp.zeros((f,), dtype))
            self.up_bias = nnx.Param(jnp.zeros((f,), dtype))
            self.down_bias = nnx.Param(jnp.zeros((e,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = jnp.einsum("bte,ef->btf", x, self.gate_proj[...])
        up = jnp.einsum("bte,ef->btf", x, self.up_proj[...])
        if self.bias:
            gate, up = gate + self.gate_bias[...], up + self.up_bias[...]
        out = jnp.einsum("btf,fe->bte", self.act(gate) * up, self.down_proj[...])
        return out + self.down_bias[...] if self.bias else out


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)). Every block of a model has
    the same graph, so runs of blocks can be scanned over stacked parameters."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attn = Attention(config, dtype, rngs)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)

    def __call__(self, x, positions, valid, rope, ctx, segments, shared, layer_fn):
        attn_out, segments, shared = self.attn(
            self.input_norm(x), positions, valid, rope, ctx, segments, shared, layer_fn
        )
        x = x + attn_out
        return x + self.mlp(self.post_attention_norm(x)), segments, shared


def layer_runs(
    config: ModelConfig, cache: tuple | None, tokens: tuple[int, ...] | None = None
) -> tuple[tuple[int, int], ...]:
    """[start, stop) ranges of consecutive layers that share a sliding window, a state layout (pytree
    structure, static fields, leaf shapes and dtypes) and the tokens they compute (`tokens`, per layer,
    or None: all): each runs as one `lax.scan`."""

    def key(i: int):
        computed = None if tokens is None else tokens[i]
        if cache is None:
            return config.sliding_window(i), computed
        leaves, treedef = jax.tree.flatten(cache[i])
        return config.sliding_window(i), computed, treedef, tuple((x.shape, x.dtype) for x in leaves)

    runs, start = [], 0
    for i in range(1, config.num_layers + 1):
        if i == config.num_layers or key(i) != key(start):
            runs.append((start, i))
            start = i
    return tuple(runs)


def _stack(trees: list) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@struct.dataclass(frozen=True)
class LayerStack:
    """How a forward runs its layers: `runs` ([start, stop) ranges, static) and, per run of more than
    one layer, its blocks' parameters stacked on a new leading axis (None for a single layer).

    Built once outside a loop (prefill's chunks, decode's tokens) so the stacking is not repeated per
    step; it holds a second copy of the scanned blocks' weights while it lives. `tokens` (static): per
    layer, how many of the chunk's tokens it computes (`Policy.prefill_tokens`), or None: all of them."""

    runs: tuple[tuple[int, int], ...] = struct.field(pytree_node=False)
    params: tuple[Any, ...]
    tokens: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)


class Transformer(nnx.Module):
    """Token embedding, decoder blocks, final norm and the output projection."""

    def __init__(self, config: ModelConfig, dtype=jnp.bfloat16, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Param(
            jax.random.normal(rngs.params(), (config.vocab_size, config.hidden_size)).astype(dtype)
        )  # [V, E]
        self.blocks = nnx.List([Block(config, dtype, rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), dtype, config.hidden_size)

    def layer_stack(
        self, cache: tuple | None, scan_layers: bool = True, tokens: tuple[int, ...] | None = None
    ) -> LayerStack:
        """The runs of layers sharing a layout in `cache` and a count of computed `tokens` (one run per
        layer when `scan_layers` is False) and their stacked block parameters."""
        if tokens is not None and (
            len(tokens) != self.config.num_layers or any(b > a for a, b in zip(tokens, tokens[1:])) or min(tokens) < 1
        ):
            raise ValueError(f"tokens per layer must be {self.config.num_layers} positive, non-increasing counts")
        if scan_layers:
            runs = layer_runs(self.config, cache, tokens)
        else:
            runs = tuple((i, i + 1) for i in range(self.config.num_layers))
        params = tuple(
            None if stop - start == 1 else _stack([nnx.split(self.blocks[i])[1] for i in range(start, stop)])
            for start, stop in runs
        )
        return LayerStack(runs=runs, params=params, tokens=tokens)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        valid: jax.Array,
        cache: tuple | None = None,
        layer_fn: LayerFn | None = None,
        *,
        shared: Any = None,
        seq_len: jax.Array | None = None,
        attention_impl: str = "auto",
        stack: LayerStack | None = None,
        prune: PruneFn | None = None,
    ) -> tuple[jax.Array, tuple | None, Any]:
        """Final-normed hidden states [B, T, E] for tokens int32[B, T] at positions int32[B, T], the new
        per-layer cache and the new shared state.

        `valid` bool[B, T] marks real tokens (padding is never written to the cache nor attended).
        With a cache (per layer, its state), `layer_fn` (the policy's step) writes and attends.
        `seq_len` is the sequence length this call belongs to (it picks LongRoPE's factors); by
        default the largest real position plus one, which is right for a single forward. Runs of
        identically laid-out layers run under one `lax.scan`, so compile time does not grow with
        depth; `stack` (`layer_stack`, default: built here) says which.

        Where `stack.tokens` drops from one layer to the next (a prefill that prunes tokens between
        layers), `prune` picks the n tokens that continue; their hidden states, positions (so RoPE
        rotates each at its own) and validity are gathered, and later layers compute only those. The
        returned hidden states are then zero at the tokens pruned before the last layer.
        """
        cfg = self.config
        stack = self.layer_stack(cache) if stack is None else stack
        x = self.embed[...][tokens]  # [B, T, E]
        if seq_len is None:
            seq_len = jnp.max(jnp.where(valid, positions + 1, 0))
        rope = rope_tables(cfg.rope, cfg.head_dim, positions, seq_len)
        scale = cfg.head_dim**-0.5
        layers = [None] * cfg.num_layers if cache is None else list(cache)
        b, t = tokens.shape
        origin = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T_l]: each row's index in the chunk
        for (start, stop), params in zip(stack.runs, stack.params):
            if stack.tokens is not None and stack.tokens[start] < x.shape[1]:
                if prune is None:
                    raise ValueError("a layer stack that drops tokens between layers needs a `prune` function")
                idx, keep, shared = prune(start, stack.tokens[start], positions, valid, shared)  # [B, n] x 2
                x = jnp.take_along_axis(x, idx[:, :, None], axis=1)  # [B, n, E]
                positions, origin = (jnp.take_along_axis(a, idx, axis=1) for a in (positions, origin))
                valid = jnp.take_along_axis(valid, idx, axis=1) & keep
                rope = rope_tables(cfg.rope, cfg.head_dim, positions, seq_len)
            ctx = functools.partial(LayerContext, window=cfg.sliding_window(start), scale=scale, impl=attention_impl)
            if params is None:
                x, layers[start], shared = self.blocks[start](
                    x, positions, valid, rope, ctx(start), layers[start], shared, layer_fn
                )
                continue
            graphdef = nnx.split(self.blocks[start])[0]

            def body(carry, xs, graphdef=graphdef, ctx=ctx, positions=positions, valid=valid, rope=rope):
                h, shared = carry
                block_params, state, index = xs
                h, state, shared = nnx.merge(graphdef, block_params)(
                    h, positions, valid, rope, ctx(index), state, shared, layer_fn
                )
                return (h, shared), state

            run_state = None if cache is None else _stack(layers[start:stop])
            indices = jnp.arange(start, stop, dtype=jnp.int32)
            (x, shared), run_state = jax.lax.scan(body, (x, shared), (params, run_state, indices))
            if cache is not None:
                layers[start:stop] = [jax.tree.map(lambda a, j=j: a[j], run_state) for j in range(stop - start)]
        if x.shape[1] < t:  # back to the chunk's rows, zero where a token was pruned
            x = jnp.zeros((b, t, x.shape[2]), x.dtype).at[jnp.arange(b)[:, None], origin].set(x)
        return self.final_norm(x), None if cache is None else tuple(layers), shared

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32[..., V] next-token logits from final-normed hidden states [..., E]."""
        head = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]  # [E, V]
        return jnp.einsum("...e,ev->...v", hidden, head, preferred_element_type=jnp.float32)
