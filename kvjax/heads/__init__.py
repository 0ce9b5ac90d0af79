"""Head detectors: which attention heads retrieve (RazorAttention's probe, the retrieval score)."""

from kvjax.heads.razor_heads import identify_retrieval_heads, probe_scores, probe_tokens, select_retrieval_heads
from kvjax.heads.retrieval_score import (
    NeedleTest,
    copy_paste_scores,
    haystack_tests,
    kv_head_sets,
    needle_test,
    per_test_scores,
    retrieval_heads,
    retrieval_scores,
)

__all__ = [
    "NeedleTest",
    "copy_paste_scores",
    "haystack_tests",
    "identify_retrieval_heads",
    "kv_head_sets",
    "needle_test",
    "probe_scores",
    "probe_tokens",
    "retrieval_heads",
    "retrieval_scores",
    "select_retrieval_heads",
    "per_test_scores",
]
