"""Next-token training of a kvjax Transformer on the retrieval tasks mixed with plain text.

Loss masking: a task row is trained on its answer only (the completion after the prompt, and EOS);
its prompt tokens get weight `prompt_loss_weight` (0 by default), because a 4K-token haystack has
~10 answer tokens and an all-token loss would be spent on predicting filler. Plain-text rows are
trained on every token, which keeps the model a language model. Each row's loss is its weighted
mean, and the batch loss the mean over rows, so long text rows do not drown short answers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kvjax.checkpoint import save_checkpoint
from kvjax.config import ModelConfig, RopeConfig
from kvjax.eval.haystack import haystack_from_name, plain_text
from kvjax.eval.tasks import default_tasks, get_task, make_sample
from kvjax.language_model import init_model
from kvjax.tokenizer import Tokenizer
from kvjax.train.byte_tokenizer import write_byte_tokenizer
from kvjax.train.loop import CURVE_JSON, CURVE_PNG, LoopConfig, train


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Architecture knobs of a trained-from-scratch Llama (GQA)."""

    layers: int = 6
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 768
    rope_theta: float = 100_000.0
    max_positions: int = 32_768


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The training mixture: task rows and plain-text rows, lengths spread over [min_len, seq_len]."""

    seq_len: int = 1024
    batch_size: int = 8
    min_len: int = 0  # 0: seq_len // 4
    tasks: tuple[str, ...] = tuple(default_tasks())
    text: tuple[str, ...] = ("prose",)  # haystack names / folders for plain-text rows
    text_fraction: float = 0.25
    copy_fraction: float = 0.0  # share of rows of random words whose earlier spans recur (see _copy_row)
    prompt_loss_weight: float = 0.0
    answer_reserve: int = 64  # tokens kept free after a task prompt for its answer and EOS

    def __post_init__(self):
        if not (0.0 <= self.text_fraction and 0.0 <= self.copy_fraction and self.text_fraction + self.copy_fraction <= 1.0):
            raise ValueError(
                f"text_fraction ({self.text_fraction}) and copy_fraction ({self.copy_fraction}) must be >= 0 "
                f"with a sum <= 1"
            )
        if self.seq_len <= self.answer_reserve + 16:
            raise ValueError(f"seq_len {self.seq_len} leaves no room for a prompt (answer_reserve {self.answer_reserve})")
        if not self.tasks and self.text_fraction + self.copy_fraction < 1.0:
            raise ValueError("no tasks given: set text_fraction + copy_fraction to 1")


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stage of a length curriculum: `steps` optimizer steps of `batch_size` rows of up to `seq_len` tokens."""

    seq_len: int
    batch_size: int
    steps: int

    def __post_init__(self):
        if min(self.seq_len, self.batch_size, self.steps) < 1:
            raise ValueError(f"curriculum phase needs positive seq_len, batch_size and steps; got {self}")


def parse_curriculum(spec: str) -> tuple[Phase, ...]:
    """'640x12:300,1024x8:300' -> phases (SEQxBATCH:STEPS, in training order)."""
    phases = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            shape, steps = part.split(":")
            seq_len, batch = shape.lower().split("x")
            phases.append(Phase(int(seq_len), int(batch), int(steps)))
        except ValueError as err:
            raise ValueError(f"curriculum phase {part!r} is not SEQxBATCH:STEPS (e.g. 1024x8:300): {err}") from err
    if not phases:
        raise ValueError("empty curriculum")
    return tuple(phases)


def phase_data(data: DataConfig, phase: Phase, tokenizer: Tokenizer) -> DataConfig:
    """`data` at a phase's shape, keeping only the tasks whose prompts fit its seq_len."""
    data = dataclasses.replace(data, seq_len=phase.seq_len, batch_size=phase.batch_size)
    fitting = tuple(t for t in data.tasks if _fits(tokenizer, data, t))
    if data.tasks and not fitting:
        raise ValueError(f"no task fits a {phase.seq_len}-token curriculum phase; lengthen it")
    return dataclasses.replace(data, tasks=fitting)


