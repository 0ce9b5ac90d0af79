"""Compression policies: each a frozen dataclass of hyperparameters with pure functions."""

from kvjax.policies.base import Layout, Policy, SegmentSpec
from kvjax.policies.full import Full
from kvjax.policies.h2o import H2O
from kvjax.policies.snapkv import SnapKV
from kvjax.policies.streaming_llm import StreamingLLM
from kvjax.policies.token_eviction import TokenEviction

__all__ = ["Full", "H2O", "Layout", "Policy", "SegmentSpec", "SnapKV", "StreamingLLM", "TokenEviction"]

from kvjax.policies.kivi import KIVI  # noqa: E402

__all__ += ["KIVI"]

from kvjax.policies.a2sf import A2SF  # noqa: E402
from kvjax.policies.adakv import AdaKV  # noqa: E402
from kvjax.policies.knorm import Knorm  # noqa: E402
from kvjax.policies.pyramidkv import PyramidKV  # noqa: E402
from kvjax.policies.tova import TOVA  # noqa: E402
from kvjax.policies.vatp import VATP  # noqa: E402

__all__ += ["A2SF", "AdaKV", "Knorm", "PyramidKV", "TOVA", "VATP"]

from kvjax.policies.duo_attention import DuoAttention  # noqa: E402
from kvjax.policies.razor_attention import RazorAttention  # noqa: E402

__all__ += ["DuoAttention", "RazorAttention"]
