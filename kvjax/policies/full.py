"""Full: no compression; every token's keys and values are kept, slot index = token position."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from kvjax.cached_attention import write_in_place_then_attend
from kvjax.kv_state import position_capacity
from kvjax.policies.base import Layout, Policy, SegmentSpec


@dataclasses.dataclass(frozen=True)
class Full(Policy):
    """Keeps everything: the reference every other policy is compared with."""

    prefills_in_place: ClassVar[bool] = True

    def layout(self, config, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        heads = tuple(range(config.num_kv_heads))
        return ((SegmentSpec(heads, position_capacity(prompt_len + max_new_tokens)),),) * config.num_layers

    def decode_room(self, config, prompt_len: int, max_new_tokens: int) -> int:
        """Slot = position: every slot the capacity rounds up to holds a further token."""
        return position_capacity(prompt_len + max_new_tokens) - prompt_len

    def segment_step(self, ctx, segment, x, phase):
        return write_in_place_then_attend(ctx, segment, x)
