"""A software pipeline of hand-issued TPU DMAs: a ring of VMEM stages, the next ones in flight
while one is consumed. The decode kernels whose K/V stay in HBM loop through it, so their work
follows the tokens they read rather than a grid step per block (a fixed cost each, even empty)."""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.experimental import pallas as pl

StageFn = Callable[[jax.Array, jax.Array], None]  # (stage index, ring slot) -> None


def ring_pipeline(num_groups: jax.Array, ring_depth: int, start: StageFn, wait: StageFn, consume: StageFn) -> None:
    """Runs consume(i, slot) for i in [0, num_groups), each after wait(i, slot), slot = i % ring_depth.

    start(i, slot) issues stage i's copies ring_depth - 1 stages ahead, into the slot that stage
    i - 1 has just freed, so a slot is never written while it is read. num_groups may be traced
    (a program's share of a length); ring_depth >= 2 is static.
    """
    if ring_depth < 2:
        raise ValueError(f"a DMA ring needs at least 2 stages, got {ring_depth}")

    def fetch(i):
        @pl.when(i < num_groups)
        def _start():
            start(i, i % ring_depth)

    for i in range(ring_depth - 1):  # prologue: the first stages in flight
        fetch(i)

    def body(i, carry):
        fetch(i + ring_depth - 1)
        slot = i % ring_depth
        wait(i, slot)
        consume(i, slot)
        return carry

    jax.lax.fori_loop(0, num_groups, body, 0)
