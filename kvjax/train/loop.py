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
import numbers
import os
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]
BatchFn = Callable[[int, int], Any]

CURVE_JSON = "loss_curve.json"
CURVE_PNG = "loss_curve.png"
RUN_JSON = "run.json"  # the settings of the run in a training folder, and what each resume changed


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; training stopped and the last good checkpoint was kept."""


def check_learning_rate(lr, name: str = "lr") -> float:
    """`lr` as a float when it is a finite positive number (NaN, inf, 0 and negative rates are refused)."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"{name} (the learning rate) must be a finite number > 0; got {lr!r}")
    return float(lr)


def check_prompt_model(model, max_len: int, prompts: str) -> None:
    """Refuses a model without a tokenizer (the training `prompts` are text) or with fewer positions than
    `max_len`, the longest training row."""
    if model.tokenizer is None:
        raise ValueError(f"model {model.name or ''} has no tokenizer; the {prompts} prompts need one")
    if max_len > model.config.max_position_embeddings:
        raise ValueError(f"max_len {max_len} exceeds the model's {model.config.max_position_embeddings} positions")


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
    marks: tuple[tuple[int, str], ...] = ()  # (step, label): where the schedule changes, drawn on the curve

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


def _make_steps(loss_fn: LossFn, optimizer: optax.GradientTransformation):
    """Two jitted halves of a step: the loss, aux, gradients and gradient norm of the current params (so
    they can be checked, and the params checkpointed, before anything changes them), and the update."""

    def gradients(params, batch, rng):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        floats = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats])) if floats else jnp.bool_(True)
        return loss, aux, grads, optax.tree.norm(grads), finite

    def update(params, opt_state, grads):
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    return jax.jit(gradients), jax.jit(update, donate_argnums=(0, 1, 2))


def _all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact))


def _scalars(aux: Any) -> dict[str, float]:
    if not isinstance(aux, dict):
        return {}
    return {k: float(v) for k, v in aux.items() if isinstance(v, (int, float)) or getattr(v, "shape", None) == ()}


def _write_json(path: Path, data) -> None:
    """Writes through a temporary file and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def smoothed(values, span: int) -> np.ndarray:
    """Exponential moving average with the weight of a `span`-step window, bias-corrected from the start."""
    alpha, mean, weight, out = 2 / (span + 1), 0.0, 0.0, []
    for v in values:
        mean, weight = (1 - alpha) * mean + alpha * v, (1 - alpha) * weight + alpha
        out.append(mean / weight)
    return np.asarray(out)


def plot_loss_curve(history, path: Path, title: str = "training loss", marks=()) -> Path:
    """A PNG of loss against step: each step faint, a moving average over about 4% of the run (5 steps at least) bold, the
    schedule's phases (`marks`: (step, label)) as dashed lines; log-scaled when the loss spans a decade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    span = max(5, len(losses) // 25)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(steps, losses, lw=0.8, alpha=0.3, color="tab:blue", label="per step")
    ax.plot(steps, smoothed(losses, span), lw=1.8, color="tab:blue", label=f"moving average ({span} steps)")
    if losses and min(losses) > 0 and max(losses) / min(losses) > 10:
        ax.set_yscale("log")
    for step, label in marks:
        ax.axvline(step, color="gray", linestyle="--", linewidth=0.8)
        ax.annotate(label, (step, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _record_run(
    path: Path, record: dict, fixed: Collection[str], resumed_at: int | None, write: bool = True
) -> str | None:
    """Writes a run's settings to `path`. When the run resumes a checkpoint made under other settings, it
    refuses if any of the `fixed` ones changed, and otherwise keeps both: the file then holds the current
    settings plus, under "resumes", each resume's step and every changed value as [old, new] (a command
    included). Returns a note for the user about such a change, else None. `write=False` only checks."""
    record = json.loads(json.dumps(record))  # as stored: tuples become lists
    old = None
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); move it away to start a new record") from None
    if resumed_at is None or not isinstance(old, dict):
        if write:
            _write_json(path, record)
        return None
    resumes = old.pop("resumes", [])
    changed = {k: [old.get(k), record.get(k)] for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k)}
    if not changed:
        if write:
            _write_json(path, {**record, "resumes": resumes} if resumes else record)
        return None
    refused = [k for k in changed if k in fixed]
    if refused:
        detail = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise ValueError(
            f"{path.parent} holds a run (checkpoint {resumed_at}) with other settings than these ({detail}), "
            f"which a resume cannot change; use another output folder or the recorded settings ({path})"
        )
    if not write:
        return None
    _write_json(path, {**record, "resumes": resumes + [{"step": resumed_at, "changed": changed}]})
    return (
        f"resuming at step {resumed_at} with changed settings ({', '.join(changed)}); the old and new values "
        f"are recorded in {path}"
    )


def _restore_finite(manager, target) -> tuple[dict | None, int | None]:
    """The newest checkpoint whose parameters and optimizer state are all finite, and its step. Older
    runs could checkpoint parameters a blown-up step had made non-finite: those are deleted (with a
    note), so the run rolls back to the last good one."""
    for step in sorted(manager.all_steps(), reverse=True):
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        if _all_finite(restored):
            return restored, step
        print(
            f"checkpoint {step} in {manager.directory} holds non-finite values; deleted, rolling back",
            file=sys.stderr,
        )
        manager.delete(step)
    return None, None


