"""Locret retaining-head training (Huang et al., 2024): each layer learns which tokens later queries need.

The model is frozen; only the retaining heads train (fc1 float32[L, C, F], fc2 float32[L, F, Hkv],
C = (H + 2 Hkv) D, the layout kvjax.policies.locret.heads saves and loads). Each step:
- data: one prompt of the evaluation suite (kvjax.train.task_rows, a task drawn per step)
  followed by its answer tokens; the answer tokens are the "later queries";
- labels: the model's own full causal forward, computed exactly in jnp (post-RoPE attention in
  query chunks); for each token, the largest attention any answer query gives it, max over the
  query heads of its KV group;
- features: each layer's q, k, v straight from the projections, before RoPE (what the head reads
  at inference, through the same `retaining_head_scores`);
- loss: SmoothL1(pred, label) over the prompt tokens, averaged over layers and KV heads, + `smoothness`
  (0.0025) x the mean squared difference of neighbouring prompt tokens' predictions (mean over KV heads
  and pairs) summed over layers.
AdamW (lr 5e-4, betas 0.9/0.95, weight decay 0.01: torch's default, which the authors keep), linear
warm-up over `warmup` steps (2000 of 3000), then linear decay to 0 (transformers'
`get_linear_schedule_with_warmup`), each gradient element clipped to [-0.5, 0.5] (`clip_grad_value_`),
batch 1. All of these are the authors' (huangyuxiang03/Locret, locret/train/train.py); `clip_by="norm"`
clips the global norm instead (kvjax's earlier rule). What is kvjax's own: the data (the evaluation
suite's tasks instead of the authors' generated set) and the labels computed here in jnp. The one generic
loop (kvjax.train.loop.train) runs it: checkpoints, exact resume, NaN guard, progress bar, loss curve.

Memory: the frozen weights travel in the batch (jit arguments, never constants); no gradient flows
through the model, so the backward pass keeps only each layer's head input [T, C] and hidden
activations [T, F]; attention runs in query chunks, so no T x T matrix exists at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kvjax.attention import attention_probs, join_query_chunks, split_query_chunks
from kvjax.eval.tasks import default_tasks, get_task
from kvjax.language_model import LanguageModel
from kvjax.policies.locret.heads import (
    random_retaining_heads,
    retaining_features,
    retaining_head_scores,
    save_retaining_heads,
)
from kvjax.train.loop import LoopConfig, TrainResult, check_learning_rate, check_prompt_model, train
from kvjax.train.task_rows import check_tasks, make_batch

RUN_JSON = "locret_run.json"
# Settings a resumed run may change (each change recorded in RUN_JSON); any other change is refused.
RESUMABLE = frozenset(
    {"lr", "warmup", "b1", "b2", "weight_decay", "clip", "clip_by", "steps", "checkpoint_every", "chunk"}
)


@dataclasses.dataclass(frozen=True)
class LocretHeadConfig:
    """Locret's training recipe (defaults = the paper's) plus the data and memory knobs."""

    steps: int = 3000
    warmup: int = 2000
    lr: float = 5e-4
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.01  # torch AdamW's default, which the authors keep
    clip: float = 0.5  # the authors' clip_grad_value_: each gradient element within [-clip, clip]
    clip_by: str = "value"  # "value" (the authors') or "norm" (the global norm, kvjax's earlier rule)
    smoothness: float = 0.0025  # weight of the neighbouring-prediction MSE
    hidden: int = 1024  # retaining head hidden size
    tasks: tuple[str, ...] = tuple(default_tasks())  # kvjax.eval.tasks names, one drawn per step
    min_len: int = 1024  # sequence lengths (prompt + answer, tokens) drawn uniformly in [min_len, max_len]
    max_len: int = 8192
    answer_reserve: int = 64  # tokens of each sequence left for the answer
    pad_multiple: int = 1024  # sequences are right-padded to a multiple of this (fewer compiled shapes)
    chunk: int = 512  # query chunk of the label attention (memory ~ chunk x T weights per head)
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self):
        if self.steps < 1 or not 0 <= self.warmup <= self.steps:
            raise ValueError(f"need steps >= 1 and 0 <= warmup <= steps; got steps {self.steps}, warmup {self.warmup}")
        check_learning_rate(self.lr)
        finite = [self.clip, self.smoothness, self.weight_decay, self.b1, self.b2]
        if not all(math.isfinite(x) for x in finite) or not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"need finite clip, smoothness, weight_decay and b1, b2 in [0, 1); got {finite}")
        if self.clip <= 0 or self.smoothness < 0 or self.weight_decay < 0:
            raise ValueError(
                f"need clip > 0, smoothness >= 0, weight_decay >= 0; got {self.clip}, "
                f"{self.smoothness}, {self.weight_decay}"
            )
        if self.clip_by not in ("value", "norm"):
            raise ValueError(f"clip_by must be 'value' or 'norm'; got {self.clip_by!r}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1; got {self.hidden}")
        if not self.tasks:
            raise ValueError("need at least one task")
        for name in self.tasks:
            get_task(name)  # raises on an unknown name
        if not 1 <= self.min_len <= self.max_len or self.answer_reserve < 1 or self.answer_reserve >= self.min_len:
            raise ValueError(
                f"need 1 <= answer_reserve < min_len <= max_len; got {self.answer_reserve}, "
                f"{self.min_len}, {self.max_len}"
            )
        if self.chunk < 1 or self.pad_multiple < 1 or self.pad_multiple % min(self.chunk, self.pad_multiple):
            raise ValueError(f"chunk {self.chunk} must divide pad_multiple {self.pad_multiple}")


# ------------------------------------------------------------------------------------------------
# Labels and features from the frozen model.
# ------------------------------------------------------------------------------------------------


def attention_and_targets(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    answer: jax.Array,
    window: int | None,
    scale: float,
    chunk: int = 512,
) -> tuple[jax.Array, jax.Array]:
    """Exact causal attention in query chunks, and Locret's labels.

    q: [B, T, K, G, D] after RoPE; k, v: [B, K, C, D]; q_pos int32[B, T]; k_pos int32[B, K, C] (-1 empty);
    answer bool[B, T] marks the supervising queries. Returns the output [B, T, K, G, D] (v's dtype) and
    float32[B, K, C]: per entry, the largest weight any answer query gives it, max over the group.
    """
    qs, ps, ans = split_query_chunks(chunk, q, q_pos, answer)  # [N, B, S, K, G, D], [N, B, S], [N, B, S]

    def one_chunk(best, inputs):
        qc, pc, ac = inputs  # [B, S, K, G, D], [B, S], [B, S]
        probs = attention_probs(qc, k, k_pos, pc, window, scale)  # [B, K, G, S, C]
        out = jnp.einsum("bkgsc,bkcd->bskgd", probs.astype(v.dtype), v)  # [B, S, K, G, D]
        votes = jnp.max(jnp.where(ac[:, None, None, :, None], probs, 0.0), axis=(2, 3))  # [B, K, C]
        return jnp.maximum(best, votes), out

    best, outs = jax.lax.scan(one_chunk, jnp.zeros(k.shape[:3], jnp.float32), (qs, ps, ans))
    return join_query_chunks(outs), best


def features_and_targets(
    graphdef, params, tokens: jax.Array, valid: jax.Array, answer: jax.Array, chunk: int = 512
) -> tuple[jax.Array, jax.Array]:
    """(features [L, B, T, C], targets float32[L, B, T, K]) of a full causal forward of the frozen model.

    Features are each layer's retaining-head input (pre-RoPE q, k, v); targets are Locret's labels from
    the answer queries (`answer` bool[B, T]). Each layer runs the model's own block; its cache-step hook
    computes exact chunked attention over the whole sequence and hands the layer's labels back where a
    policy would return its segments.
    """
    model = nnx.merge(graphdef, params)
    cfg = model.config
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T]
    answer = answer & valid

    def label_step(ctx, layer, shared, x):  # the layer's features and labels, where a policy keeps segments
        k_pos = jnp.broadcast_to(x.new_pos[:, None, :], (b, cfg.num_kv_heads, t))  # [B, K, T]
        out, target = attention_and_targets(
            x.q, x.k.swapaxes(1, 2), x.v.swapaxes(1, 2), x.q_pos, k_pos, answer, ctx.window, ctx.scale, chunk
        )
        return out, (retaining_features(x.q_raw, x.k_raw, x.v), target.swapaxes(1, 2)), shared  # [B, T, C], [B, T, K]

    c = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    empty = (jnp.zeros((b, t, c), model.embed.dtype), jnp.zeros((b, t, cfg.num_kv_heads), jnp.float32))
    _, layers, _ = model(
        tokens, positions, valid, (empty,) * cfg.num_layers, label_step, seq_len=jnp.sum(valid, axis=-1).max()
    )
    features, targets = (jnp.stack(parts) for parts in zip(*layers))
    return jax.lax.stop_gradient(features), jax.lax.stop_gradient(targets)


def locret_loss(pred: jax.Array, target: jax.Array, prefix: jax.Array, smoothness: float) -> tuple[jax.Array, dict]:
    """SmoothL1(pred, target) over prefix tokens (mean over tokens, layers and KV heads) + smoothness x the
    MSE of neighbouring prefix predictions per layer (mean over pairs and KV heads), summed over layers, as
    the authors' `smooth_loss += mse_loss(s[:, :-1], s[:, 1:])` per layer.

    pred, target: float32[L, B, T, K]; prefix: bool[B, T] (real prompt tokens, the ones that get labels).
    """
    w = prefix[None, :, :, None].astype(jnp.float32)  # [1, B, T, 1]
    diff = jnp.abs(pred - target)
    huber = jnp.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5)  # torch's SmoothL1Loss, beta 1
    per_entry = pred.shape[0] * pred.shape[-1]
    fit = jnp.sum(huber * w) / jnp.maximum(jnp.sum(w) * per_entry, 1.0)
    pair = (prefix[:, 1:] & prefix[:, :-1])[None, :, :, None].astype(jnp.float32)  # [1, B, T-1, 1]
    step = jnp.square(pred[:, :, 1:] - pred[:, :, :-1])
    smooth = jnp.sum(step * pair) / jnp.maximum(jnp.sum(pair) * pred.shape[-1], 1.0)  # summed over layers
    return fit + smoothness * smooth, {"smooth_l1": fit, "smoothness": smooth}


def make_loss_fn(graphdef, config: LocretHeadConfig, activation: str):
    """loss_fn({"fc1", "fc2"}, batch, rng) -> (loss, aux); the frozen model params ride in batch["model"]."""

    def loss_fn(heads, batch, rng):
        del rng
        features, targets = features_and_targets(
            graphdef, batch["model"], batch["tokens"], batch["valid"], batch["answer"], config.chunk
        )
        pred = jax.vmap(lambda f, w1, w2: retaining_head_scores(f, w1, w2, activation))(
            features, heads["fc1"], heads["fc2"]
        )  # [L, B, T, K]
        return locret_loss(pred, targets, batch["valid"] & ~batch["answer"], config.smoothness)

    return loss_fn


# ------------------------------------------------------------------------------------------------
# Optimizer and the run.
# ------------------------------------------------------------------------------------------------


def lr_schedule(config: LocretHeadConfig):
    """transformers' `get_linear_schedule_with_warmup`, which the authors step after every update: lr x
    step / warmup while warming up, then lr x (steps - step) / (steps - warmup) down to 0."""
    warm, decay = max(config.warmup, 1), max(config.steps - config.warmup, 1)

    def schedule(step):
        factor = jnp.where(step < config.warmup, step / warm, (config.steps - step) / decay)
        return config.lr * jnp.clip(factor, 0.0, 1.0)

    return schedule


def make_optimizer(config: LocretHeadConfig) -> optax.GradientTransformation:
    """Clipping (each element to [-clip, clip], the authors', or the global norm), then AdamW on the schedule."""
    clip = optax.clip(config.clip) if config.clip_by == "value" else optax.clip_by_global_norm(config.clip)
    return optax.chain(
        clip,
        optax.adamw(lr_schedule(config), b1=config.b1, b2=config.b2, weight_decay=config.weight_decay),
    )


def train_locret_heads(
    model: LanguageModel,
    out: str | os.PathLike,
    config: LocretHeadConfig = LocretHeadConfig(),
    *,
    progress: bool = True,
    plot: bool = True,
) -> tuple[dict[str, np.ndarray], TrainResult]:
    """Trains retaining heads for `model` and writes them to `out` (`retaining_heads/` and
    `retaining_heads.json`, for `Locret.from_pretrained`) with the loop's orbax
    checkpoints and loss curve; rerunning with the same `out` resumes the run exactly."""
    check_prompt_model(model, config.max_len, "task")
    check_tasks(model.tokenizer, config)
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    record = {"method": "locret", "model": model.name, **dataclasses.asdict(config)}
    record["tasks"] = list(config.tasks)
    heads = random_retaining_heads(model.config, config.hidden, config.seed)
    pad = model.tokenizer.padding_id()
    params = model.params

    def batch_fn(seed: int, step: int) -> dict:
        return {**make_batch(model.tokenizer, config, pad, seed, step), "model": params}

    result = train(
        heads,
        make_loss_fn(model.graphdef, config, model.config.hidden_act),
        make_optimizer(config),
        batch_fn,
        LoopConfig(
            steps=config.steps,
            seed=config.seed,
            checkpoint_every=config.checkpoint_every,
            progress=progress,
            plot=plot,
            description="train-gates locret",
            marks=((config.warmup, "end of warm-up, decay"),),
        ),
        out,
        record=record,
        record_file=RUN_JSON,
        fixed=set(record) - RESUMABLE,
    )
    trained = {k: np.asarray(v, np.float32) for k, v in result.params.items()}
    record = json.loads((out / RUN_JSON).read_text())  # with what each resume changed
    last = result.history[-1]["loss"] if result.history else None
    save_retaining_heads(
        out, trained, model.config, {"model": model.name, "step": result.step, "final_loss": last, "training": record}
    )
    return trained, result