def model_config(size: ModelSize, vocab_size: int, bos: int | None, eos: int, pad: int | None) -> ModelConfig:
    """The kvjax ModelConfig of a `size` model over a tokenizer's vocabulary."""
    return ModelConfig(
        family="llama", vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_layers=size.layers, num_heads=size.heads, num_kv_heads=size.kv_heads, head_dim=size.head_dim,
        max_position_embeddings=size.max_positions, rope=RopeConfig(theta=size.rope_theta),
        bos_token_id=bos, eos_token_ids=(eos,), pad_token_id=pad,
    )


def special_ids(tokenizer: Tokenizer) -> tuple[int | None, int, int]:
    """(bos, eos, pad) ids from the tokenizer's config; pad falls back to eos."""
    def lookup(key):
        name = tokenizer.config.get(key)
        name = name.get("content") if isinstance(name, dict) else name
        return tokenizer.token_id(name) if name else None

    bos, eos, pad = lookup("bos_token"), lookup("eos_token"), lookup("pad_token")
    if eos is None:
        raise ValueError("the tokenizer has no eos_token in tokenizer_config.json; training needs one to end answers")
    return bos, eos, pad if pad is not None else eos


_COPY_CHARS = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))


def _copy_row(tokenizer: Tokenizer, rng: np.random.Generator, length: int) -> tuple[list[int], list[float]]:
    """Random words in segments of 4-16 words, where about half the segments repeat an earlier one.

    Only a repeat's tokens after its first three are trained on: they are predictable exactly when
    the model finds the earlier occurrence and copies from it (an induction head), at any distance.
    Retrieval rows carry ~10 answer tokens each; these carry hundreds, so the copying mechanism
    that retrieval needs forms in far fewer steps.
    """
    ids, weights = tokenizer.encode(""), []
    weights = [0.0] * len(ids)
    segments: list[list[int]] = []
    while len(ids) < length:
        if len(segments) >= 2 and rng.uniform() < 0.5:
            seg, trained = segments[int(rng.integers(len(segments)))], True
        else:
            words = ["".join(rng.choice(_COPY_CHARS, size=int(rng.integers(2, 8)))) for _ in range(int(rng.integers(4, 17)))]
            seg, trained = tokenizer.encode(" " + " ".join(words) + ".", add_special_tokens=False), False
            segments.append(seg)
        ids += seg
        weights += [0.0] * min(3, len(seg)) + [1.0 if trained else 0.0] * max(0, len(seg) - 3)
    return ids[:length], weights[:length]


def _row(tokenizer: Tokenizer, data: DataConfig, rng: np.random.Generator, eos: int) -> tuple[list[int], list[float]]:
    """One training row: (ids, per-token loss weights) of at most seq_len tokens."""
    min_len = data.min_len or data.seq_len // 4
    length = int(rng.integers(min(min_len, data.seq_len), data.seq_len + 1))
    seed = int(rng.integers(2**31))
    kind = rng.uniform()
    if kind < data.copy_fraction:
        return _copy_row(tokenizer, rng, length)
    if kind < data.copy_fraction + data.text_fraction or not data.tasks:
        haystack = haystack_from_name(data.text[int(rng.integers(len(data.text)))])
        units = 16
        ids = tokenizer.encode(plain_text(haystack, seed, units))
        while len(ids) < length:
            units *= 2
            ids = tokenizer.encode(plain_text(haystack, seed, units))
        return ids[:length], [1.0] * length
    depth = float(rng.uniform())
    for _ in range(8 * len(data.tasks)):
        task = get_task(data.tasks[int(rng.integers(len(data.tasks)))])
        try:
            sample = make_sample(task, tokenizer, max(length - data.answer_reserve, 1), seed, depth)
            break
        except ValueError:  # too short for this task's fixed text: the longest row, else another task
            try:
                sample = make_sample(task, tokenizer, data.seq_len - data.answer_reserve, seed, depth)
                break
            except ValueError:
                seed = int(rng.integers(2**31))
    else:
        raise ValueError(f"no task of {data.tasks} fits {data.seq_len} tokens")
    prompt = tokenizer.encode(sample.prompt)
    answer = tokenizer.encode(sample.target, add_special_tokens=False) + [eos]
    if len(prompt) + len(answer) > data.seq_len:
        raise ValueError(f"{task.name}: answer of {len(answer)} tokens exceeds answer_reserve {data.answer_reserve}")
    return prompt + answer, [data.prompt_loss_weight] * len(prompt) + [1.0] * len(answer)


