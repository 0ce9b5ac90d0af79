"""Next-token training of a kvjax Transformer on the retrieval tasks mixed with plain text.

Loss masking: a task row is trained on its answer only (the completion after the prompt, and EOS);
its prompt tokens get weight `prompt_loss_weight` (0 by default), because a 4K-token haystack has
~10 answer tokens and an all-token loss would be spent on predicting filler. Plain-text rows are
trained on every token, which keeps the model a language model. Each row's loss is its weighted
mean, and the batch loss the mean over rows, so long text rows do not drown short answers.
"""

from __future__ import annotations

import dataclasses
import functools
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
from kvjax.eval.haystack import NOISE, NoiseHaystack, ProseHaystack, haystack_from_name, plain_text
from kvjax.eval.tasks import default_tasks, distinct_values, get_task, make_sample
from kvjax.language_model import init_model
from kvjax.tokenizer import Tokenizer
from kvjax.train.byte_tokenizer import write_byte_tokenizer
from kvjax.train.loop import CURVE_JSON, CURVE_PNG, RUN_JSON, LoopConfig, check_learning_rate, train
from kvjax.train.word_tokenizer import DEFAULT_VOCAB, write_word_tokenizer


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
    drill_fraction: float = 0.0  # share of rows of many needles then many answered questions (see _drill_row)
    position_span: int = 0  # > seq_len: rows get position ids spread over [0, span) with skips (PoSE)
    prompt_loss_weight: float = 0.0
    answer_reserve: int = 64  # tokens kept free after a task prompt for its answer and EOS

    def __post_init__(self):
        shares = (self.text_fraction, self.copy_fraction, self.drill_fraction)
        if not all(math.isfinite(x) for x in (*shares, self.prompt_loss_weight)) or self.prompt_loss_weight < 0:
            raise ValueError(
                f"the row shares and prompt_loss_weight must be finite, the weight >= 0; got {shares}, "
                f"{self.prompt_loss_weight}"
            )
        if self.batch_size < 1 or self.min_len < 0:
            raise ValueError(f"batch_size must be >= 1 and min_len >= 0; got {self.batch_size}, {self.min_len}")
        if min(shares) < 0.0 or sum(shares) > 1.0:
            raise ValueError(
                f"text_fraction ({self.text_fraction}), copy_fraction ({self.copy_fraction}) and drill_fraction "
                f"({self.drill_fraction}) must be >= 0 with a sum <= 1"
            )
        if self.position_span and self.position_span < self.seq_len:
            raise ValueError(f"position_span {self.position_span} is shorter than seq_len {self.seq_len}")
        if self.seq_len <= self.answer_reserve + 16:
            raise ValueError(
                f"seq_len {self.seq_len} leaves no room for a prompt (answer_reserve {self.answer_reserve})"
            )
        if not self.tasks and sum(shares) < 1.0:
            raise ValueError("no tasks given: set text_fraction + copy_fraction + drill_fraction to 1")


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stage of a length curriculum: `steps` optimizer steps of `batch_size` rows of up to `seq_len` tokens."""

    seq_len: int
    batch_size: int
    steps: int
    position_span: int | None = None  # PoSE span of this phase (0: none); None keeps DataConfig's
    copy_only: bool = False  # every row a copy row: induction heads form before the tasks need them

    def __post_init__(self):
        if min(self.seq_len, self.batch_size, self.steps) < 1:
            raise ValueError(f"curriculum phase needs positive seq_len, batch_size and steps; got {self}")


def parse_curriculum(spec: str) -> tuple[Phase, ...]:
    """'128x32:900=copy,1024x8:300@8192' -> phases (`SEQxBATCH:STEPS[@POSITION_SPAN][=copy]`, in training
    order); '=copy' makes every row of the phase a copy row."""
    phases = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            body, _, rows = part.partition("=")
            if rows not in ("", "copy"):
                raise ValueError(f"unknown row kind {rows!r} (only '=copy')")
            shape, rest = body.split(":")
            steps, _, span = rest.partition("@")
            seq_len, batch = shape.lower().split("x")
            phases.append(Phase(int(seq_len), int(batch), int(steps), int(span) if span else None, rows == "copy"))
        except ValueError as err:
            raise ValueError(
                f"curriculum phase {part!r} is not SEQxBATCH:STEPS[@SPAN][=copy] (e.g. 1024x8:300@8192): {err}"
            ) from err
    if not phases:
        raise ValueError("empty curriculum")
    return tuple(phases)


def phase_data(data: DataConfig, phase: Phase, tokenizer: Tokenizer) -> DataConfig:
    """`data` at a phase's shape, keeping only the tasks whose prompts fit its seq_len."""
    span = data.position_span if phase.position_span is None else phase.position_span
    data = dataclasses.replace(data, seq_len=phase.seq_len, batch_size=phase.batch_size, position_span=span)
    if phase.copy_only:
        return dataclasses.replace(data, tasks=(), copy_fraction=1.0, drill_fraction=0.0, text_fraction=0.0)
    fitting = tuple(t for t in data.tasks if _fits(tokenizer, data, t))
    if data.tasks and not fitting:
        raise ValueError(f"no task fits a {phase.seq_len}-token curriculum phase; lengthen it")
    return dataclasses.replace(data, tasks=fitting)


