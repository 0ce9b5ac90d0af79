"""Pallas kernels for kvjax, each with a pure-jnp reference and TPU/GPU lowerings."""

from pallas_kernels.block_masks import (
    DecodeBlockTable,
    DenseCausal,
    PerHead,
    PrefillBlockTable,
    SinkLocal,
    decode_table_from_mask,
    decode_table_from_slots,
    decode_table_top_k,
    decode_table_top_k_pages,
    page_key_bounds,
    page_scores,
    prefill_block_table,
    prefill_chunk_block_table,
    prefill_table_from_blocks,
)
from pallas_kernels.block_sparse_decode import DecodeConfig, block_sparse_decode, block_sparse_decode_reference
from pallas_kernels.block_sparse_prefill import PrefillConfig, block_sparse_prefill, block_sparse_prefill_reference
from pallas_kernels.kv_quant import (
    QuantizedKV,
    check_quantized_kv,
    dequantize_keys,
    dequantize_kv,
    dequantize_values,
    device_bytes,
    empty_quantized_kv,
    pack,
    quantize_keys,
    quantize_kv,
    quantize_values,
    unpack,
    write_quantized,
)
from pallas_kernels.lowering import Lowering
from pallas_kernels.quantized_decode_attention import (
    QuantizedDecodeConfig,
    decode_attention,
    decode_attention_reference,
    quantized_decode_attention,
    quantized_decode_attention_reference,
)

__all__ = [
    "DecodeBlockTable", "DecodeConfig", "DenseCausal", "Lowering", "PerHead", "PrefillBlockTable",
    "PrefillConfig", "QuantizedDecodeConfig", "QuantizedKV", "SinkLocal", "block_sparse_decode",
    "block_sparse_decode_reference", "block_sparse_prefill", "block_sparse_prefill_reference",
    "check_quantized_kv", "decode_attention", "decode_attention_reference",
    "decode_table_from_mask", "decode_table_from_slots", "decode_table_top_k", "decode_table_top_k_pages",
    "dequantize_keys", "dequantize_kv", "dequantize_values", "device_bytes", "empty_quantized_kv",
    "pack", "page_key_bounds", "page_scores", "prefill_block_table", "prefill_chunk_block_table",
    "prefill_table_from_blocks", "quantize_keys", "quantize_kv", "quantize_values",
    "quantized_decode_attention", "quantized_decode_attention_reference", "unpack",
    "write_quantized"
]
