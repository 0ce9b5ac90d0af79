"""LESS training (Dong et al., 2024): each layer's feature maps learn to stand in for what eviction drops.

The model is frozen; only the LESS params train (kvjax.policies.less.kernels). Each step, as the
authors' train_kernels.py (hdong920/LESS) does layer by layer, here for every layer at once (the layers'
params and losses are independent, so the sum trains each as alone):
- data: one prompt of the evaluation suite followed by its answer (kvjax.train.task_rows: a task drawn per
  step, a length drawn in [min_len, max_len], right-padded to pad_multiple);
- inputs: the full-attention forward of the frozen model, teacher-forced; each layer's post-RoPE q, k and v;
- the sparse cache: the Λ mask (the authors' `get_A_mask`: query t sees the first `sink` positions and
  positions >= t - `recent`, StreamingLLM(sink, window=recent) at decode), or H2O's (`mask="h2o"`:
  the authors' `local_heavy_hitter_mask_nonoverlap`, heavy hitters by attention accumulated over the
  queries so far plus the recent window);
- prediction: softmax over the sparse set joined with the state of every other earlier token
  (`kernels.join`), the parallel form of the policy's decode;
- loss: per layer, the MSE of (prediction - full attention) through the layer's o_proj, over the valid
  tokens at positions >= the budget (the authors' `loss_start`), averaged over layers. `base_mse`, the
  same without the state, is logged beside it: the eviction's own error, which the state must undercut.
Adam (lr 1e-3), the lr halved at each quarter of the run (the authors' StepLR: 10 of 40 epochs, gamma
0.5), dropout 0.3 on the feature maps' first layer, rank 8 and hidden 512: all the authors'. What is
kvjax's own: the data (the evaluation suite instead of C4) and one sequence per step instead of epochs
over a collected set. The generic loop (kvjax.train.loop.train) runs it: checkpoints, exact resume
after kill -9, NaN guard, progress bar, loss curve.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kvjax.attention import reference_attention, visibility_mask
from kvjax.eval.tasks import default_tasks, get_task
from kvjax.language_model import LanguageModel
from kvjax.policies.less.kernels import Params, init_params, join, key_features, query_features, save_less
from kvjax.policies.less.policy import MASKED
from kvjax.train.loop import LoopConfig, TrainResult, check_learning_rate, check_prompt_model, train
from kvjax.train.task_rows import check_tasks, make_batch

RUN_JSON = "less_run.json"
MASKS = ("lambda", "h2o")
# Settings a resumed run may change (each change recorded in RUN_JSON); any other change is refused.
RESUMABLE = frozenset({"lr", "steps", "checkpoint_every"})


@dataclasses.dataclass(frozen=True)
class LESSTrainConfig:
    """LESS's training recipe (defaults = the authors' Llama 2 7B Λ run: sink 4 + recent 200 of 4096) plus
    the data knobs."""

    steps: int = 2000
    lr: float = 1e-3
    rank: int = 8  # the authors' ker_dim
    hidden: int = 512  # the authors' ker_hid
    dropout: float = 0.3
    mask: str = "lambda"  # "lambda" (sink + recent) or "h2o" (heavy + recent)
    sink: int = 4  # Λ: first positions kept
    heavy: int = 102  # H2O: heavy hitters kept (the authors' 2.5% of 4096)
    recent: int = 200  # most recent positions kept (the query's own among them)
    tasks: tuple[str, ...] = tuple(default_tasks())
    min_len: int = 1024
    max_len: int = 4096
    answer_reserve: int = 64  # tokens of each sequence left for the answer (kvjax.train.task_rows)
    pad_multiple: int = 1024
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self):
        if self.steps < 1 or self.checkpoint_every < 1:
            raise ValueError(f"need steps >= 1 and checkpoint_every >= 1; got {self.steps}, {self.checkpoint_every}")
        check_learning_rate(self.lr)
        if self.rank < 1 or self.hidden < 1 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"need rank >= 1, hidden >= 1, dropout in [0, 1); got {self.rank}, {self.hidden}, {self.dropout}"
            )
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}; got {self.mask!r}")
        if self.sink < 0 or self.heavy < 0 or self.recent < 1:
            raise ValueError(f"need sink >= 0, heavy >= 0, recent >= 1; got {self.sink}, {self.heavy}, {self.recent}")
        if not self.tasks:
            raise ValueError("need at least one task")
        for name in self.tasks:
            get_task(name)  # raises on an unknown name
        if not 1 <= self.answer_reserve < self.min_len <= self.max_len or self.pad_multiple < 1:
            raise ValueError(
                f"need 1 <= answer_reserve < min_len <= max_len and pad_multiple >= 1; got {self.answer_reserve}, "
                f"{self.min_len}, {self.max_len}, {self.pad_multiple}"
            )
        if self.budget >= self.min_len - self.answer_reserve:
            raise ValueError(
                f"the cache budget {self.budget} must be shorter than the prompts (min_len {self.min_len})"
            )

    @property
    def budget(self) -> int:
        """Entries the sparse cache keeps per KV head (the loss starts at this position)."""
        return (self.sink if self.mask == "lambda" else self.heavy) + self.recent


# ------------------------------------------------------------------------------------------------
# The sparse masks and the parallel form of LESS's attention.
# ------------------------------------------------------------------------------------------------


def lambda_mask(causal: jax.Array, sink: int, recent: int) -> jax.Array:
    """bool[..., T, S]: the visible (`causal`) entries among the first `sink` positions and s >= t - recent."""
    t, s = jnp.arange(causal.shape[-2])[:, None], jnp.arange(causal.shape[-1])[None, :]
    return causal & ((s < sink) | (s >= t - recent))


def h2o_mask(probs: jax.Array, causal: jax.Array, heavy: int, recent: int) -> jax.Array:
    """bool[B, K, G, T, S]: H2O's cache at every query, the authors' `local_heavy_hitter_mask_nonoverlap`
    (per query head): queries t < heavy + recent see everything; the scores of the first heavy + recent
    queries' full attention seed the accumulator; from then on query t keeps the `heavy` highest scores
    among s < t - recent plus s >= t - recent, adds its own (full-softmax) attention, and zeroes the
    scores of what it did not keep. probs: float32[B, K, G, T, S] full causal softmax."""
    t_len, budget = probs.shape[-2], heavy + recent
    s = jnp.arange(probs.shape[-1])
    score = jnp.sum(probs[..., :budget, :], axis=-2) * (s < budget)  # [B, K, G, S]

    def row(score, t):
        candidates = jnp.where(s < t - recent, score, -jnp.inf)
        top = jax.lax.top_k(candidates, heavy)[1] if heavy else jnp.zeros(score.shape[:-1] + (0,), jnp.int32)
        kept = jnp.any(top[..., None] == s, axis=-2) | ((s >= t - recent) & (s <= t))  # [B, K, G, S]
        score = (score + jnp.take(probs, t, axis=-2)) * kept
        return score, kept

    _, rows = jax.lax.scan(row, score, jnp.arange(budget, t_len))  # [T - budget, B, K, G, S]
    head = jnp.broadcast_to(causal[..., :budget, :], probs.shape[:-2] + (budget, probs.shape[-1]))
    return jnp.concatenate([head, jnp.moveaxis(rows, 0, -2)], axis=-2) & causal


def layer_loss(
    p: Params,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    w_o: jax.Array,
    valid: jax.Array,
    config: LESSTrainConfig,
    scale: float,
    rng: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """(LESS's MSE, the sparse cache's MSE without the state) of one layer, both through its o_proj.

    p: one layer's params; q [B, T, K, G, D], k, v [B, T, K, D] after RoPE; w_o [K, G, D, E]; valid bool[B, T];
    rng: dropout's key (None: no dropout).
    """
    b, t = valid.shape
    pos = jnp.where(valid, jnp.arange(t), -1)  # [B, T]
    k_pos = jnp.broadcast_to(pos[:, None, :], (b, k.shape[2], t))  # [B, K, T]
    causal = visibility_mask(k_pos, jnp.broadcast_to(jnp.arange(t), (b, t)), None)[:, :, None]  # [B, K, 1, T, S]
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    full = jax.nn.softmax(jnp.where(causal, logits, MASKED), axis=-1)  # [B, K, G, T, S]
    if config.mask == "lambda":
        sparse = lambda_mask(causal, config.sink, config.recent)
    else:
        sparse = h2o_mask(jax.lax.stop_gradient(full), causal, config.heavy, config.recent)
    masked = jnp.where(sparse, logits, MASKED)
    lse = jax.nn.logsumexp(masked, axis=-1)  # [B, K, G, T]
    v32 = v.astype(jnp.float32)
    out_full = jnp.einsum("bkgts,bskd->btkgd", full, v32)
    out_sparse = jnp.einsum("bkgts,bskd->btkgd", jnp.exp(masked - lse[..., None]), v32)

    drop_q, drop_k = (None, None) if rng is None else ((key, config.dropout) for key in jax.random.split(rng))
    phi_q = query_features(q, p["q1"], p["q2"], drop_q)  # [B, T, K, G, R]
    phi_k = key_features(jnp.swapaxes(k, 1, 2), p, drop_k)  # [B, K, S, R]
    a = jnp.einsum("btkgr,bksr->bkgts", phi_q, phi_k) * (causal & ~sparse)  # the evicted entries' weights
    num = jnp.einsum("bkgts,bskd->btkgd", a, v32)
    den = jnp.transpose(jnp.sum(a, axis=-1), (0, 3, 1, 2))  # [B, T, K, G]
    pred = join(out_sparse, jnp.transpose(lse, (0, 3, 1, 2)), num, den)

    weight = (valid & (jnp.arange(t) >= config.budget)).astype(jnp.float32)  # [B, T]
    count = jnp.maximum(jnp.sum(weight) * w_o.shape[-1], 1.0)

    def mse(out):
        err = jnp.einsum("btkgd,kgde->bte", out - out_full, w_o)
        return jnp.sum(jnp.square(err) * weight[..., None]) / count

    return mse(pred), jax.lax.stop_gradient(mse(out_sparse))


def make_loss_fn(graphdef, config: LESSTrainConfig):
    """loss_fn(params, batch, rng) -> (loss, aux); the frozen model params ride in batch["model"]."""

    def loss_fn(params, batch, rng):
        model = nnx.merge(graphdef, batch["model"])
        cfg = model.config
        tokens, valid = batch["tokens"], batch["valid"]
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

        def record(ctx, layer, shared, x):  # full attention forward; hands each layer's q, k, v back
            k_pos = jnp.broadcast_to(x.new_pos[:, None, :], (b, cfg.num_kv_heads, t))
            out = reference_attention(
                x.q, x.k.swapaxes(1, 2), x.v.swapaxes(1, 2), k_pos, x.q_pos, ctx.window, ctx.scale
            )
            return out, (x.q, x.k, x.v), shared

        g = cfg.group_size
        empty = (
            jnp.zeros((b, t, cfg.num_kv_heads, g, cfg.head_dim), model.embed.dtype),
            jnp.zeros((b, t, cfg.num_kv_heads, cfg.head_dim), model.embed.dtype),
            jnp.zeros((b, t, cfg.num_kv_heads, cfg.head_dim), model.embed.dtype),
        )
        _, layers, _ = model(tokens, positions, valid, (empty,) * cfg.num_layers, record)
        q, k, v = (jax.lax.stop_gradient(jnp.stack(parts)) for parts in zip(*layers))  # [L, B, T, ...]
        w_o = jnp.stack([blk.attn.o_proj[...] for blk in model.blocks]).astype(jnp.float32)  # [L, H, D, E]
        w_o = w_o.reshape(cfg.num_layers, cfg.num_kv_heads, g, cfg.head_dim, -1)
        keys = jax.random.split(rng, cfg.num_layers) if config.dropout > 0 else None
        scale = cfg.head_dim**-0.5

        @jax.checkpoint  # keep each layer's inputs only; its T x T weights are recomputed in the backward pass
        def one(p, q, k, v, w, key):
            return layer_loss(p, q, k, v, w, valid, config, scale, key)

        def body(_, xs):
            p, q, k, v, w, key = xs
            return None, one(p, q, k, v, w, key)

        _, (less, base) = jax.lax.scan(body, None, (params, q, k, v, w_o, keys))  # [L], [L]
        return jnp.mean(less), {"base_mse": jnp.mean(base), "state_gain": 1 - jnp.mean(less) / jnp.mean(base)}

    return loss_fn


def lr_schedule(config: LESSTrainConfig):
    """The authors' StepLR(step_size=10 of 40 epochs, gamma=0.5): lr halved at each quarter of the run."""
    quarter = max(config.steps // 4, 1)
    return lambda step: config.lr * 0.5 ** jnp.minimum(step // quarter, 3)


def train_less(
    model: LanguageModel,
    out: str | os.PathLike,
    config: LESSTrainConfig = LESSTrainConfig(),
    *,
    progress: bool = True,
    plot: bool = True,
) -> tuple[dict[str, np.ndarray], TrainResult]:
    """Trains LESS params for `model` and writes `out/less_state.npz` (for `LESS.from_file`) with the loop's
    orbax checkpoints and loss curve; rerunning with the same `out` resumes the run exactly."""
    check_prompt_model(model, config.max_len, "task")
    if any(model.config.sliding_window(layer) is not None for layer in range(model.config.num_layers)):
        raise ValueError("LESS training compares against full causal attention; this model has sliding-window layers")
    check_tasks(model.tokenizer, config)
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    record = {"method": "less", "model": model.name, **dataclasses.asdict(config), "tasks": list(config.tasks)}
    params = init_params(model.config, config.rank, config.hidden, config.seed)
    pad, frozen = model.tokenizer.padding_id(), model.params

    def batch_fn(seed: int, step: int) -> dict:
        batch = make_batch(model.tokenizer, config, pad, seed, step)
        return {"tokens": batch["tokens"], "valid": batch["valid"], "model": frozen}

    quarter = max(config.steps // 4, 1)
    result = train(
        params,
        make_loss_fn(model.graphdef, config),
        optax.adam(lr_schedule(config)),
        batch_fn,
        LoopConfig(
            steps=config.steps,
            seed=config.seed,
            checkpoint_every=config.checkpoint_every,
            progress=progress,
            plot=plot,
            description="train-gates less",
            marks=tuple((quarter * i, f"lr / {2**i}") for i in (1, 2, 3) if quarter * i < config.steps),
        ),
        out,
        record=record,
        record_file=RUN_JSON,
        fixed=set(record) - RESUMABLE,
    )
    trained = {k: np.asarray(v, np.float32) for k, v in result.params.items()}
    record = json.loads((out / RUN_JSON).read_text())  # with what each resume changed
    last = result.history[-1] if result.history else {}
    mask = {"mask": config.mask, "recent": config.recent}
    mask.update({"sink": config.sink} if config.mask == "lambda" else {"heavy": config.heavy})
    meta = {**mask, "model": model.name, "step": result.step, "final_loss": last.get("loss"), "training": record}
    save_less(out, trained, model.config, meta)
    return trained, result
