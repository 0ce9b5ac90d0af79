"""PyramidKV (Cai et al., 2024): SnapKV's selection with layer budgets that shrink with depth.

Lower layers attend broadly and upper layers attend to a few tokens, so the schedule is arithmetic
from the bottom up, as in the authors' `PyramidKVCluster.update_kv` (Zefan-Cai/KVCache-Factory,
pyramidkv/pyramidkv_utils.py), with C = budget_tokens, W = window, S = C - W the average selected
tokens and n the prompt's length:
    top    = S // beta
    bottom = 2 * S - top;  if bottom >= n - W: bottom = n - W, top = 2 * S - bottom
    step   = (bottom - top) // (L - 1)
    layer l keeps bottom - l * step selected tokens plus the observation window,
except for short prompts: n < C keeps the whole prompt, and n < 2 * S gives every layer SnapKV's
budget C. The floor in `step` makes the total L * S plus at most (L - 1) * L / 2 tokens, as the
authors' code does. The budgets depend on each row's own prompt length (batches are ragged); a
layer's buffer is the largest budget the batch's longest prompt can need, so a row much shorter
than the longest keeps at most that in each layer (the one deviation, for ragged batches only).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from kvjax.kv_state import KVState, keep_top, round_capacity
from kvjax.policies.snapkv import SnapKV


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV's observation-window votes (pooled), with per-layer budgets shrinking arithmetically
    with depth around the average `budget_tokens`; prompts shorter than 2 x (budget - window) keep
    SnapKV's budget in every layer, as the authors' code. Compresses the prompt only: decoding appends."""

    # The authors' released LongBench runs (KVCache-Factory run_longbench.py): window 8, kernel 7, max
    # pooling (their PyramidKVCluster's own defaults, window 64, kernel 5, avg, are overridden there).
    budget_tokens: int = 1024
    window: int = 8
    kernel: int = 7
    pooling: str = "max"
    beta: int = 20

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.beta, int) or isinstance(self.beta, bool) or self.beta < 1:
            raise ValueError(f"PyramidKV beta must be an int >= 1; got {self.beta!r}")

    def budgets_for(self, num_layers: int, lengths) -> np.ndarray:
        """int[L, N]: tokens kept per KV head in each layer (window included) for prompts of each of the
        `lengths` int[N], by the authors' rule (the whole prompt, SnapKV's budget, or the pyramid)."""
        n = np.asarray(lengths, np.int64)
        c, w = self.budget_tokens, self.window
        selected = c - w
        if num_layers == 1:
            pyramid = np.full((1, n.size), c)
        else:
            top = np.full(n.shape, selected // self.beta)
            bottom = 2 * selected - top
            short = bottom >= n - w  # the authors shrink the bottom layer to what the prompt holds
            bottom = np.where(short, n - w, bottom)
            top = np.where(short, 2 * selected - bottom, top)
            step = (bottom - top) // (num_layers - 1)
            pyramid = bottom[None] - np.arange(num_layers)[:, None] * step[None] + w  # [L, N]
        out = np.where(n < 2 * selected, c, pyramid)  # shorter than 2 S: SnapKV's budget everywhere
        return np.where(n < c, n, out)  # shorter than the budget: everything

    def layer_budgets(self, num_layers: int) -> tuple[int, ...]:
        """Tokens kept per KV head in each layer (window included), bottom layer first, for prompts long
        enough for the pyramid (at least 2 x (budget - window) + the bottom layer's share)."""
        long = 2 * self.budget_tokens + self.window  # past the short-prompt rule and the bottom layer's shrinking
        return tuple(int(b) for b in self.budgets_for(num_layers, [long])[:, 0])

    def budget(self, config, layer):
        return self.layer_budgets(config.num_layers)[layer]

    def layout(self, config, prompt_len, max_new_tokens, chunk):
        """SnapKV's layout, each layer's budget the largest its rule gives the batch's longest prompt,
        which the chunked prompt of `prompt_len` padded tokens puts in (prompt_len - chunk, prompt_len]."""
        lengths = np.arange(max(1, prompt_len - chunk + 1), prompt_len + 1)
        most = self.budgets_for(config.num_layers, lengths).max(axis=1)  # [L]
        layout = super().layout(config, prompt_len, max_new_tokens, chunk)
        return tuple(
            tuple(dataclasses.replace(spec, budget=int(b)) for spec in layer) for layer, b in zip(layout, most)
        )

    def finalize(self, config, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """Each row keeps its own prompt length's budget (`budgets_for`), at most the layer's buffer."""
        table = jnp.asarray(self.budgets_for(config.num_layers, np.arange(prompt_len + 1)), jnp.int32)  # [L, T+1]
        layers = []
        for layer, segments in enumerate(state.layers):
            keep = table[layer][jnp.minimum(state.length, prompt_len)]  # int32[B]
            resized = []
            for seg in segments:
                priority = jnp.where(seg.pos >= 0, self.priority(seg), -jnp.inf)
                rank = jnp.argsort(jnp.argsort(-priority, axis=-1, stable=True), axis=-1, stable=True)
                priority = jnp.where(rank < keep[:, None, None], priority, -jnp.inf)
                capacity = round_capacity(min(seg.budget, prompt_len) + max_new_tokens)
                resized.append(keep_top(seg, priority, seg.budget, capacity))
            layers.append(tuple(resized))
        return state.replace(layers=tuple(layers))
