"""The evaluation harness behind `kvjax eval`: every policy x budget on every task x length, scored as RULER does.

Each policy maps a token budget onto its own fields (`Policy.with_budget`); policies without one (Full,
KIVI, CSKV, PromptSVD) run once at their settings.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import re
import time
import typing
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

import kvjax
from kvjax.attention import KEY_BLOCK
from kvjax.config import ModelConfig
from kvjax.eval.haystack import haystack_from_name
from kvjax.eval.prompting import encode_prompt, resolve_chat
from kvjax.eval.tasks import Sample, default_tasks, digit_match, get_task, make_samples, string_match_all
from kvjax.inference import greedy_decode, prefill_shared, release_compiled, shares_prefill
from kvjax.language_model import LanguageModel
from kvjax.policies import Full, Policy


def policy_classes() -> dict[str, type]:
    """Lower-case names of every concrete policy in kvjax.policies.__all__, plus `streaming`."""
    out = {}
    for name in kvjax.policies.__all__:
        obj = getattr(kvjax.policies, name)
        if isinstance(obj, type) and issubclass(obj, Policy) and not inspect.isabstract(obj):
            out[name.lower()] = obj
    if "streamingllm" in out:
        out["streaming"] = out["streamingllm"]
    return out


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """A policy as the command line names it: `name` or `name(field=value, ...)`, values as Python
    literals (`kivi(bits=2)`, `snapkv(window=64,pooling='max')`)."""

    name: str  # a key of policy_classes()
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return self.name + (f"({','.join(f'{k}={v}' for k, v in self.options)})" if self.options else "")

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        match = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*(?:\((.*)\))?\s*", text)
        if match is None:
            raise ValueError(f"cannot read policy {text!r}: expected NAME or NAME(FIELD=VALUE, ...)")
        name, args = match.group(1).lower(), match.group(2)
        if name not in policy_classes():
            raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(policy_classes()))}")
        options = []
        for item in split_top_level(args or ""):
            key, sep, value = item.partition("=")
            if not sep or not key.strip().isidentifier():
                raise ValueError(f"policy {text!r}: options are FIELD=VALUE; got {item!r}")
            try:
                parsed = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                parsed = value.strip()  # a bare word: a string
            options.append((key.strip(), parsed))
        return cls(name, tuple(options))


def split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside parentheses and brackets; empty parts dropped."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += (char in "([") - (char in ")]")
        if char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [p for p in parts if p]


def build_policy(
    spec: PolicySpec | str, config: ModelConfig | None = None, files: Mapping[str, str] | None = None
) -> Policy:
    """The policy a spec names: from its file (`files[name]`, for a policy with `file_needed`, for a
    model of `config`) or from its fields alone."""
    spec = PolicySpec.parse(spec) if isinstance(spec, str) else spec
    cls, options, path = policy_classes()[spec.name], dict(spec.options), (files or {}).get(spec.name)
    if cls.file_needed is not None:
        if path is None:
            raise ValueError(f"policy {spec.name} is built from {cls.file_needed}; pass --policy-file {spec.name}=PATH")
        if config is None:
            raise ValueError(f"policy {spec.name} is built for a model: pass its config")
        return cls.from_file(path, config, **options)
    if path is not None:
        raise ValueError(f"policy {spec.name} is not built from a file; drop --policy-file {spec.name}=...")
    hints = typing.get_type_hints(cls)
    for key, value in options.items():  # a field holding a policy takes a spec: quantizedpruning(base=snapkv)
        hint = hints.get(key)
        if isinstance(value, str) and isinstance(hint, type) and issubclass(hint, Policy):
            options[key] = build_policy(value, config, files)
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"policy {spec.label}: {err}") from err


@dataclasses.dataclass(frozen=True)
class PolicyRun:
    """One column of the evaluation: a label, the policy name and budget it came from, the policy."""

    label: str
    name: str
    budget: int | None
    policy: Policy
    compression_ratio: float | None = None


def resolve_policies(
    specs: Iterable[str | PolicySpec],
    budgets: Sequence[int] = (),
    log: Callable[[str], None] = print,
    *,
    ratios: Sequence[float] = (),
    config: ModelConfig | None = None,
    files: Mapping[str, str] | None = None,
) -> list[PolicyRun]:
    """Policy runs from specs (`build_policy`): for a policy with a token budget (`Policy.with_budget`)
    one per budget (label `name@256`) and one per compression ratio (`name@r0.5`, resolved against each
    prompt); one at its settings otherwise."""
    for ratio in ratios:
        if not 0 <= ratio < 1:
            raise ValueError(f"a compression ratio is the fraction of entries removed, in [0, 1); got {ratio}")
    runs = []
    for spec in specs:
        spec = PolicySpec.parse(spec) if isinstance(spec, str) else spec
        base = build_policy(spec, config, files)
        mapped = [(b, base.with_budget(b)) for b in budgets]
        if base.with_budget(1 << 16) is None or not (budgets or ratios):  # a large budget any policy takes
            if (budgets or ratios) and spec.name != "full":
                log(
                    f"{spec.label}: no token budget to set; --budgets/--compression-ratio ignored, running its settings"
                )
            runs.append(PolicyRun(spec.label, spec.name, None, base))
            continue
        runs += [PolicyRun(f"{spec.label}@{b}", spec.name, b, p) for b, p in mapped]
        for ratio in ratios:
            policy = dataclasses.replace(base, compression_ratio=ratio)
            runs.append(PolicyRun(f"{spec.label}@r{ratio:g}", spec.name, None, policy, ratio))
    if not runs:
        raise ValueError("no policy to run")
    return runs


def as_runs(policies) -> list[PolicyRun]:
    """PolicyRuns from a list of PolicyRun / Policy objects or a {label: Policy} mapping (Python API)."""
    if isinstance(policies, Mapping):
        return [PolicyRun(str(k), type(p).__name__.lower(), None, p) for k, p in policies.items()]
    runs = []
    for p in policies:
        if isinstance(p, PolicyRun):
            runs.append(p)
        elif isinstance(p, Policy):
            runs.append(PolicyRun(type(p).__name__.lower(), type(p).__name__.lower(), None, p))
        else:
            raise ValueError(f"expected kvjax.policies objects or PolicyRun; got {type(p).__name__}")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"policy labels must be unique; got {labels} (pass a {{label: policy}} mapping)")
    return runs


def parse_length(text: str) -> int:
    """'4k' -> 4096, '1.5k' -> 1536, '3000' -> 3000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*", text)
    if not match:
        raise ValueError(f"bad length {text!r}: expected e.g. 2048, 2k or 1.5k")
    value = float(match.group(1)) * (1024 if match.group(2) else 1)
    if value < 1 or value != int(value):
        raise ValueError(f"bad length {text!r}: must be a positive whole number of tokens")
    return int(value)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to run: tasks, prompt lengths in tokens, samples per (task, length), and how."""

    tasks: tuple[str, ...] = tuple(default_tasks())
    lengths: tuple[int, ...] = (2048, 4096)
    samples: int = 10
    seed: int = 0
    haystack: str | None = None  # None: each task's RULER default; else noise / prose / a folder
    max_new_tokens: int | None = None  # None: each task's default
    batch_size: int | None = None  # prompts per batch; None: as many as half the free memory holds
    chunk_size: int | None = None  # None: the policy's own (`kvjax.prefill`)
    timing: bool = True  # time the prompt and the decode steps separately (each batch again, compiled first)
    chat: bool | None = None  # prompts through the chat template, answer prefix pre-filled; None: when it has one
    query_aware: bool = False  # compress context and question together (else the context alone, then ask)
    share_prefill: bool = True  # policies whose prefill is Full's share one forward per batch (query-agnostic)
    attention_impl: str = "auto"  # how attention runs (kvjax.inference.Execution); "reference" forces the jnp path
    # Each policy's own prefill of a batch packed (`kvjax.packing`): the same answers, less padding computed.
    # Policies sharing a forward (`share_prefill`) still share it, unpacked.
    packing: bool = False

    def answer_settings(self) -> dict:
        """The settings a cell's answers depend on (batching and timing do not change them): two runs
        whose settings agree may fill one table."""
        names = ("samples", "seed", "haystack", "max_new_tokens", "chunk_size", "chat", "query_aware", "attention_impl")
        return {name: getattr(self, name) for name in names}

    def __post_init__(self):
        if self.samples < 1 or (self.batch_size or 1) < 1 or not self.lengths or not self.tasks:
            raise ValueError("need samples >= 1, batch_size >= 1, and at least one task and one length")


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[tuple[list[int], int]]:
    """Prompt indices in batches of one size: sorted by length (a batch pads only to its own longest),
    as few batches as `batch_size` allows, balanced, the last topped up with repeats of its final prompt.
    Returns (indices, real) per batch: the first `real` indices are its own, the rest are filler whose
    outputs are dropped. Equal shapes mean one compile per (policy, length bucket) rather than one more
    for a short last batch; rows do not interact, so answers do not depend on the batching."""
    if batch_size < 1 or not lengths:
        raise ValueError(f"need at least one prompt and batch_size >= 1; got {len(lengths)}, {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    size = math.ceil(len(order) / math.ceil(len(order) / batch_size))
    batches = []
    for start in range(0, len(order), size):
        own = order[start : start + size]
        batches.append((own + [own[-1]] * (size - len(own)), len(own)))
    return batches


def free_memory_bytes() -> int:
    """Bytes the default device can still allocate: its allocator's limit on an accelerator, the
    host's available memory on CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return _host_available_bytes()


