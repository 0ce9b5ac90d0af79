"""One generic optax training loop: any pytree of trainable params, orbax checkpoints, exact resume.

Used for language-model training (kvjax.train.lm) and meant for DuoAttention gates and Locret heads:
the caller brings `loss_fn(params, batch, rng) -> (loss, aux)`, an optax transformation and
`batch_fn(seed, step) -> batch`. Data order and per-step randomness are pure functions of
(seed, step), so a run resumed from a checkpoint matches an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]
BatchFn = Callable[[int, int], Any]

CURVE_JSON = "loss_curve.json"
CURVE_PNG = "loss_curve.png"


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; training stopped and the last good checkpoint was kept."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train, how often to checkpoint, and what to show."""

    steps: int
    seed: int = 0
    checkpoint_every: int = 100  # also saved after the last step
    max_checkpoints: int = 3  # the newest ones are kept
    resume: bool = True  # continue from the newest checkpoint in the output folder
    progress: bool = True  # tqdm bar with the loss
    plot: bool = True  # write loss_curve.png at the end (needs matplotlib)
    description: str = "train"
    stop_at: int | None = None  # end this run after this step (checkpointed); a later run resumes to `steps`

    def __post_init__(self):
        if self.steps < 1 or self.checkpoint_every < 1 or self.max_checkpoints < 1:
            raise ValueError(
                f"steps, checkpoint_every and max_checkpoints must be >= 1; got {self.steps}, "
                f"{self.checkpoint_every}, {self.max_checkpoints}"
            )
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at must be in [1, steps = {self.steps}]; got {self.stop_at}")

    @property
    def end(self) -> int:
        """The step this run ends at: `stop_at` for one stage of a longer run, else `steps`."""
        return self.steps if self.stop_at is None else self.stop_at


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """The trained params and optimizer state, the step reached and the loss history."""

    params: Any
    opt_state: Any
    step: int
    history: tuple[dict, ...]  # {"step": steps completed, "loss": float, plus scalar aux values}
    resumed_from: int | None  # the checkpoint step this run started from, if any


def step_rng(seed: int, step: int) -> jax.Array:
    """The PRNG key of a step: a pure function of (seed, step)."""
    return jax.random.fold_in(jax.random.key(seed), step)


def _make_update(loss_fn: LossFn, optimizer: optax.GradientTransformation):
    """A jitted step that leaves params and optimizer state unchanged when loss or gradients are not finite."""

    def update(params, opt_state, batch, rng):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        return (
            jax.tree.map(keep, new_params, params),
            jax.tree.map(keep, new_opt_state, opt_state),
            loss,
            aux,
            grad_norm,
        )

    return jax.jit(update, donate_argnums=(0, 1))


def _scalars(aux: Any) -> dict[str, float]:
    if not isinstance(aux, dict):
        return {}
    return {k: float(v) for k, v in aux.items() if isinstance(v, (int, float)) or getattr(v, "shape", None) == ()}


def _write_json(path: Path, data) -> None:
    """Writes through a temporary file and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def plot_loss_curve(history, path: Path, title: str = "training loss") -> Path:
    """A PNG of loss against step (log-scaled when the loss spans more than a decade)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, lw=1)
    if losses and min(losses) > 0 and max(losses) / min(losses) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def train(
    params: Any,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    batch_fn: BatchFn,
    config: LoopConfig,
    out_dir: str | os.PathLike | None = None,
) -> TrainResult:
    """Trains `params` for `config.steps` optimizer steps (or up to `config.stop_at`).

    With `out_dir`, checkpoints go to `out_dir/checkpoints/<step>` every `checkpoint_every` steps and
    the loss curve to `out_dir/loss_curve.{json,png}`; a later call resumes from the newest checkpoint.
    Raises NonFiniteLossError on a NaN/inf loss or gradient, without writing a checkpoint of that step.
    `params` is donated to the first step (and only a shape template when a checkpoint is resumed).
    """
    opt_state = optimizer.init(params)
    start, history, resumed_from, manager = 0, [], None, None
    out = Path(out_dir).absolute() if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        manager = ocp.CheckpointManager(
            out / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.max_checkpoints, create=True, enable_async_checkpointing=False
            ),
        )
        latest = manager.latest_step() if config.resume else None
        if latest is not None:
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
            try:
                restored = manager.restore(latest, args=ocp.args.StandardRestore(target))
            except Exception as err:  # orbax raises many types on structure mismatches
                raise ValueError(
                    f"{out}: checkpoint {latest} does not match these params/optimizer ({type(err).__name__}: {err}); "
                    f"use another output folder or resume=False"
                ) from err
            params, opt_state, start, resumed_from = restored["params"], restored["opt_state"], latest, latest
            if (out / CURVE_JSON).is_file():
                history = [h for h in json.loads((out / CURVE_JSON).read_text()) if h["step"] <= latest]

    update = _make_update(loss_fn, optimizer)
    bar = tqdm(
        total=config.end, initial=start, desc=config.description, disable=not config.progress, dynamic_ncols=True
    )
    try:
        for step in range(start, config.end):
            params, opt_state, loss, aux, grad_norm = update(
                params, opt_state, batch_fn(config.seed, step), step_rng(config.seed, step)
            )
            loss_value, norm_value = float(loss), float(grad_norm)
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                last = manager.latest_step() if manager is not None else None
                where = f"checkpoint {last} in {out / 'checkpoints'}" if last is not None else "none was written"
                if out is not None:
                    _write_json(out / CURVE_JSON, history)
                raise NonFiniteLossError(
                    f"loss {loss_value} (gradient norm {norm_value}) at step {step}: training stopped; "
                    f"the last good checkpoint is {where}. Lower the learning rate or tighten clipping, then resume."
                )
            done = step + 1
            history.append({"step": done, "loss": loss_value, "grad_norm": norm_value, **_scalars(aux)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if manager is not None and (done % config.checkpoint_every == 0 or done == config.end):
                # The curve first: a kill between the two leaves entries past the newest checkpoint, which
                # resume drops; the other order could lose the entries up to a checkpoint that exists.
                _write_json(out / CURVE_JSON, history)
                manager.save(done, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
                manager.wait_until_finished()
    finally:
        bar.close()
        if manager is not None:
            manager.close()
    if out is not None and config.plot and history:
        plot_loss_curve(history, out / CURVE_PNG, config.description)
    return TrainResult(params, opt_state, max(start, config.end), tuple(history), resumed_from)