def model_config(size: ModelSize, vocab_size: int, bos: int | None, eos: int, pad: int | None) -> ModelConfig:
    """The kvjax ModelConfig of a `size` model over a tokenizer's vocabulary."""
    return ModelConfig(
        family="llama",
        vocab_size=vocab_size,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_layers=size.layers,
        num_heads=size.heads,
        num_kv_heads=size.kv_heads,
        head_dim=size.head_dim,
        max_position_embeddings=size.max_positions,
        rope=RopeConfig(theta=size.rope_theta),
        bos_token_id=bos,
        eos_token_ids=(eos,),
        pad_token_id=pad,
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


@functools.lru_cache(maxsize=4)
def _copy_pool(tokenizer: Tokenizer) -> np.ndarray:
    """The distinct ids of kvjax's synthetic prose, RULER's noise and the digits (no special tokens);
    memoized per tokenizer, as building it costs ~70 ms and every copy row needs it (read-only: shared)."""
    text = " ".join([plain_text(ProseHaystack(), 0, 200), NOISE, " ".join("0123456789")])
    pool = np.unique(tokenizer.encode(text, add_special_tokens=False))
    pool.setflags(write=False)
    return pool


def _copy_row(tokenizer: Tokenizer, rng: np.random.Generator, length: int) -> tuple[list[int], list[float]]:
    """Random common token ids in segments of 4-16, where about half the segments repeat an earlier one.

    A repeat's tokens after its first are trained on: they are predictable exactly when the model
    finds the earlier occurrence of the previous token and copies what followed it (an induction
    head), at any distance. The ids are the ~200 of kvjax's prose, noise and digits rather than the
    whole vocabulary, so every id's embedding trains often (copying random ids was learned in ~100
    steps over 200-500 distinct ids, not within 150 over 2048). Retrieval rows carry ~10 answer
    tokens each; these carry hundreds.
    """
    ids = tokenizer.encode("")
    weights = [0.0] * len(ids)
    pool = _copy_pool(tokenizer)
    segments: list[list[int]] = []
    while len(ids) < length:
        if len(segments) >= 2 and rng.uniform() < 0.5:
            seg, trained = segments[int(rng.integers(len(segments)))], True
        else:
            seg, trained = [int(i) for i in rng.choice(pool, size=int(rng.integers(4, 17)))], False
            segments.append(seg)
        ids += seg
        weights += [0.0] + [1.0 if trained else 0.0] * (len(seg) - 1)
    return ids[:length], weights[:length]


def _drill_row(
    tokenizer: Tokenizer, data: DataConfig, rng: np.random.Generator, length: int
) -> tuple[list[int], list[float]]:
    """Needles "One special magic number for K is: V." spread through a haystack, then questions "The special
    magic number for K in the text above is V." for most keys in random order, trained on the values only.

    About one retrieval per 80 tokens instead of one per row, with the other keys as distractors: the
    key-matching copy that every needle task needs gets a dense signal at every distance in the row.
    """
    kind = "numbers" if rng.uniform() < 0.8 else "words"
    noun = {"numbers": "number", "words": "word"}[kind]
    n_queries = max(1, length // 80)
    n_keys = n_queries + int(rng.integers(0, n_queries // 2 + 1))
    keys, values = distinct_values(rng, "words", n_keys), distinct_values(rng, kind, n_keys)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    needles = [encode(f" One special magic {noun} for {k} is: {v}.") for k, v in zip(keys, values)]
    questions = [
        (encode(f" The special magic {noun} for {k} in the text above is"), encode(f" {v}."))
        for k, v in zip(keys, values)
    ]
    asked = [int(i) for i in rng.permutation(n_keys)[:n_queries]]

    def fixed_cost(n: int) -> int:  # tokens of the first n needles and of the questions about them
        return sum(map(len, needles[:n])) + sum(len(questions[i][0]) + len(questions[i][1]) for i in asked if i < n)

    while n_keys > 1 and fixed_cost(n_keys) > 0.7 * length:  # long tokens (bytes): fewer needles, some haystack
        n_keys -= 1
    asked = [i for i in asked if i < n_keys] or [0]
    ids = tokenizer.encode("")
    room = length - len(ids) - fixed_cost(n_keys) - 1
    haystack = (
        NoiseHaystack() if rng.uniform() < 0.3 else haystack_from_name(data.text[int(rng.integers(len(data.text)))])
    )
    units, used = [], 0
    for unit in haystack.units(int(rng.integers(2**31)), max(1, room // 4)):
        unit_ids = encode(" " + unit)
        if used + len(unit_ids) > room:
            break
        units.append(unit_ids)
        used += len(unit_ids)
    slots = np.sort(rng.integers(0, len(units) + 1, size=n_keys))  # needle i goes before unit slots[i]
    context, n = [], 0
    for s in range(len(units) + 1):
        while n < n_keys and slots[n] == s:
            context += needles[n]
            n += 1
        if s < len(units):
            context += units[s]
    ids += context + encode("\n")
    weights = [0.0] * len(ids)
    for question, answer in (questions[i] for i in asked):
        ids += question + answer
        weights += [0.0] * len(question) + [1.0] * len(answer)
    return ids[:length], weights[:length]


def pose_positions(rng: np.random.Generator, length: int, span: int, chunks: int = 3) -> np.ndarray:
    """Position ids int32[length] that rise by 1 inside `chunks` pieces and jump between them, ending
    below `span` (PoSE, Zhu et al. 2024): short rows teach the relative distances of long contexts."""
    if span <= length:
        return np.arange(length, dtype=np.int32)
    cuts = np.sort(rng.choice(np.arange(1, length), size=min(chunks - 1, length - 1), replace=False))
    extra = int(rng.integers(0, span - length + 1))
    jumps = np.diff(np.concatenate([[0], np.sort(rng.integers(0, extra + 1, size=len(cuts))), [extra]]))[:-1]
    shift = np.zeros(length, np.int64)
    for cut, jump in zip(cuts, jumps):
        shift[cut:] += jump
    return (np.arange(length) + shift).astype(np.int32)


def _row(tokenizer: Tokenizer, data: DataConfig, rng: np.random.Generator, eos: int) -> tuple[list[int], list[float]]:
    """One training row: (ids, per-token loss weights) of at most seq_len tokens."""
    min_len = data.min_len or data.seq_len // 4
    length = int(rng.integers(min(min_len, data.seq_len), data.seq_len + 1))
    seed = int(rng.integers(2**31))
    kind = rng.uniform()
    if kind < data.copy_fraction:
        return _copy_row(tokenizer, rng, length)
    if kind < data.copy_fraction + data.drill_fraction:
        return _drill_row(tokenizer, data, rng, length)
    if kind < data.copy_fraction + data.drill_fraction + data.text_fraction or not data.tasks:
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
    valid bool[B, T] (right padding is neither attended nor trained on), positions int32[B, T]."""
    tokens = np.full((data.batch_size, data.seq_len), pad, np.int32)
    positions = np.broadcast_to(np.arange(data.seq_len, dtype=np.int32), tokens.shape).copy()
    weights = np.zeros((data.batch_size, data.seq_len), np.float32)
    valid = np.zeros((data.batch_size, data.seq_len), bool)
    for r in range(data.batch_size):
        rng = np.random.default_rng([seed, step, r])
        ids, w = _row(tokenizer, data, rng, eos)
        tokens[r, : len(ids)], weights[r, : len(w)], valid[r, : len(ids)] = ids, w, True
        if data.position_span:
            positions[r] = pose_positions(rng, data.seq_len, data.position_span)
    return {"tokens": tokens, "weights": weights, "valid": valid, "positions": positions}


def make_loss_fn(graphdef: nnx.GraphDef):
    """loss_fn(params, batch, rng) -> (loss, aux) for pure-dict params of the graph `graphdef`."""

    def loss_fn(params, batch, rng):
        del rng  # no dropout
        model = nnx.merge(graphdef, params)
        tokens, valid, positions = batch["tokens"], batch["valid"], batch["positions"]
        hidden, _, _ = model(tokens, positions, valid)  # [B, T, E]
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


def schedule_marks(phases: tuple[Phase, ...], warmup: int, decay_fraction: float = 0.2) -> tuple[tuple[int, str], ...]:
    """Where `lr_schedule` and a curriculum change, as (step, label) for the loss curve."""
    steps = sum(p.steps for p in phases)
    warmup = max(1, min(warmup, steps - 1))
    decay = max(1, min(int(steps * decay_fraction), steps - warmup))
    marks, start = [(warmup, "end of warm-up"), (steps - decay, "decay")], 0
    for phase in phases[:-1]:
        start += phase.steps
        marks.append((start, f"rows of {phase.seq_len} -> next phase"))
    return tuple(sorted(marks))


def lr_schedule(lr: float, steps: int, warmup: int, decay_fraction: float = 0.2) -> optax.Schedule:
    """Warmup-stable-decay: linear warmup to `lr`, constant, then linear decay to lr/10 over the last
    `decay_fraction` of the steps. Held at its peak until the end is near, because induction heads
    form after a plateau whose escape a decaying rate delays (kvjax's copy probes escaped it only
    while the rate stayed near its peak; under cosine decay over 600 steps they never did)."""
    warmup = max(1, min(warmup, steps - 1))
    decay = max(1, min(int(steps * decay_fraction), steps - warmup))
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, lr, warmup),
            optax.constant_schedule(lr),
            optax.linear_schedule(lr, lr / 10, decay),
        ],
        [warmup, steps - decay],
    )


def make_optimizer(lr: float, steps: int, warmup: int, clip: float = 1.0, weight_decay: float = 0.01):
    """AdamW on the warmup-stable-decay schedule, after global-norm clipping."""
    schedule = lr_schedule(lr, steps, warmup)
    return optax.chain(
        optax.clip_by_global_norm(clip), optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay)
    )


def _tokenizer_files(spec: str, build_dir: Path) -> tuple[Path, dict[str, Path]]:
    """(folder, {file name: path}) of the tokenizer `spec` names: "byte", "bpe[:VOCAB]" (written to
    `build_dir`, or reused from there on resume) or a folder with tokenizer.json."""
    if spec == "byte":
        return build_dir, write_byte_tokenizer(build_dir)
    if spec == "bpe" or spec.startswith("bpe:"):
        vocab = str(DEFAULT_VOCAB) if spec == "bpe" else spec.partition(":")[2]
        if not vocab.isdigit():
            raise ValueError(f"tokenizer {spec!r}: the vocabulary size after 'bpe:' must be an integer")
        if not (build_dir / "tokenizer.json").is_file():  # learning the merges takes a while; resume reuses them
            write_word_tokenizer(build_dir, int(vocab))
        elif Tokenizer(build_dir).vocab_size != int(vocab):
            raise ValueError(
                f"{build_dir} holds a tokenizer of another vocabulary size than {spec!r} (a previous run "
                f"with this work dir); choose a new --work-dir or --out"
            )
        return build_dir, {name: build_dir / name for name in ("tokenizer.json", "tokenizer_config.json")}
    folder = Path(spec)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"tokenizer {spec!r} is not 'byte', 'bpe', 'bpe:VOCAB' or a folder with a tokenizer.json")
    return folder, {p.name: p for p in folder.iterdir() if p.name in ("tokenizer.json", "tokenizer_config.json")}


def train_lm(
    out: str | Path,
    size: ModelSize = ModelSize(),
    data: DataConfig = DataConfig(),
    *,
    steps: int = 1000,
    lr: float = 1e-3,
    warmup: int = 100,
    seed: int = 0,
    checkpoint_every: int = 200,
    tokenizer: str = "byte",
    work_dir: str | Path | None = None,
    save_dtype: str = "float32",
    progress: bool = True,
    command: str | None = None,
    curriculum: tuple[Phase, ...] = (),
    stop_at: int | None = None,
) -> Path | None:
    """Trains a model from scratch and writes it as a kvjax checkpoint at `out` (with its loss curve).

    Training state (orbax checkpoints, loss curve) lives in `work_dir` (default `<out>.train`), so an
    interrupted run resumes by rerunning the same command. `tokenizer` is "byte", "bpe" or "bpe:VOCAB" (built
    here, see word_tokenizer) or a folder holding a tokenizer.json.
    With `stop_at`, training ends after that step's checkpoint and nothing is written at `out` (returns
    None): one stage of a staged recipe, its learning-rate schedule still spanning every phase; the next
    command resumes the work dir.
    A `curriculum` replaces (data.seq_len, data.batch_size, steps) by its phases: short rows first learn
    the retrieval mechanism cheaply, longer ones then teach it over distance (attention cost grows as T^2).
    """
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out (training state resumes from the work dir)")
    lr = check_learning_rate(lr)
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0; got {warmup}")
    work = Path(work_dir).absolute() if work_dir else out.with_name(out.name + ".train")
    phases = curriculum or (Phase(data.seq_len, data.batch_size, steps),)
    steps = sum(p.steps for p in phases)
    loop = LoopConfig(
        steps=steps,
        seed=seed,
        checkpoint_every=checkpoint_every,
        progress=progress,
        description="train-lm",
        stop_at=stop_at,
        marks=schedule_marks(phases, warmup),
    )  # checked before anything is written
    tok_dir, files = _tokenizer_files(tokenizer, work / "tokenizer")
    tokenizer_name, tokenizer = tokenizer, Tokenizer(tok_dir)
    bos, eos, pad = special_ids(tokenizer)
    config = model_config(size, tokenizer.vocab_size, bos, eos, pad)
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
    record = {
        "command": command or " ".join(sys.argv),
        "model_size": dataclasses.asdict(size),
        "tokenizer": tokenizer_name,
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "warmup": warmup,
        "data": dataclasses.asdict(data),
        "curriculum": [dataclasses.asdict(p) for p in curriculum],
    }
    result = train(
        params,
        make_loss_fn(model.graphdef),
        make_optimizer(lr, steps, warmup),
        batch_fn,
        loop,
        work,
        record=record,
        fixed=("model_size", "tokenizer"),  # a resume that changed them would not even restore
    )
    if result.step < steps:
        return None
    resumes = json.loads((work / RUN_JSON).read_text()).get("resumes", [])
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(result.params))
    saved = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(save_dtype)), result.params)
    metadata = {
        "trained_by": "kvjax train-lm",
        "command": command or " ".join(sys.argv),
        "steps": steps,
        "seed": seed,
        "parameters": n_params,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "model_size": dataclasses.asdict(size),
        "data": dataclasses.asdict(data),
        "lr": lr,
        "warmup": warmup,
        "curriculum": [dataclasses.asdict(p) for p in curriculum],
        "tokenizer": tokenizer_name,
    }
    if resumes:  # every command that trained it: each resume's step and what it changed, as [old, new]
        metadata["resumes"] = resumes
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