def _fits(tokenizer: Tokenizer, data: DataConfig, name: str) -> bool:
    try:
        make_sample(get_task(name), tokenizer, data.seq_len - data.answer_reserve, 0, 0.5)
    except ValueError:
        return False
    return True


def check_data(tokenizer: Tokenizer, data: DataConfig) -> None:
    """Raises ValueError naming the first task whose prompt cannot fit in seq_len."""
    for name in data.tasks:
        try:
            make_sample(get_task(name), tokenizer, data.seq_len - data.answer_reserve, 0, 0.5)
        except ValueError as err:
            raise ValueError(f"--seq-len {data.seq_len} is too short for task {name}: {err}") from err


def make_batch(tokenizer: Tokenizer, data: DataConfig, pad: int, eos: int, seed: int, step: int) -> dict:
    """The batch of a step: a pure function of (seed, step). tokens int32[B, T], weights float32[B, T],
    valid bool[B, T] (right padding is neither attended nor trained on)."""
    tokens = np.full((data.batch_size, data.seq_len), pad, np.int32)
    weights = np.zeros((data.batch_size, data.seq_len), np.float32)
    valid = np.zeros((data.batch_size, data.seq_len), bool)
    for r in range(data.batch_size):
        ids, w = _row(tokenizer, data, np.random.default_rng([seed, step, r]), eos)
        tokens[r, : len(ids)], weights[r, : len(w)], valid[r, : len(ids)] = ids, w, True
    return {"tokens": tokens, "weights": weights, "valid": valid}


def make_loss_fn(graphdef: nnx.GraphDef):
    """loss_fn(params, batch, rng) -> (loss, aux) for pure-dict params of the graph `graphdef`."""

    def loss_fn(params, batch, rng):
        del rng  # no dropout
        model = nnx.merge(graphdef, params)
        tokens, valid = batch["tokens"], batch["valid"]
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        hidden, _ = model(tokens, positions, valid)  # [B, T, E]
        logits = model.logits(hidden[:, :-1])  # [B, T-1, V]: position t predicts token t+1
        targets = tokens[:, 1:]  # [B, T-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T-1]
        w = batch["weights"][:, 1:] * valid[:, 1:]  # [B, T-1]
        row_w = w.sum(axis=1)  # [B]
        row_loss = (nll * w).sum(axis=1) / jnp.maximum(row_w, 1e-9)  # [B]
        has = (row_w > 0).astype(jnp.float32)
        loss = (row_loss * has).sum() / jnp.maximum(has.sum(), 1.0)
        hit = (jnp.argmax(logits, axis=-1) == targets) & (w > 0)
        accuracy = hit.sum() / jnp.maximum((w > 0).sum(), 1)
        return loss, {"token_accuracy": accuracy}

    return loss_fn


