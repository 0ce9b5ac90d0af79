"""Reading traced programs by their structure (equations and their parameters), not their printed text."""

from __future__ import annotations

from collections.abc import Iterator

import jax


def equations(jaxpr) -> Iterator:
    """Every equation of a (closed) jaxpr, nested sub-jaxprs (scan, while, cond, shard_map, pjit) included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from equations(sub)


def pallas_calls(jaxpr) -> list:
    """The pallas_call equations of a traced program."""
    return [eqn for eqn in equations(jaxpr) if eqn.primitive.name == "pallas_call"]


def pallas_grids(jaxpr) -> list[tuple[int, ...]]:
    """The grid of each pallas_call in a traced program."""
    return [tuple(eqn.params["grid_mapping"].grid) for eqn in pallas_calls(jaxpr)]


def kernel_calls(jaxpr) -> tuple[int, int]:
    """(pallas calls inside a shard_map body, pallas calls anywhere) in a traced program."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    inside = total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            total += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            sub_inside, sub_total = kernel_calls(sub)
            total += sub_total
            inside += sub_total if eqn.primitive.name == "shard_map" else sub_inside
    return inside, total
