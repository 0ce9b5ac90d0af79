"""PyramidInfer (Yang et al., 2024): layer by layer, the prefill keeps the context the recent tokens attend to.

The prefill rule of the authors' code (mutonix/pyramidinfer, `models/modeling_llama_pyramidinfer.py`, defaults
from `configs/llama2_7b.json`), for a prompt of n tokens and L layers:
    R = int(n * recent_ratio);  the last 1 + R tokens are the recent window, the rest the context (c = n - 1 - R);
    m = min(min_context, c);    after layer l (0-based), with r_l = (1 - d) (cos(pi l / L) + 1) / 2 + d,
    if c > m and r_l < 1 and int(c * r_l) > m:  the next layers keep the int(c * r_l) context tokens of highest
    score (plus the recent window), c <- int(c * r_l); otherwise they keep all of them.
A context token's score is layer l's attention from the recent window's queries, averaged over the query heads,
weighted linearly 1 .. distance_weight from the first recent query to the last and averaged over them; the first
`sinks` tokens are always kept. Layer l's cache holds the tokens that entered it, so it shrinks with depth.

Deviations, on purpose: decoding appends (the authors also compress the cache every 16 generated tokens, their
generation stage); the whole prompt is one prefill chunk (chunked prefill is refused).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from kvjax.policies.prefill_pruning import PrefillPruning


@dataclasses.dataclass(frozen=True)
class PyramidInfer(PrefillPruning):
    """Prunes the prefill's context between layers to the tokens its recent window attends to most, by a keep
    ratio that falls from 1 to `decay_ratio` with depth (cosine); later layers compute, and cache, only those.
    Decoding appends (the authors' generation-stage compression is not implemented)."""

    recent_ratio: float = 0.2  # the authors' defaults (configs/llama2_7b.json, prefill_stage)
    decay_ratio: float = 0.9
    min_context: int = 64
    sinks: int = 4
    distance_weight: float = 1.2

    def __post_init__(self):
        if not 0 <= self.recent_ratio < 1:
            raise ValueError(f"PyramidInfer recent_ratio must lie in [0, 1); got {self.recent_ratio}")
        if not 0 < self.decay_ratio <= 1:
            raise ValueError(
                f"PyramidInfer decay_ratio (the deepest layer's keep ratio) must lie in (0, 1]; got {self.decay_ratio}"
            )
        if self.min_context < 0 or self.sinks < 0 or self.distance_weight <= 0:
            raise ValueError(
                "PyramidInfer needs min_context >= 0, sinks >= 0 and distance_weight > 0; got "
                f"{self.min_context}, {self.sinks}, {self.distance_weight}"
            )

    def keep_ratio(self, layer: int, num_layers: int) -> float:
        """r_l: the share of its context that layer `layer` passes on (cosine from 1 down to decay_ratio)."""
        d = self.decay_ratio
        return (1.0 - d) * (math.cos(math.pi * layer / num_layers) + 1) / 2 + d

    def windows(self, lengths):
        n = np.asarray(lengths, np.int64)
        return 1 + np.floor(n * self.recent_ratio).astype(np.int64)

    def layer_tokens(self, num_layers, lengths):
        n = np.asarray(lengths, np.int64)
        window = self.windows(n)
        context = n - window
        floor = np.minimum(self.min_context, context)
        rows = [n]
        for layer in range(num_layers - 1):
            ratio = self.keep_ratio(layer, num_layers)
            kept = np.floor(context * ratio).astype(np.int64)
            context = np.where((context > floor) & (ratio < 1.0) & (kept > floor), kept, context)
            rows.append(context + window)
        return np.stack(rows)