def _host_available_bytes() -> int:
    """The kernel's MemAvailable (free plus reclaimable page cache) where /proc says it, else the
    free pages alone, which undercount a machine whose cache holds the model's files."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def batch_size_for_memory(
    config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int, itemsize: int, free: int
) -> int:
    """The most prompts of `prompt_len` tokens whose prefill fits in half of `free` bytes: per sequence,
    Full's cache (the largest any policy allocates) plus one chunk's activations (float32 attention
    weights against the whole cache, held a few times over, and the MLP's hidden states)."""
    slots = prompt_len + max_new_tokens
    cache = config.num_layers * config.num_kv_heads * slots * (2 * config.head_dim * itemsize + 4)
    weights = 3 * config.num_heads * chunk * slots * 4
    hidden = chunk * (6 * config.hidden_size + 3 * config.intermediate_size) * 4
    return max(1, (free // 2) // (cache + weights + hidden))


def shared_group_size(
    config: ModelConfig, prompt_len: int, max_new_tokens: int, batch: int, itemsize: int, free: int
) -> int:
    """How many policies one shared prefill forward (`prefill_shared`) of `batch` prompts may carry in `free`
    bytes: per policy and sequence, a prompt-sized cache twice (the layer scan's input and output) and one
    query block's float32 attention weights against the prompt, held a few times over (its scores)."""
    slots = prompt_len + max_new_tokens
    cache = config.num_layers * config.num_kv_heads * slots * (2 * config.head_dim * itemsize + 4)
    weights = 3 * config.num_heads * min(KEY_BLOCK, prompt_len) * slots * 4
    return max(1, free // ((2 * cache + weights) * batch))


def split_prompt(tokenizer, sample: Sample, query_aware: bool) -> tuple[list[int], list[int]]:
    """(ids compressed, ids fed after compression): the whole prompt and nothing when `query_aware`,
    else the prompt cut where its question starts, so the policy compresses the context without knowing
    the question (kvpress's default), and the question, generation prompt and answer prefix follow."""
    if query_aware:
        return encode_prompt(tokenizer, sample.prompt, sample.chat), []
    at = sample.prompt.rindex(sample.question)
    tail = tokenizer.encode(sample.prompt[at:], add_special_tokens=False)
    return encode_prompt(tokenizer, sample.prompt[:at], sample.chat), tail


def _predictions(m: LanguageModel, out: np.ndarray) -> list[str]:
    eos = set(m.config.eos_token_ids)
    texts = []
    for row in out:
        stop = next((i for i, t in enumerate(row) if int(t) in eos), len(row))
        texts.append(m.tokenizer.decode(row[:stop]))
    return texts


def _room(prompts: list[tuple[list[int], list[int]]], new: int) -> int:
    """Decode steps a compressed context must hold: the longest question fed after it, then the answer,
    rounded up to a multiple of 16 so batches whose questions differ by a token share a compile."""
    return -(-(max(len(q) for _, q in prompts) + new) // 16) * 16


def _bytes_per_sequence(m: LanguageModel, prompts, policy: Policy, chunk: int, new: int) -> float:
    """Device bytes of the state after the compressed part of the prompts (with room for the rest and the
    answer), from abstract shapes (nothing is allocated)."""
    contexts, room = [c for c, _ in prompts], _room(prompts, new)
    state = jax.eval_shape(lambda: kvjax.prefill(m, contexts, policy, chunk_size=chunk, max_new_tokens=room))
    return kvjax.kv_bytes(state) / len(prompts)


def _answer(m: LanguageModel, prompts, policy: Policy, config: EvalConfig, new: int, state=None) -> np.ndarray:
    """int32[B, new]: greedy answers. A prompt is (compressed ids, ids asked after): with nothing after, one
    generate; else the contexts prefilled and compressed (or `state`, their prefill already made), then the
    rest fed on top and decoded."""
    contexts, asked = [c for c, _ in prompts], [q for _, q in prompts]
    run = {"chunk_size": config.chunk_size, "attention_impl": config.attention_impl, "packing": config.packing}
    if not asked[0]:
        return np.asarray(kvjax.generate(m, contexts, new, policy, **run))
    if state is None:
        state = kvjax.prefill(m, contexts, policy, max_new_tokens=_room(prompts, new), **run)
    return np.asarray(kvjax.generate(m, asked, new, policy, state=state, attention_impl=config.attention_impl))


def _shared_answers(
    m: LanguageModel, runs: list[PolicyRun], encoded, batches, new: int, config: EvalConfig, bar
) -> dict[tuple[str, int], np.ndarray]:
    """{(label, batch): answers} for the runs that share a prefill forward on a batch (`prefill_shared`:
    policies whose prefill is Full's, e.g. StreamingLLM, SnapKV and H2O at every ratio), as many per forward
    as the free memory holds (`shared_group_size`). Only contexts compressed without their question
    share: a query-aware prompt is one `generate` per policy."""
    if config.query_aware or not config.share_prefill:
        return {}
    answers = {}
    for b, (idx, _) in enumerate(batches):
        prompts = [encoded[i] for i in idx]
        contexts = [c for c, _ in prompts]
        width = max(len(c) for c in contexts)
        sharing = [
            r for r, ok in zip(runs, shares_prefill(m, [r.policy for r in runs], width, config.chunk_size)) if ok
        ]
        if len(sharing) < 2:
            continue
        group = shared_group_size(m.config, width, new, len(prompts), m.dtype.itemsize, free_memory_bytes())
        for start in range(0, len(sharing), group):
            members = sharing[start : start + group]
            bar.set_description(f"shared prefill of {len(members)} policies")
            states = prefill_shared(
                m,
                contexts,
                [r.policy for r in members],
                chunk_size=config.chunk_size,
                max_new_tokens=_room(prompts, new),
                attention_impl=config.attention_impl,
            )
            for run, state in zip(members, states):
                try:
                    answers[run.label, b] = _answer(m, prompts, run.policy, config, new, state)
                except ValueError:  # left to the run on its own, which reports it
                    pass
    return answers


def _timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def _time_prefill_and_decode(
    m: LanguageModel,
    ids: list[list[int]],
    policy: Policy,
    chunk: int,
    first,
    new: int,
    impl: str = "auto",
    packing: bool = False,
):
    """(seconds for the prompt, seconds per decoded token), both already compiled by the `generate` that
    just ran at these shapes. The decode is generate's own jitted loop (greedy, no EOS stop) fed its
    first token `first` int32[B] for `new` steps, so no per-token Python dispatch is timed. `packing`:
    the prompt prefilled packed (`kvjax.packing`)."""
    run = dict(attention_impl=impl)
    state, t_prefill = _timed(
        lambda: kvjax.prefill(m, ids, policy, chunk_size=chunk, max_new_tokens=new, packing=packing, **run)
    )
    _, t_decode = _timed(lambda: greedy_decode(m, state, first, new, policy, **run))
    return t_prefill, t_decode / new


def run_eval(
    m: LanguageModel,
    policies,
    config: EvalConfig = EvalConfig(),
    progress: bool = True,
    log: Callable[[str], None] = print,
    done: Collection[tuple[str, int, str]] = (),
    on_group: Callable[[list[dict], list[dict]], None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """(rows, sample rows): one row per (task, length, policy) with accuracy (string_match_all), digits
    (digit_match), kv_bytes, compression vs Full and times; one sample row per prompt with its prediction
    and both scores. Greedy decoding; prompts as `config.chat` resolves for the model's tokenizer.
    Cells (task, length, policy label) in `done` are skipped; `on_group(rows, sample_rows)` receives the
    rows so far after each (task, length), so a long run can be saved as it goes and resumed."""
    if m.tokenizer is None:
        raise ValueError(f"model {m.name or ''} has no tokenizer; the tasks are text and need one")
    chat = resolve_chat(m.tokenizer, config.chat)
    runs = as_runs(policies)
    haystack = haystack_from_name(config.haystack) if config.haystack else None
    tasks = [get_task(name, haystack) for name in config.tasks]
    for length in config.lengths:
        longest = length + max(config.max_new_tokens or t.max_new_tokens for t in tasks)
        if longest > m.config.max_position_embeddings:
            raise ValueError(
                f"length {length} plus the answer ({longest} tokens) exceeds the model's "
                f"context of {m.config.max_position_embeddings}"
            )
    bar = tqdm(
        total=len(tasks) * len(config.lengths) * len(runs) * config.samples,
        desc="eval",
        disable=not progress,
        dynamic_ncols=True,
    )
    rows, sample_rows = [], []
    try:
        for task in tasks:
            new = config.max_new_tokens or task.max_new_tokens
            for length in config.lengths:
                todo = [r for r in runs if (task.name, length, r.label) not in done]
                if not todo:
                    bar.update(len(runs) * config.samples)
                    continue
                bar.update((len(runs) - len(todo)) * config.samples)
                samples = make_samples(task, m.tokenizer, length, config.samples, config.seed, chat=chat)
                encoded = [split_prompt(m.tokenizer, s, config.query_aware) for s in samples]
                totals = [len(c) + len(q) for c, q in encoded]
                batch_size = config.batch_size or batch_size_for_memory(
                    m.config, max(totals), new, config.chunk_size or max(totals), m.dtype.itemsize, free_memory_bytes()
                )
                batches = plan_batches(totals, batch_size)
                full_bytes = np.mean(
                    [
                        _bytes_per_sequence(m, [encoded[i] for i in idx], Full(), config.chunk_size, new)
                        for idx, _ in batches
                    ]
                )
                shared = _shared_answers(m, todo, encoded, batches, new, config, bar)
                for run in todo:
                    bar.set_description(f"{task.name} {length} {run.label}")
                    try:
                        row, per_sample = _evaluate(
                            m, run, task.name, length, samples, encoded, batches, new, config, bar, shared
                        )
                    except ValueError as err:  # a policy that cannot run on this model: say so, go on
                        log(f"{run.label} on {task.name} at {length}: skipped; {err}")
                        bar.update(len(samples))
                        continue
                    row["chat"] = chat
                    row["full_kv_bytes"] = int(full_bytes)
                    row["kv_reduction_x"] = float(full_bytes / row["kv_bytes"]) if row["kv_bytes"] else float("nan")
                    rows.append(row)
                    sample_rows += per_sample
                if on_group is not None:
                    on_group(rows, sample_rows)
                release_compiled()  # the next (task, length) compiles its own shapes
    finally:
        bar.close()
    return rows, sample_rows


def _evaluate(
    m,
    run: PolicyRun,
    task: str,
    length: int,
    samples: list[Sample],
    encoded: list[tuple[list[int], list[int]]],
    batches: list[tuple[list[int], int]],
    new: int,
    config: EvalConfig,
    bar,
    shared: dict[tuple[str, int], np.ndarray],
) -> tuple[dict, list[dict]]:
    predictions, bytes_, prefill_s, decode_s = {}, [], [], []
    for b, (idx, real) in enumerate(batches):
        prompts = [encoded[i] for i in idx]
        out = shared[run.label, b] if (run.label, b) in shared else _answer(m, prompts, run.policy, config, new)
        bytes_.append(_bytes_per_sequence(m, prompts, run.policy, config.chunk_size, new))
        if config.timing:  # the compressed part's prefill, then decoding
            contexts = [c for c, _ in prompts]
            t_prefill, t_token = _time_prefill_and_decode(
                m, contexts, run.policy, config.chunk_size, out[:, 0], new, config.attention_impl, config.packing
            )
            prefill_s.append(t_prefill)
            decode_s.append(t_token)
        predictions.update(zip(idx[:real], _predictions(m, out[:real])))
        bar.update(real)
    scores, digits, per_sample = [], [], []
    for i, sample in enumerate(samples):
        prediction = predictions[i]
        score, partial = string_match_all(prediction, sample.answers), digit_match(prediction, sample.answers)
        scores.append(score)
        digits.append(partial)
        per_sample.append(
            {
                "policy": run.label,
                "task": task,
                "length": length,
                "seed": sample.seed,
                "depth": sample.depth,
                "num_tokens": sample.num_tokens,
                "answers": list(sample.answers),
                "prediction": prediction,
                "score": score,
                "digits": partial,
            }
        )
    row = {
        "policy": run.label,
        "policy_name": run.name,
        "budget": run.budget,
        "compression_ratio": run.compression_ratio,
        "policy_repr": repr(run.policy),
        "task": task,
        "length": length,
        "samples": len(scores),
        "accuracy": float(np.mean(scores)),
        "digits": float(np.mean(digits)),
        "kv_bytes": int(np.mean(bytes_)),
        "batch_size": len(batches[0][0]),
        "query_aware": config.query_aware,
        "prefill_ms": float(np.mean(prefill_s) * 1e3) if prefill_s else None,
        "decode_ms_per_token": float(np.mean(decode_s) * 1e3) if decode_s else None,
    }
    return row, per_sample
