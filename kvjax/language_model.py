"""A loaded model: its config, the split NNX graph and parameters, and its tokenizer."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.config import ModelConfig
from kvjax.models import Transformer


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """What `kvjax.load` returns. The model is split once (`nnx.split`) so jitted functions take
    (graphdef, params) as plain arguments: graphdef is static and hashable, params a pytree."""

    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Any = None  # kvjax.tokenizer.Tokenizer, when the checkpoint ships one
    name: str = ""
    mesh: jax.sharding.Mesh | None = None  # where params live, sharded (kvjax.sharding); None: one device

    @property
    def dtype(self):
        return jax.tree.leaves(self.params)[0].dtype

    def module(self) -> Transformer:
        """The NNX module (for training or inspection); inference paths merge inside jit instead."""
        return nnx.merge(self.graphdef, self.params)

    def with_config(self, config: ModelConfig) -> LanguageModel:
        """The same parameters under another config of identical shapes (the graphdef carries the
        config the jitted paths see, so both change together)."""
        graphdef = abstract_model(config, self.dtype).graphdef
        return dataclasses.replace(self, config=config, graphdef=graphdef)

    def astype(self, dtype) -> LanguageModel:
        params = jax.tree.map(lambda x: x.astype(dtype), self.params)
        return dataclasses.replace(self, params=params)


def init_model(config: ModelConfig, seed: int = 0, dtype=jnp.bfloat16, tokenizer=None) -> LanguageModel:
    """A randomly initialised model (for tests, benchmarks and training from scratch)."""
    graphdef, params = nnx.split(Transformer(config, dtype, rngs=nnx.Rngs(seed)))
    return LanguageModel(config=config, graphdef=graphdef, params=params, tokenizer=tokenizer)


def abstract_model(config: ModelConfig, dtype=jnp.bfloat16) -> LanguageModel:
    """Shapes and dtypes only, no memory: for conversion targets and size estimates."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(config, dtype, rngs=nnx.Rngs(0))))
    return LanguageModel(config=config, graphdef=graphdef, params=params)
