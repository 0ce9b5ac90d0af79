"""Write a step's keys and values into a segment in the Full layout, then attend over what it holds."""

from __future__ import annotations

import jax

from kvjax.attention import attend
from kvjax.kv_state import KVSegment, write_entries
from kvjax.layer_step import LayerContext, StepInputs


def write_in_place_then_attend(ctx: LayerContext, seg: KVSegment, x: StepInputs) -> tuple[jax.Array, KVSegment]:
    """Writes the step at slot = position (the chunk lands at slots [q_pos[:, 0], + T), padding carrying
    pos -1) and attends over the segment: ([B, T, Hs, G, D], the new segment); x holds seg's heads.

    Entries are never moved or evicted, so prefill chunks may run the block-sparse prefill kernel
    (`attend(..., slot_is_position=True)`).
    """
    seg = write_entries(seg, x.k, x.v, x.new_pos, x.q_pos[:, 0])
    out = attend(x.q, seg.k, seg.v, seg.pos, x.q_pos, ctx.window, ctx.scale, ctx.impl, slot_is_position=True)
    return out, seg