def make_optimizer(lr: float, steps: int, warmup: int, clip: float = 1.0, weight_decay: float = 0.01):
    """AdamW with linear warmup and cosine decay to lr/10, after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, min(warmup, steps - 1)), steps, lr / 10)
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay))


def train_lm(
    out: str | Path, size: ModelSize = ModelSize(), data: DataConfig = DataConfig(), *, steps: int = 1000,
    lr: float = 1e-3, warmup: int = 100, seed: int = 0, checkpoint_every: int = 200, tokenizer_dir: str | None = None,
    work_dir: str | Path | None = None, save_dtype: str = "float32", progress: bool = True,
    command: str | None = None, curriculum: tuple[Phase, ...] = (),
) -> Path:
    """Trains a model from scratch and writes it as a kvjax checkpoint at `out` (with its loss curve).

    Training state (orbax checkpoints, loss curve) lives in `work_dir` (default `<out>.train`), so an
    interrupted run resumes by rerunning the same command. `tokenizer_dir=None` builds the byte tokenizer.
    A `curriculum` replaces (data.seq_len, data.batch_size, steps) by its phases: short rows first learn
    the retrieval mechanism cheaply, longer ones then teach it over distance (attention cost grows as T^2).
    """
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out (training state resumes from the work dir)")
    work = Path(work_dir).absolute() if work_dir else out.with_name(out.name + ".train")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else work / "tokenizer"
    if tokenizer_dir is None:
        files = write_byte_tokenizer(tok_dir)
    else:
        if not (tok_dir / "tokenizer.json").is_file():
            raise ValueError(f"{tok_dir} has no tokenizer.json")
        files = {p.name: p for p in tok_dir.iterdir() if p.name in ("tokenizer.json", "tokenizer_config.json")}
    tokenizer = Tokenizer(tok_dir)
    bos, eos, pad = special_ids(tokenizer)
    config = model_config(size, tokenizer.vocab_size, bos, eos, pad)
    phases = curriculum or (Phase(data.seq_len, data.batch_size, steps),)
    steps = sum(p.steps for p in phases)
    longest = max(p.seq_len for p in phases)
    if longest > config.max_position_embeddings:
        raise ValueError(f"seq_len {longest} exceeds max_positions {config.max_position_embeddings}")
    if curriculum:
        phase_configs = [phase_data(data, p, tokenizer) for p in phases]
    else:
        check_data(tokenizer, data)
        phase_configs = [data]
    ends = np.cumsum([p.steps for p in phases])

    def batch_fn(seed: int, step: int) -> dict:
        phase = int(np.searchsorted(ends, step, side="right"))
        return make_batch(tokenizer, phase_configs[min(phase, len(phases) - 1)], pad, eos, seed, step)

    model = init_model(config, seed=seed, dtype=jnp.float32)
    params = nnx.to_pure_dict(model.params)
    result = train(
        params, make_loss_fn(model.graphdef), make_optimizer(lr, steps, warmup),
        batch_fn,
        LoopConfig(steps=steps, seed=seed, checkpoint_every=checkpoint_every, progress=progress, description="train-lm"),
        work,
    )
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(result.params))
    saved = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(save_dtype)), result.params)
    metadata = {
        "trained_by": "kvjax train-lm", "command": command or " ".join(sys.argv), "steps": steps, "seed": seed,
        "parameters": n_params, "final_loss": result.history[-1]["loss"] if result.history else None,
        "model_size": dataclasses.asdict(size), "data": dataclasses.asdict(data), "lr": lr, "warmup": warmup,
        "curriculum": [dataclasses.asdict(p) for p in curriculum],
        "tokenizer": "bytes" if tokenizer_dir is None else str(tokenizer_dir),
    }
    save_checkpoint(out, config, saved, files, metadata)
    for name in (CURVE_JSON, CURVE_PNG):
        if (work / name).is_file():
            shutil.copyfile(work / name, out / name)
    return out


def history_summary(out: Path) -> str:
    """A one-line summary of a trained checkpoint's loss curve (first and last loss)."""
    curve = json.loads((Path(out) / CURVE_JSON).read_text())
    first, last = curve[0]["loss"], curve[-1]["loss"]
    return f"loss {first:.4f} -> {last:.4f} over {curve[-1]['step']} steps" if math.isfinite(last) else "loss diverged"
