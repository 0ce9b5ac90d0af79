"""Compression policies: each a frozen dataclass of hyperparameters with pure functions."""

from kvjax.policies.a2sf import A2SF
from kvjax.policies.adakv import AdaKV
from kvjax.policies.base import Layout, Policy, SegmentSpec
from kvjax.policies.cskv import CSKV
from kvjax.policies.d2o import D2O
from kvjax.policies.duo_attention import DuoAttention
from kvjax.policies.full import Full
from kvjax.policies.h2o import H2O
from kvjax.policies.kivi import KIVI
from kvjax.policies.knorm import Knorm
from kvjax.policies.lazyllm import LazyLLM
from kvjax.policies.less import LESS
from kvjax.policies.locret import Locret
from kvjax.policies.lserve import LServe
from kvjax.policies.mikv import MiKV
from kvjax.policies.minicache import MiniCache
from kvjax.policies.prompt_svd import PromptSVD
from kvjax.policies.pyramidinfer import PyramidInfer
from kvjax.policies.pyramidkv import PyramidKV
from kvjax.policies.quantized_pruning import QuantizedPruning
from kvjax.policies.quest import Quest
from kvjax.policies.razor_attention import RazorAttention
from kvjax.policies.snapkv import SnapKV
from kvjax.policies.squeezed_attention import SqueezedAttention
from kvjax.policies.streaming_llm import StreamingLLM
from kvjax.policies.think import ThinK
from kvjax.policies.token_eviction import TokenEviction
from kvjax.policies.tova import TOVA
from kvjax.policies.twilight import Twilight
from kvjax.policies.vatp import VATP

__all__ = [
    "A2SF",
    "AdaKV",
    "CSKV",
    "D2O",
    "DuoAttention",
    "Full",
    "H2O",
    "KIVI",
    "Knorm",
    "Layout",
    "LESS",
    "LazyLLM",
    "LServe",
    "Locret",
    "MiKV",
    "MiniCache",
    "Policy",
    "PromptSVD",
    "PyramidInfer",
    "PyramidKV",
    "QuantizedPruning",
    "Quest",
    "RazorAttention",
    "SegmentSpec",
    "SnapKV",
    "SqueezedAttention",
    "StreamingLLM",
    "TOVA",
    "ThinK",
    "TokenEviction",
    "Twilight",
    "VATP",
]
