"""k-means over one masked row of points: k-means++ seeding, then Lloyd iterations to a fixed point.

Shapes are static (N points, K clusters) and the live parts dynamic (`valid` points, the first `active`
clusters), so one compiled function clusters a ragged batch under `jax.vmap`. Squeezed Attention groups
a prompt's keys with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_ASSIGN_CHUNK = 2048  # points scored against every center at once: bounds the [chunk, K] distance block


def plus_plus_init(key: jax.Array, x: jax.Array, valid: jax.Array, active: jax.Array, num_clusters: int) -> jax.Array:
    """float32[K, D] centers seeded by k-means++ (Arthur & Vassilvitskii, 2007): the first uniformly
    among the valid points, each next with probability proportional to its squared distance to the
    nearest center so far. Centers past `active` stay zero.

    x: float32[N, D]; valid: bool[N]; active: int32 scalar in [1, K].
    """
    first_key, key = jax.random.split(key)
    uniform = jnp.where(valid, 0.0, -jnp.inf)  # [N]
    first = x[jax.random.categorical(first_key, uniform)]  # [D]
    centers = jnp.zeros((num_clusters, x.shape[1]), jnp.float32).at[0].set(first)
    d2 = jnp.sum((x - first) ** 2, axis=-1)  # [N] squared distance to the nearest center

    def seed(i, carry):
        centers, d2 = carry
        far = valid & (d2 > 0)
        logits = jnp.where(jnp.any(far), jnp.where(far, jnp.log(jnp.where(far, d2, 1.0)), -jnp.inf), uniform)
        c = x[jax.random.categorical(jax.random.fold_in(key, i), logits)]  # [D]
        live = i < active
        centers = centers.at[i].set(jnp.where(live, c, 0.0))
        d2 = jnp.where(live, jnp.minimum(d2, jnp.sum((x - c) ** 2, axis=-1)), d2)
        return centers, d2

    centers, _ = jax.lax.fori_loop(1, num_clusters, seed, (centers, d2))
    return centers


def assign(x: jax.Array, centers: jax.Array, active: jax.Array) -> jax.Array:
    """int32[N]: each point's nearest live center (squared Euclidean distance; ties to the lower index).

    x: float32[N, D]; centers: float32[K, D]; the first `active` centers are live.
    """
    n, d = x.shape
    live = jnp.arange(centers.shape[0]) < active  # [K]
    half_norm = jnp.where(live, 0.5 * jnp.sum(centers**2, axis=-1), jnp.inf)  # [K]

    def nearest(block):  # [S, D] -> int32[S]; argmin |x - c|^2 = argmax x.c - |c|^2 / 2
        return jnp.argmax(jnp.einsum("sd,kd->sk", block, centers) - half_norm, axis=-1).astype(jnp.int32)

    if n <= _ASSIGN_CHUNK:
        return nearest(x)
    pad = -n % _ASSIGN_CHUNK
    blocks = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, _ASSIGN_CHUNK, d)  # [N / S, S, D]
    return jax.lax.map(nearest, blocks).reshape(-1)[:n]


def cluster_means(x: jax.Array, labels: jax.Array, valid: jax.Array, num_clusters: int) -> tuple[jax.Array, jax.Array]:
    """(sums / counts float32[K, D], counts int32[K]) of the valid points per label; empty clusters get 0."""
    segment = jnp.where(valid, labels, num_clusters)  # invalid points land in a discarded extra segment
    sums = jax.ops.segment_sum(x.astype(jnp.float32), segment, num_clusters + 1)[:num_clusters]  # [K, D]
    counts = jax.ops.segment_sum(valid.astype(jnp.int32), segment, num_clusters + 1)[:num_clusters]  # [K]
    return sums / jnp.maximum(counts, 1)[:, None], counts


def lloyd(
    x: jax.Array, valid: jax.Array, active: jax.Array, centers: jax.Array, iterations: int
) -> tuple[jax.Array, jax.Array]:
    """Lloyd's algorithm from `centers`: assign, move each center to its points' mean, repeat until no
    valid point changes cluster or `iterations` updates ran. An emptied center stays where it was.

    Returns (labels int32[N], -1 for invalid points; centers float32[K, D], the means of those labels
    wherever a cluster has points).
    """
    num_clusters = centers.shape[0]

    def update(centers, labels):
        means, counts = cluster_means(x, labels, valid, num_clusters)
        return jnp.where((counts > 0)[:, None], means, centers)

    def not_done(carry):
        i, _, _, changed = carry
        return (i < iterations) & changed

    def step(carry):
        i, labels, centers, _ = carry
        centers = update(centers, labels)
        new = assign(x, centers, active)
        return i + 1, new, centers, jnp.any(valid & (new != labels))

    labels = assign(x, centers, active)
    _, labels, centers, _ = jax.lax.while_loop(not_done, step, (0, labels, centers, jnp.array(True)))
    return jnp.where(valid, labels, -1), update(centers, labels)


def kmeans(
    key: jax.Array, x: jax.Array, valid: jax.Array, active: jax.Array, num_clusters: int, iterations: int
) -> tuple[jax.Array, jax.Array]:
    """k-means++ seeding then Lloyd: (labels int32[N], -1 for invalid points; centers float32[K, D])."""
    x = x.astype(jnp.float32)
    centers = plus_plus_init(key, x, valid, active, num_clusters)
    return lloyd(x, valid, active, centers, iterations)
