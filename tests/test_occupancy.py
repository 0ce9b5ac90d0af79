"""The decode split count against flash-decoding's rule, worked out by hand."""

import jax

from pallas_kernels.occupancy import decode_splits, gpu_processors


def test_decode_splits_fill_the_gpu_twice_without_short_splits():
    # Llama's 8 KV heads at batch 1 on an H100: 2 * 132 programs need 33 splits per head.
    assert decode_splits(rows=8, entries=2048, min_entries=4, processors=132) == 33
    # ... unless the table is short: 20 entries give at most 5 splits of 4.
    assert decode_splits(rows=8, entries=20, min_entries=4, processors=132) == 5
    # Batch 64 already fills it; a table shorter than one split still gets one.
    assert decode_splits(rows=512, entries=2048, min_entries=4, processors=132) == 1
    assert decode_splits(rows=8, entries=2, min_entries=4, processors=132) == 1
    # No GPU (TPU, CPU, interpreting): one split.
    assert decode_splits(rows=8, entries=2048, min_entries=4, processors=None) == 1


def test_gpu_processors_only_for_compiled_gpu_kernels():
    assert gpu_processors(interpret=True) is None
    if jax.devices()[0].platform == "gpu":
        assert gpu_processors() >= 1
    else:
        assert gpu_processors() is None
