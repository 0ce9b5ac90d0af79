"""LESS: eviction plus a learned low-rank state of the evicted entries (the policy, its params, training)."""

from kvjax.policies.less.kernels import PARAMS_FILE, init_params, load_less, save_less, zero_state_params
from kvjax.policies.less.policy import LESS, LESSSegment

__all__ = ["LESS", "LESSSegment", "PARAMS_FILE", "init_params", "load_less", "save_less", "zero_state_params"]
