"""DuoAttention: retrieval heads keep everything, streaming heads a sink and a recent window (the policy,
the authors' gate files, and gate training in `training`)."""

from kvjax.policies.duo_attention.policy import (
    DuoAttention, HeadSets, quantile_head_sets, read_gates_tsv, split_layout, write_gates_tsv,
)

__all__ = ["DuoAttention", "HeadSets", "quantile_head_sets", "read_gates_tsv", "split_layout", "write_gates_tsv"]