def _stop_message(step: int, loss: float, norm: float, params_finite: bool, last: int | None, out) -> str:
    what = f"loss {loss} (gradient norm {norm})" + ("" if params_finite else " with non-finite parameters")
    if last is not None:
        where = (
            f"rolled back to checkpoint {last} in {out / 'checkpoints'}, the last whose parameters, loss and "
            f"gradient norm were all finite (nothing after it was saved). To go on with other settings, e.g. "
            f"a lower learning rate or tighter gradient clipping, rerun with them: the run resumes from step "
            f"{last} and records both settings."
        )
    elif out is not None:
        where = (
            "no checkpoint had passed the finiteness check yet, so nothing was saved. Rerun with other "
            "settings, e.g. a lower learning rate: the run starts over."
        )
    else:
        where = "lower the learning rate or tighten gradient clipping."
    return f"{what} at step {step}: training stopped; {where}"


def train(
    params: Any,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    batch_fn: BatchFn,
    config: LoopConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    record: dict | None = None,
    record_file: str = RUN_JSON,
    fixed: Collection[str] = (),
) -> TrainResult:
    """Trains `params` for `config.steps` optimizer steps (or up to `config.stop_at`).

    With `out_dir`, checkpoints go to `out_dir/checkpoints/<step>` every `checkpoint_every` steps and
    the loss curve to `out_dir/loss_curve.{json,png}`; a later call resumes from the newest checkpoint.
    A checkpoint holds only parameters that are finite and whose loss and gradient norm were finite (it is
    written once the next step has computed them). On a NaN/inf loss, gradient or parameter the run stops
    with NonFiniteLossError, naming the checkpoint it rolled back to and how to resume with new settings.
    `record` (JSON-able settings, e.g. the command) goes to `out_dir/record_file`; resuming under other
    settings refuses a change to the `fixed` keys and records both values of the others (`_record_run`).
    `params` is donated to the first step (and only a shape template when a checkpoint is resumed).
    """
    opt_state = optimizer.init(params)
    start, history, resumed_from, manager = 0, [], None, None
    out = Path(out_dir).absolute() if out_dir is not None else None
    note = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        manager = ocp.CheckpointManager(
            out / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.max_checkpoints, create=True, enable_async_checkpointing=False
            ),
        )
        if record is not None and config.resume:  # a change that cannot apply, named before orbax trips on it
            _record_run(out / record_file, record, fixed, manager.latest_step(), write=False)
        if config.resume and manager.latest_step() is not None:
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
            try:
                restored, latest = _restore_finite(manager, target)
            except Exception as err:  # orbax raises many types on structure mismatches
                raise ValueError(
                    f"{out}: checkpoint {manager.latest_step()} does not match these params/optimizer "
                    f"({type(err).__name__}: {err}); use another output folder or resume=False"
                ) from err
            if restored is not None:
                params, opt_state, start, resumed_from = restored["params"], restored["opt_state"], latest, latest
                if (out / CURVE_JSON).is_file():
                    history = [h for h in json.loads((out / CURVE_JSON).read_text()) if h["step"] <= latest]
        if record is not None:
            note = _record_run(out / record_file, record, fixed, resumed_from)
    if note:
        print(note, file=sys.stderr)

    gradients, update = _make_steps(loss_fn, optimizer)

    def save(step: int) -> None:
        # The curve first: a kill between the two leaves entries past the newest checkpoint, which
        # resume drops; the other order could lose the entries up to a checkpoint that exists.
        _write_json(out / CURVE_JSON, history)
        manager.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
        manager.wait_until_finished()

    def check(step: int, batch_step: int):
        """The loss, aux, gradients and norm of the current params on `batch_step`'s batch; stops the run
        (NonFiniteLossError) unless the params, the loss and the gradient norm are all finite."""
        loss, aux, grads, norm, params_finite = gradients(
            params, batch_fn(config.seed, batch_step), step_rng(config.seed, batch_step)
        )
        loss_value, norm_value = float(loss), float(norm)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value) and bool(params_finite)):
            if out is not None:
                _write_json(out / CURVE_JSON, history)
            last = manager.latest_step() if manager is not None else None
            raise NonFiniteLossError(_stop_message(step, loss_value, norm_value, bool(params_finite), last, out))
        return loss_value, norm_value, aux, grads

    bar = tqdm(
        total=config.end, initial=start, desc=config.description, disable=not config.progress, dynamic_ncols=True
    )
    try:
        for step in range(start, config.end):
            loss_value, norm_value, aux, grads = check(step, step)
            if manager is not None and step > start and step % config.checkpoint_every == 0:
                save(step)  # the params after `step` steps, now known to be finite with a finite loss and gradient
            params, opt_state = update(params, opt_state, grads)
            done = step + 1
            history.append({"step": done, "loss": loss_value, "grad_norm": norm_value, **_scalars(aux)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if config.end > start:
            check(config.end, config.end - 1)  # the final params, on the last step's batch
            if manager is not None:
                save(config.end)
    finally:
        bar.close()
        if manager is not None:
            manager.close()
    if out is not None and config.plot and history:
        plot_loss_curve(history, out / CURVE_PNG, config.description, config.marks)
    return TrainResult(params, opt_state, max(start, config.end), tuple(history), resumed_from)
