"""Compression policies: each a frozen dataclass of hyperparameters with pure functions."""

from kvjax.policies.base import Layout, Policy
from kvjax.policies.full import Full

__all__ = ["Full", "Layout", "Policy"]
