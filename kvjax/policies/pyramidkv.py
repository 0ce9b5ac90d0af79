"""PyramidKV (Cai et al., 2024): SnapKV's selection with layer budgets that shrink with depth.

Lower layers attend broadly and upper layers attend to a few tokens, so the schedule is arithmetic
from the bottom up, as in the authors' `PyramidKVCluster.update_kv` (Zefan-Cai/PyramidKV,
pyramidkv/pyramidkv_utils.py), with S = budget_tokens - window the average selected tokens:
    top    = S // beta
    bottom = 2 * S - top
    step   = (bottom - top) // (L - 1)
    layer l keeps bottom - l * step selected tokens plus the observation window.
The floor in `step` makes the total L * S plus at most (L - 1) * L / 2 tokens, as the authors'
code does. Their code also re-balances the schedule when the bottom layer would exceed a short
prompt; kvjax's budgets are static per model (batches are ragged), so a short prompt instead keeps
all of itself in the layers whose budget covers it.
"""

from __future__ import annotations

import dataclasses

from kvjax.policies.snapkv import SnapKV


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV's observation-window votes (pooled), with per-layer budgets shrinking arithmetically
    with depth around the average `budget_tokens`. Compresses the prompt only: decoding appends."""

    # Defaults of the authors' PyramidKVCluster: window 64, kernel 5, avg pooling, beta 20.
    budget_tokens: int = 1024
    window: int = 64
    kernel: int = 5
    pooling: str = "avg"
    beta: int = 20

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.beta, int) or isinstance(self.beta, bool) or self.beta < 1:
            raise ValueError(f"PyramidKV beta must be an int >= 1; got {self.beta!r}")

    def layer_budgets(self, num_layers: int) -> tuple[int, ...]:
        """Tokens kept per KV head in each layer (window included), bottom layer first."""
        selected = self.budget_tokens - self.window
        if num_layers == 1:
            return (self.budget_tokens,)
        top = selected // self.beta
        bottom = 2 * selected - top
        step = (bottom - top) // (num_layers - 1)
        return tuple(bottom - layer * step + self.window for layer in range(num_layers))

    def budget(self, config, layer):
        return self.layer_budgets(config.num_layers)[layer]
