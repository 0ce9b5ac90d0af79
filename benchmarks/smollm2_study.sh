#!/usr/bin/env bash
# The accuracy-vs-memory study on SmolLM2-135M-Instruct (docs/smollm2/study/README.md): RULER-style tasks at
# 2x, 4x and 8x KV compression, 10 prompts per cell, each context compressed without its question (the
# default, OUT) and, for the policies that score the prompt, with it (OUT_query_aware); quantized pruning
# at the ratios that put it at equal bytes with plain pruning. Each (length, mode) is
# one resumable `kvjax eval`: rerunning the script skips the cells already saved and goes on where it stopped.
# Usage: benchmarks/smollm2_study.sh [LENGTH ...]   (default: 1k 2k 4k; OUT=folder, default docs/smollm2/study)
set -euo pipefail
out=${OUT:-docs/smollm2/study}
gates=docs/learned_policies/smollm2/duo/full_attention_heads.tsv
heads=docs/learned_policies/smollm2/locret
common=(--model smollm2-135m-instruct --compression-ratio 0.5,0.75,0.875 --samples 10 --dtype float32 --no-timing
  --tasks niah_single,niah_multikey,niah_multivalue,passkey,vt --resume)
lengths=("$@")
[ ${#lengths[@]} -gt 0 ] || lengths=(1k 2k 4k)
for length in "${lengths[@]}"; do
  kvjax eval "${common[@]}" --lengths "$length" --out "$out" \
    --policies "full,streaming,snapkv,pyramidkv,h2o,tova,knorm,adakv,d2o,locret,duoattention,kivi,kivi(bits=2)" \
    --policy-file "duoattention=$gates" --policy-file "locret=$heads"
  kvjax eval "${common[@]}" --lengths "$length" --out "${out}_query_aware" --query-aware \
    --policies "full,snapkv,pyramidkv,adakv,h2o,tova"
  # quantized pruning: keep more tokens at 4 bits (r0 keeps all), beside plain pruning at equal bytes
  kvjax eval "${common[@]}" --lengths "$length" --out "$out" --compression-ratio 0,0.5,0.75 \
    --policies "quantizedpruning(base=knorm)"
  kvjax eval "${common[@]}" --lengths "$length" --out "${out}_query_aware" --query-aware --compression-ratio 0.5,0.75 \
    --policies "quantizedpruning(base=snapkv)"
done
