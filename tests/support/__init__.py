"""Helpers the tests share: references, fixtures' builders, and the crash-rerun plugin."""
