"""DuoAttention: retrieval heads keep everything, streaming heads a sink and a recent window (the policy,
the authors' gate files for six released models in `patterns/`, MIT, and gate training in `training`)."""

from pathlib import Path

from kvjax.policies.duo_attention.policy import (
    DuoAttention,
    HeadSets,
    quantile_head_sets,
    read_gates_tsv,
    read_pattern_config,
    split_layout,
    write_gates_tsv,
)

PATTERNS = Path(__file__).parent / "patterns"


def released_patterns() -> list[str]:
    """Names of the models whose gates DuoAttention's authors released (shipped with kvjax)."""
    return sorted(p.name for p in PATTERNS.iterdir() if (p / "full_attention_heads.tsv").is_file())


def pattern_file(model: str) -> Path:
    """The released `full_attention_heads.tsv` of `model` (one of `released_patterns()`)."""
    if model not in released_patterns():
        raise ValueError(f"no released DuoAttention pattern for {model!r}; shipped: {', '.join(released_patterns())}")
    return PATTERNS / model / "full_attention_heads.tsv"


__all__ = [
    "PATTERNS",
    "DuoAttention",
    "HeadSets",
    "pattern_file",
    "quantile_head_sets",
    "read_gates_tsv",
    "read_pattern_config",
    "released_patterns",
    "split_layout",
    "write_gates_tsv",
]
