"""Long-context evaluation: RULER-style tasks, haystacks and the `kvjax eval` harness."""
