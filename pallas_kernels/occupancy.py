"""How many programs a decode grid launches: flash-decoding's split of each sequence's cache.

At batch 1 a decode grid of (sequence, KV head) programs is 8 programs for Llama's 8 KV heads,
which leaves 124 of an H100's 132 SMs idle while the cache streams through 8. Cutting each row
into splits, merged afterwards by log-sum-exp, fills the GPU. A TPU runs its grid in sequence
on one or two TensorCores, where splits only add combine work.
"""

from __future__ import annotations

import jax

PROGRAMS_PER_PROCESSOR = 2  # a second resident program hides the first one's load latency
H100_SMS = 132  # where the runtime does not report a GPU's count


def gpu_processors(interpret: object = False) -> int | None:
    """The default device's streaming multiprocessors when it is a GPU that runs the kernel
    compiled (None on TPU, CPU, or when interpreting)."""
    device = jax.devices()[0]
    if interpret or device.platform != "gpu":
        return None
    return int(getattr(device, "core_count", 0) or H100_SMS)


def decode_splits(rows: int, entries: int, min_entries: int, processors: int | None) -> int:
    """Splits per row for `rows` (sequence, KV head) rows of `entries` blocks each: enough for
    PROGRAMS_PER_PROCESSOR programs per processor, no split shorter than `min_entries` blocks
    (each costs a partial result to merge), and 1 without a GPU."""
    if processors is None:
        return 1
    wanted = -(-PROGRAMS_PER_PROCESSOR * processors // rows)
    return max(1, min(wanted, entries // min_entries))
