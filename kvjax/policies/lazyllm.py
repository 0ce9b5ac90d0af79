"""LazyLLM (Fu et al., 2024): the prefill stops computing the tokens the last token ignores.

At each pruning layer l, a token's importance is the attention the prompt's last token paid it in layer
l - 1, averaged over the query heads (the paper's s_i^l); the `percentiles[i]` share of the layer's tokens
with the lowest importance (the per-layer top-k percentile) is not computed by l nor by any later layer of
the forward, so pruning is progressive and the time to first token falls. The last token is always kept.
The paper releases no code nor one default schedule (it sweeps layers and percentiles); kvjax's default
prunes 30%, 40% and 50% of the remaining tokens at a quarter, half and three quarters of the depth.

Restricted on purpose: pruned tokens are never revived (no auxiliary cache): decoding attends, in each layer,
to the prompt tokens that layer computed, and appends.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kvjax.policies.prefill_pruning import PrefillPruning


@dataclasses.dataclass(frozen=True)
class LazyLLM(PrefillPruning):
    """Prunes, at layers `depths` x L, the `percentiles` share of the tokens the last token attends to least
    in the layer before; later layers of the prefill never compute them. Pruned tokens are not revived
    (the paper's auxiliary cache and revival are not implemented): decoding sees each layer's kept tokens."""

    depths: tuple[float, ...] = (0.25, 0.5, 0.75)  # where pruning happens, as fractions of the depth
    percentiles: tuple[float, ...] = (0.3, 0.4, 0.5)  # share of a pruning layer's incoming tokens dropped

    def __post_init__(self):
        if len(self.depths) != len(self.percentiles) or not self.depths:
            raise ValueError(
                f"LazyLLM needs one percentile per pruning depth; got {len(self.depths)} depths, "
                f"{len(self.percentiles)} percentiles"
            )
        if any(not 0 < d < 1 for d in self.depths) or list(self.depths) != sorted(set(self.depths)):
            raise ValueError(f"LazyLLM depths must be increasing fractions in (0, 1); got {self.depths}")
        if any(not 0 <= p < 1 for p in self.percentiles):
            raise ValueError(f"LazyLLM percentiles (the share pruned) must lie in [0, 1); got {self.percentiles}")

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers whose input is pruned: int(depth x L), at least 1."""
        layers = tuple(max(1, int(d * num_layers)) for d in self.depths)
        if len(set(layers)) != len(layers):
            raise ValueError(f"LazyLLM depths {self.depths} name the same layer twice in a {num_layers}-layer model")
        return layers

    def windows(self, lengths):
        return np.ones(np.shape(lengths), np.int64)  # the last token

    def layer_tokens(self, num_layers, lengths):
        n = np.asarray(lengths, np.int64)
        pruned_at = dict(zip(self.prune_layers(num_layers), self.percentiles))
        rows = [n]
        for layer in range(1, num_layers):
            rows.append(rows[-1] - np.floor(rows[-1] * pruned_at.get(layer, 0.0)).astype(np.int64))
        return np.stack(rows)
