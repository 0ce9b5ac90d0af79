"""Forward paths: full logits, chunked prefill into a (compressed) KV state, decode, and generate."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from kvjax.attention import check_impl
from kvjax.kv_state import KVState
from kvjax.language_model import LanguageModel
from kvjax.layer_step import Decode, Prefill
from kvjax.packing import Packing, Tail, as_packing, pack, packed_rows, packed_step, replay_tail, unpack_state
from kvjax.policies import Full, Policy
from kvjax.policies.base import bind_params, split_params
from kvjax.sampling import SamplingParams, sample
from kvjax.sharding import constrain_state, on_model_mesh

DEFAULT_CHUNK = 512
_BUCKET = 64  # prompt lengths are padded up to a multiple of this so nearby lengths share a compile
_CONTINUE_BUCKET = 8  # the same for tokens continuing a state (each padded position costs a decode step)


def check_count(name: str, value, minimum: int | None = 0) -> int:
    """`value` as an int, when it is an integer (not a bool, not a float such as 2.5) of at least `minimum`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def token_ids(tokens, vocab_size: int | None, what: str = "token ids") -> np.ndarray:
    """`tokens` as an int32 array after checking they are integers in [0, vocab_size): floats, bools and
    out-of-range ids (which the embedding lookup would otherwise clamp silently) raise ValueError.
    A jax.Array is read back to the host for the check."""
    try:
        array = np.asarray(tokens)
    except ValueError as err:  # ragged nesting
        raise ValueError(f"{what} must be a rectangular array of integers ({err})") from None
    if array.dtype == object or array.dtype.kind not in "iu":
        if array.size == 0 and array.dtype.kind == "f":  # np.asarray([]) is float64
            array = array.astype(np.int32)
        else:
            raise ValueError(f"{what} must be integers; got dtype {array.dtype} (floats and bools are not token ids)")
    if vocab_size is not None and array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{what} must lie in [0, {vocab_size}) (the model's vocabulary); got {bad}")
    return array.astype(np.int32)


def batch_prompts(tokens, vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """int32[B, T] right-padded tokens and int32[B] lengths from an array [B, T] / [T] or a ragged list;
    with `vocab_size`, every id must lie in [0, vocab_size) (`token_ids`)."""
    if isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], (list, tuple, np.ndarray, jax.Array)):
        rows = [token_ids(t, vocab_size, "prompt token ids") for t in tokens]
        if any(row.ndim != 1 for row in rows):
            raise ValueError(f"a ragged batch is a list of 1-D prompts; got shapes {[row.shape for row in rows]}")
        lengths = np.array([len(t) for t in rows], np.int32)
        out = np.zeros((len(rows), max(lengths)), np.int32)
        for row, t in zip(out, rows):
            row[: len(t)] = t
        tokens = out
    else:
        tokens = token_ids(tokens, vocab_size, "prompt token ids")
        tokens = tokens[None] if tokens.ndim == 1 else tokens
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int32[B, T] or [T]; got shape {tokens.shape}")
        lengths = np.full((tokens.shape[0],), tokens.shape[1], np.int32)
    if lengths.size == 0 or lengths.min() < 1:
        raise ValueError("every prompt needs at least one token")
    return tokens, lengths


def _chunking(prompt_len: int, chunk_size: int) -> tuple[int, int]:
    """(chunk, padded prompt length): the fewest chunks of at most `chunk_size` tokens, balanced so
    padding stays under one bucket per chunk (600 tokens at 512 run as 2 x 320, not 2 x 512)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    buckets = math.ceil(prompt_len / _BUCKET)
    chunks = math.ceil(buckets * _BUCKET / chunk_size)
    chunk = min(chunk_size, _BUCKET * math.ceil(buckets / chunks))
    return chunk, chunk * math.ceil(prompt_len / chunk)


def _prefill_chunk(m: LanguageModel, policy: Policy | None, shape: tuple[int, int], chunk_size: int | None) -> int:
    """`chunk_size`, or when None the policy's choice for prompts of `shape` [B, T] (`Policy.prefill_chunk`:
    the whole prompt for policies that evict as they prefill, as their papers score it, where it fits),
    else DEFAULT_CHUNK."""
    if chunk_size is not None:
        return chunk_size
    chunk = (policy or Full()).prefill_chunk(m.config, shape[1])
    return DEFAULT_CHUNK if chunk is None else _BUCKET * math.ceil(chunk / _BUCKET)  # whole buckets: one chunk


def _check_context(m: LanguageModel, total: int, policy: Policy | None = None, chunk: int = 1):
    """Refuses `total` tokens past the model's context, unless `policy` keeps RoPE positions below a
    bound whatever the length (`Policy.position_limit`: StreamingLLM's position shift), which then counts."""
    limit = m.config.max_position_embeddings
    bound = None if policy is None else policy.position_limit(chunk)
    if bound is not None:
        total = min(total, bound)
    if total > limit:
        raise ValueError(f"prompt plus new tokens ({total}) is longer than the model's context ({limit} positions)")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, params, tokens):
    model = nnx.merge(graphdef, params)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, _, _ = model(tokens, positions, jnp.ones((b, t), bool))
    return model.logits(hidden)


@on_model_mesh
def logits(m: LanguageModel, tokens) -> jax.Array:
    """float32[B, T, V] logits of a full causal forward over int32[B, T] tokens (no cache)."""
    tokens = token_ids(tokens, m.config.vocab_size)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be int32[B, T] or [T] with T >= 1; got shape {tokens.shape}")
    _check_context(m, tokens.shape[1])
    return _logits(m.graphdef, m.params, jnp.asarray(tokens))


@dataclasses.dataclass(frozen=True)
class Execution:
    """How the jitted paths run, beside what they compute: the attention implementation
    (kvjax.attention.ATTENTION_IMPLS) and whether runs of identically laid-out layers are scanned
    (compile time independent of depth) or unrolled (each layer's cache updated in place).

    `scan_layers=None` (the default) scans prefill, where compute rules and a chunk's graph is large,
    and unrolls decode steps, which are memory-bound and small: a scanned step reads the stacked cache
    and writes a new one, twice the bytes (2-3x slower per token at 4K-8K tokens on CPU). True or False
    applies to both."""

    attention_impl: str = "auto"
    scan_layers: bool | None = None

    def __post_init__(self):
        check_impl(self.attention_impl)
        if self.scan_layers not in (None, True, False):
            raise ValueError(f"scan_layers must be None, True or False; got {self.scan_layers!r}")

    def scans(self, decoding: bool) -> bool:
        """Whether layer runs are scanned in a decode step (`decoding`) or a prefill chunk."""
        return not decoding if self.scan_layers is None else self.scan_layers


def _prefill_forward(
    model, policies: tuple[Policy, ...], tokens, lengths, chunk: int, max_new_tokens: int, run: Execution
):
    """Runs the prompts int32[B, T] through the model chunk by chunk, each layer handing the same q, k and v
    to every policy's step; the hidden states follow the first policy's attention (the others' outputs are
    unused, so XLA drops them). Returns each policy's finalized state and the last-token logits [B, V]."""
    b, t = tokens.shape
    states = [
        constrain_state(p.allocate(model.config, b, t, max_new_tokens, chunk, model.embed.dtype)) for p in policies
    ]
    phase = Prefill(lengths, whole_prompt=t == chunk)
    layers = tuple(zip(*(s.layers for s in states)))  # per layer, per policy, its segments
    # Only a policy prefilled alone prunes tokens between layers: a pruned prefill is not Full's, so it shares none.
    stack = model.layer_stack(layers, run.scans(False), policies[0].prefill_tokens(model.config, t, chunk))
    last = lengths - 1  # [B] position of each prompt's final token
    offsets = jnp.arange(chunk, dtype=jnp.int32)  # [S]

    def layer_fn(ctx, segments, shared, x):
        steps = [p.layer_step(ctx, seg, sh, x, phase) for p, seg, sh in zip(policies, segments, shared)]
        return steps[0][0], tuple(s[1] for s in steps), tuple(s[2] for s in steps)

    def prune(layer, n, positions, valid, shared):
        index, kept, own = policies[0].prune(layer, n, positions, valid, shared[0], phase)
        return index, kept, (own, *shared[1:])

    def step(carry, inputs):
        layers, shared, last_hidden = carry
        chunk_tokens, start = inputs  # [B, S], scalar
        positions = jnp.broadcast_to(start + offsets, (b, chunk))  # [B, S]
        hidden, layers, shared = model(
            chunk_tokens,
            positions,
            positions < lengths[:, None],
            layers,
            layer_fn,
            shared=shared,
            seq_len=jnp.max(lengths),  # the whole prompt's length, as a one-shot forward would see
            attention_impl=run.attention_impl,
            stack=stack,
            prune=prune,
        )
        here = (last >= start) & (last < start + chunk)  # [B] final token falls in this chunk
        picked = jnp.take_along_axis(hidden, jnp.clip(last - start, 0, chunk - 1)[:, None, None], axis=1)
        return (layers, shared, jnp.where(here[:, None], picked[:, 0], last_hidden)), None

    chunks = tokens.reshape(b, t // chunk, chunk).swapaxes(0, 1)  # [N, B, S]
    starts = jnp.arange(0, t, chunk, dtype=jnp.int32)  # [N]
    init = (layers, tuple(s.shared for s in states), jnp.zeros((b, model.config.hidden_size), model.embed.dtype))
    (layers, shared, last_hidden), _ = jax.lax.scan(step, init, (chunks, starts))
    out = []
    for i, (policy, state) in enumerate(zip(policies, states)):
        state = state.replace(layers=tuple(layer[i] for layer in layers), shared=shared[i], length=lengths)
        out.append(constrain_state(policy.finalize(model.config, state, t, max_new_tokens)))
    return tuple(out), model.logits(last_hidden)


@functools.partial(jax.jit, static_argnames=("graphdef", "policy", "chunk", "max_new_tokens", "run"))
def _prefill(
    graphdef, params, policy_params, tokens, lengths, *, policy: Policy, chunk: int, max_new_tokens: int, run: Execution
):
    """Runs the prompt through the model chunk by chunk; returns the state and last-token logits."""
    model = nnx.merge(graphdef, params)
    states, logits = _prefill_forward(
        model, (bind_params(policy, policy_params),), tokens, lengths, chunk, max_new_tokens, run
    )
    return states[0], logits


@functools.partial(jax.jit, static_argnames=("graphdef", "policies", "chunk", "max_new_tokens", "run"))
def _prefill_shared(
    graphdef, params, policy_params, tokens, lengths, *, policies: tuple, chunk: int, max_new_tokens: int, run
):
    """`_prefill` for several policies from one forward (`prefill_shared`): their states, the logits."""
    model = nnx.merge(graphdef, params)
    bound = tuple(bind_params(p, pp) for p, pp in zip(policies, policy_params))
    return _prefill_forward(model, bound, tokens, lengths, chunk, max_new_tokens, run)


def _prompt_batch(tokens, lengths, vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32[B, T] prompts (ids checked against `vocab_size`) and validated int32[B] lengths."""
    tokens, given = batch_prompts(tokens, vocab_size)
    lengths = given if lengths is None else token_ids(lengths, None, "lengths")
    if lengths.shape != (tokens.shape[0],) or lengths.min() < 1 or lengths.max() > tokens.shape[1]:
        raise ValueError(f"lengths must be int32[B] within [1, {tokens.shape[1]}]; got {lengths}")
    return tokens, lengths


def _run_prefill(
    m,
    tokens: np.ndarray,
    lengths: np.ndarray,
    policy,
    chunk_size,
    max_new_tokens,
    run: Execution,
    packing: Packing | None = None,
):
    chunk, padded = _chunking(tokens.shape[1], _prefill_chunk(m, policy, tokens.shape, chunk_size))
    _check_context(m, int(lengths.max()) + max_new_tokens, policy, min(chunk, int(lengths.max())))  # real tokens
    if packing is not None:
        return _run_packed_prefill(m, tokens, lengths, policy, chunk_size, max_new_tokens, run, packing, chunk, padded)
    tokens = np.pad(tokens, ((0, 0), (0, padded - tokens.shape[1])))
    policy, policy_params = split_params(_checked(m, policy))
    return _prefill(
        m.graphdef,
        m.params,
        policy_params,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        policy=policy,
        chunk=chunk,
        max_new_tokens=max_new_tokens,
        run=run,
    )


@functools.partial(
    jax.jit, static_argnames=("graphdef", "policy", "chunk", "prompt_len", "layout_chunk", "max_new_tokens", "run")
)
def _packed_prefill(
    graphdef,
    params,
    policy_params,
    tokens,
    positions,
    segments,
    row_of,
    offset,
    lengths,
    *,
    policy: Policy,
    chunk: int,
    prompt_len: int,
    layout_chunk: int,
    max_new_tokens: int,
    run: Execution,
):
    """Prefill of packed rows (`kvjax.packing`): int32[R, W] tokens, positions and segments, in chunks of
    `chunk` columns, into a Full state over the rows; then each prompt's entries gathered into the policy's
    prefill state for prompts of `prompt_len` (as `_prefill` allocates it), all but its last
    `Policy.packed_tail` tokens, which the policy's own step then takes (`replay_tail`), and the policy's
    `finalize`. row_of, offset, lengths: int32[B]. Returns the state and each prompt's last-token logits [B, V]."""
    model = nnx.merge(graphdef, params)
    policy = bind_params(policy, policy_params)
    r, w = tokens.shape
    rows = constrain_state(Full().allocate(model.config, r, w, 0, chunk, model.embed.dtype))
    # The tail never reaches past the padded prompt, so the policy's step writes it inside its buffers.
    n = min(policy.packed_tail, prompt_len)
    tail = Tail.of(row_of, offset, lengths, n) if n else None
    if tail is not None:  # each layer also records its tail tokens' inputs
        empty = tail.empty(model.config, model.embed.dtype)
        rows = rows.replace(layers=tuple(layer + (empty,) for layer in rows.layers))
    stack = model.layer_stack(rows.layers, run.scans(False))
    capacity = rows.layers[0][0].capacity  # >= W (whole blocks from 2048 slots on)
    slot_segments = jnp.pad(segments, ((0, 0), (0, capacity - w)), constant_values=-1)  # [R, capacity]
    last = offset + lengths - 1  # [B] column of each prompt's final token
    offsets = jnp.arange(chunk, dtype=jnp.int32)  # [S]

    def step(carry, inputs):
        layers, last_hidden = carry
        chunk_tokens, chunk_positions, chunk_segments, start = inputs  # [R, S] x 3, scalar
        columns = jnp.broadcast_to(start + offsets, (r, chunk))  # [R, S]
        hidden, layers, _ = model(
            chunk_tokens,
            chunk_positions,
            chunk_segments >= 0,
            layers,
            packed_step(columns, chunk_segments, slot_segments, tail),
            seq_len=jnp.max(lengths),  # the longest prompt, as an unpacked prefill sees it (LongRoPE)
            attention_impl=run.attention_impl,
            stack=stack,
        )
        here = (last >= start) & (last < start + chunk)  # [B] final token falls in this chunk
        picked = hidden[row_of, jnp.clip(last - start, 0, chunk - 1)]  # [B, E]
        return (layers, jnp.where(here[:, None], picked, last_hidden)), None

    split = lambda x: x.reshape(r, w // chunk, chunk).swapaxes(0, 1)  # noqa: E731  [N, R, S]
    starts = jnp.arange(0, w, chunk, dtype=jnp.int32)  # [N]
    init = (rows.layers, jnp.zeros((lengths.shape[0], model.config.hidden_size), model.embed.dtype))
    (layers, last_hidden), _ = jax.lax.scan(step, init, (split(tokens), split(positions), split(segments), starts))
    like = policy.allocate(model.config, lengths.shape[0], prompt_len, max_new_tokens, layout_chunk, model.embed.dtype)
    held = lengths if tail is None else tail.start
    state = unpack_state(type(policy).__name__, layers, like, row_of, offset, held)
    if tail is not None:
        state = replay_tail(policy, model.config, state, tuple(layer[1] for layer in layers), tail, lengths)
    state = policy.finalize(model.config, state.replace(length=lengths), prompt_len, max_new_tokens)
    return constrain_state(state), model.logits(last_hidden)


def check_packable(policy: Policy | None) -> None:
    """Refuses, naming it, a policy a packed prefill cannot build the state of (`Policy.packed_tail`)."""
    policy = policy or Full()
    if policy.packed_tail is None:
        raise ValueError(
            f"packing cannot run {type(policy).__name__}: its prefill does more than write each prompt in place "
            "and score it at its end from its keys and last queries (Policy.packed_tail): it evicts, prunes or "
            "re-encodes the prompt as it goes, or lays it out otherwise, which packed rows cannot give it per "
            "prompt; prefill it without packing"
        )


def _run_packed_prefill(
    m, tokens, lengths, policy, chunk_size, max_new_tokens, run: Execution, packing: Packing, layout_chunk, padded
):
    """`_run_prefill` with the prompts packed (`kvjax.packing`); `layout_chunk` and `padded` are the chunk
    and prompt length the unpacked prefill would allocate the policy's state for."""
    policy = _checked(m, policy)
    check_packable(policy)
    plan = pack(lengths, packing)
    chunk, width = _chunking(plan.row_length, DEFAULT_CHUNK if chunk_size is None else chunk_size)
    packed, positions, segments = packed_rows(tokens, plan, width)
    policy, policy_params = split_params(policy)
    return _packed_prefill(
        m.graphdef,
        m.params,
        policy_params,
        jnp.asarray(packed),
        jnp.asarray(positions),
        jnp.asarray(segments),
        jnp.asarray(plan.row_of),
        jnp.asarray(plan.offset),
        jnp.asarray(lengths),
        policy=policy,
        chunk=chunk,
        prompt_len=padded,
        layout_chunk=layout_chunk,
        max_new_tokens=max_new_tokens,
        run=run,
    )


@dataclasses.dataclass(frozen=True)
class StateOrigin:
    """What made a KV state, carried as its static `origin` (hashable, no arrays): the policy and model
    fingerprints decoding compares with its own, and the decode steps the state still has room for
    (None: unbounded, for policies that evict as they go). Kept out of the jitted functions' arguments,
    so a step's smaller `room` never recompiles, and checked in Python, so no step waits on the device."""

    policy: str  # repr of the policy without its params
    model: str  # `model_fingerprint`
    max_new_tokens: int  # the room `prefill` reserved
    room: int | None
    prompt_len: int = 0  # the longest prompt, which a `compression_ratio` was resolved against


def model_fingerprint(m: LanguageModel) -> str:
    """The model a state belongs to, as a readable string: its name, shapes and dtype."""
    c = m.config
    shapes = f"{c.family}, {c.num_layers} layers, {c.num_kv_heads} KV heads of {c.head_dim}, vocabulary {c.vocab_size}"
    digest = hashlib.sha1(repr(c).encode()).hexdigest()[:8]
    return f"{m.name or 'an unnamed model'} ({shapes}, {jnp.dtype(m.dtype).name}, config {digest})"


def _attach_origin(
    m: LanguageModel, state: KVState, policy: Policy, prompt_len: int, max_new_tokens: int, longest: int
):
    static, _ = split_params(policy)
    room = policy.decode_room(m.config, prompt_len, max_new_tokens)
    return state.replace(origin=StateOrigin(repr(static), model_fingerprint(m), max_new_tokens, room, longest))


def _for_state(m: LanguageModel, state: KVState, policy: Policy | None) -> Policy:
    """The policy that continues `state`: checked against the model, a `compression_ratio` resolved
    against the prompt the state was prefilled with (as prefill resolved it)."""
    policy = _checked(m, policy)
    if policy.resolved:
        return policy
    origin = getattr(state, "origin", None)
    if origin is None:
        raise ValueError(
            "this state carries no prompt length to resolve compression_ratio against; pass policy.resolve(n)"
        )
    return policy.resolve(origin.prompt_len)


def _check_origin(m: LanguageModel, state: KVState, policy: Policy, steps: int) -> None:
    """Refuses to decode `steps` tokens into `state` with another policy or model than made it, or past
    the room it was prefilled with (a step there would overwrite an entry it keeps). States built by hand
    carry no origin and are not checked."""
    origin = getattr(state, "origin", None)
    if origin is None:
        return
    static, _ = split_params(policy)
    if repr(static) != origin.policy:
        raise ValueError(
            f"this KV state was made by {origin.policy} and cannot be decoded with {static!r} (its buffers and "
            "scores follow its own policy); pass the policy that prefilled it"
        )
    if model_fingerprint(m) != origin.model:
        raise ValueError(
            f"this KV state was made by {origin.model} and cannot be decoded with {model_fingerprint(m)}; "
            "decode it with the model that prefilled it"
        )
    if origin.room is not None and steps > origin.room:
        raise ValueError(
            f"this KV state has room for {origin.room} more decode step(s) (prefilled with "
            f"max_new_tokens={origin.max_new_tokens}); {steps} more would overwrite entries {origin.policy} "
            f"keeps. Prefill with a larger max_new_tokens"
        )


def _decoded(state: KVState, steps: int) -> KVState:
    """`state` after `steps` decode steps: its origin's room shrinks by as many."""
    origin = getattr(state, "origin", None)
    if origin is None or origin.room is None:
        return state
    return state.replace(origin=dataclasses.replace(origin, room=origin.room - steps))


def _checked(m: LanguageModel, policy: Policy | None) -> Policy:
    """The policy to run (Full when None), after it confirms it fits the model."""
    policy = policy or Full()
    policy.check_model(m.config)
    return policy


@on_model_mesh
def prefill(
    m: LanguageModel,
    tokens,
    policy: Policy | None = None,
    *,
    lengths=None,
    chunk_size: int | None = None,
    max_new_tokens: int = 0,
    state: KVState | None = None,
    attention_impl: str = "auto",
    scan_layers: bool | None = None,
    packing: bool | Packing | None = None,
) -> KVState:
    """The (compressed) KV state after the prompt, built chunk by chunk: `chunk_size` tokens, or None for the
    policy's own choice (`Policy.prefill_chunk`: the whole prompt for evict-as-you-go policies where it fits).

    `tokens` is int32[B, T] (with optional per-row `lengths` for right-padded rows) or a ragged list.
    `max_new_tokens` reserves room for that many decode steps in policies whose size grows. A policy's
    `compression_ratio` is resolved against the longest prompt. With `state`, the tokens continue it
    instead (row b of tokens after row b of the state, fed as decode steps, so the policy treats them as
    it treats decoding): they use the room its prefill reserved, and the state is donated.
    `attention_impl` and `scan_layers`: how it runs (`Execution`). `packing` (True or a
    `kvjax.packing.Packing`) prefills a ragged batch packed into fewer rows, for the same state.
    """
    max_new_tokens = check_count("max_new_tokens", max_new_tokens)
    chunk_size = None if chunk_size is None else check_count("chunk_size", chunk_size, 1)
    run = Execution(attention_impl, scan_layers)
    packing = as_packing(packing)
    prompts, lengths = _prompt_batch(tokens, lengths, m.config.vocab_size)
    if state is not None:
        if packing is not None:
            raise ValueError("packing applies to a new prefill; tokens continuing a state run as decode steps")
        if max_new_tokens:
            raise ValueError(
                "max_new_tokens sizes a new state; a continued state keeps the room its first prefill reserved"
            )
        return _run_continue(m, state, prompts, lengths, policy, run)[0]
    policy = _checked(m, policy).resolve(int(lengths.max()))
    chunk_size = _prefill_chunk(m, policy, prompts.shape, chunk_size)
    state, _ = _run_prefill(m, prompts, lengths, policy, chunk_size, max_new_tokens, run, packing)
    padded = _chunking(prompts.shape[1], chunk_size)[1]  # the prompt length the policy's layout saw
    return _attach_origin(m, state, policy, padded, max_new_tokens, int(lengths.max()))


def _shared_chunk(m: LanguageModel, policies: Sequence[Policy], width: int, chunk_size: int | None) -> int:
    """The chunk `prefill_shared` runs resolved `policies` in over prompts `width` tokens wide: `chunk_size`,
    else the largest of the policies' own."""
    return max(_prefill_chunk(m, p, (1, width), chunk_size) for p in policies)


def shares_prefill(
    m: LanguageModel, policies: Sequence[Policy], width: int, chunk_size: int | None = None
) -> tuple[bool, ...]:
    """For each policy, whether it can share `prefill_shared`'s forward over prompts `width` tokens wide
    with the others that can: it prefills as Full (`Policy.prefills_as_full`) in its own chunk and in the
    chunk they share. A policy that cannot run on the model, or whose ratio does not resolve, cannot."""
    resolved = []
    for policy in policies:
        try:
            resolved.append(_checked(m, policy).resolve(width))
        except ValueError:
            resolved.append(None)

    def as_full(policy: Policy, chunk_size: int) -> bool:
        return policy.prefills_as_full(m.config, width, _chunking(width, chunk_size)[0])

    own = [p is not None and as_full(p, _shared_chunk(m, [p], width, chunk_size)) for p in resolved]
    if not any(own):
        return tuple(own)
    chunk = _shared_chunk(m, [p for p, ok in zip(resolved, own) if ok], width, chunk_size)
    return tuple(ok and as_full(p, chunk) for p, ok in zip(resolved, own))


@on_model_mesh
def prefill_shared(
    m: LanguageModel,
    tokens,
    policies: Sequence[Policy],
    *,
    lengths=None,
    chunk_size: int | None = None,
    max_new_tokens: int = 0,
    attention_impl: str = "auto",
    scan_layers: bool | None = None,
) -> tuple[KVState, ...]:
    """The states `prefill(m, tokens, p, ...)` gives for each policy p, from one forward.

    A policy whose prefill attends as Full's does (`Policy.prefills_as_full`: it compresses only after
    attending, or keeps everything) leaves every layer's hidden states as Full leaves them, so the
    policies can share the forward: each layer hands the same q, k and v to every policy, and only the
    policies' own writing and scoring runs once per policy (an evaluation of several policies and ratios on
    the same prompts pays for one prefill). The chunk is `chunk_size`, else the largest of the policies' own
    (`Policy.prefill_chunk`); each state equals its own prefill's up to float rounding. Raises ValueError
    naming a policy that cannot share it (`shares_prefill`)."""
    max_new_tokens = check_count("max_new_tokens", max_new_tokens)
    chunk_size = None if chunk_size is None else check_count("chunk_size", chunk_size, 1)
    run = Execution(attention_impl, scan_layers)
    prompts, lengths = _prompt_batch(tokens, lengths, m.config.vocab_size)
    if not policies:
        raise ValueError("prefill_shared needs at least one policy")
    longest, width = int(lengths.max()), prompts.shape[1]
    policies = tuple(_checked(m, p).resolve(longest) for p in policies)
    for policy, ok in zip(policies, shares_prefill(m, policies, width, chunk_size)):
        if not ok:
            raise ValueError(
                f"{type(policy).__name__} does not prefill as Full does in the shared chunk "
                "(Policy.prefills_as_full), so it cannot share the forward; prefill it on its own"
            )
    chunk, padded = _chunking(width, _shared_chunk(m, policies, width, chunk_size))
    for policy in policies:
        _check_context(m, longest + max_new_tokens, policy, min(chunk, longest))
    statics, params = zip(*(split_params(p) for p in policies))
    states, _ = _prefill_shared(
        m.graphdef,
        m.params,
        params,
        jnp.asarray(np.pad(prompts, ((0, 0), (0, padded - width)))),
        jnp.asarray(lengths),
        policies=statics,
        chunk=chunk,
        max_new_tokens=max_new_tokens,
        run=run,
    )
    return tuple(_attach_origin(m, s, p, padded, max_new_tokens, longest) for s, p in zip(states, policies))


@functools.partial(jax.jit, static_argnames=("graphdef", "policy", "run", "ragged"), donate_argnames=("state",))
def _continue(graphdef, params, policy_params, state, tokens, lengths, *, policy, run, ragged: bool):
    """Feeds int32[B, T] tokens (row b's first lengths[b]) into `state` one position at a time, as decode
    steps; returns the state and float32[B, V] logits after each row's last token."""
    model = nnx.merge(graphdef, params)
    policy = bind_params(policy, policy_params)
    stack = model.layer_stack(state.layers, run.scans(True))
    b = tokens.shape[0]

    def step(carry, inputs):
        kv, last_logits = carry
        token, t = inputs  # [B], scalar
        logits, new = _forward_token(model, policy, kv, token, run, stack)
        active = t < lengths  # [B]: rows whose tokens run this far
        if ragged:  # a finished row keeps its state
            new = jax.tree.map(lambda n, o: jnp.where(active.reshape((b,) + (1,) * (n.ndim - 1)), n, o), new, kv)
        return (new, jnp.where(active[:, None], logits, last_logits)), None

    init = (state, jnp.zeros((b, model.config.vocab_size), jnp.float32))
    steps = jnp.arange(tokens.shape[1], dtype=jnp.int32)  # [T]
    (state, logits), _ = jax.lax.scan(step, init, (tokens.swapaxes(0, 1), steps))
    return state, logits


def _run_continue(m, state: KVState, tokens: np.ndarray, lengths: np.ndarray, policy, run: Execution):
    """(state continued by the tokens, logits after each row's last), with the checks of a decode step."""
    if tokens.shape[0] != state.batch_size:
        raise ValueError(
            f"continuing a state of {state.batch_size} sequence(s) takes one row per sequence; got {tokens.shape[0]}"
        )
    policy = _for_state(m, state, policy)
    steps = int(lengths.max())
    _check_origin(m, state, policy, steps)
    _check_context(m, int(jnp.max(state.length)) + steps, policy, int(tokens.shape[1]))
    width = -(-tokens.shape[1] // _CONTINUE_BUCKET) * _CONTINUE_BUCKET  # nearby lengths share a compile
    tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))
    ragged = bool(lengths.min() < width)
    if ragged and any(leaf.shape[:1] != (state.batch_size,) for leaf in jax.tree.leaves(state)):
        raise ValueError("rows of different lengths need a state whose every array is per sequence")
    static_policy, policy_params = split_params(policy)
    origin = state.origin
    kv, logits = _continue(
        m.graphdef,
        m.params,
        policy_params,
        state.replace(origin=None),
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        policy=static_policy,
        run=run,
        ragged=ragged,
    )
    return _decoded(kv.replace(origin=origin), steps), logits


def _forward_token(model, policy: Policy, state: KVState, token: jax.Array, run: Execution, stack=None):
    """One decode step for every sequence: the new token enters at position `state.length`."""
    positions = state.length[:, None]  # [B, 1]
    phase = Decode()

    def layer_fn(ctx, segments, shared, x):
        return policy.layer_step(ctx, segments, shared, x, phase)

    hidden, layers, shared = model(
        token[:, None],
        positions,
        jnp.ones_like(positions, bool),
        state.layers,
        layer_fn,
        shared=state.shared,
        attention_impl=run.attention_impl,
        stack=stack or model.layer_stack(state.layers, run.scans(True)),
    )
    new_state = state.replace(layers=layers, shared=shared, length=state.length + 1)
    return model.logits(hidden[:, 0]), constrain_state(new_state)


def _step_tokens(m: LanguageModel, state: KVState, token) -> jax.Array:
    """int32[B] tokens for one decode step of `state`, checked: integers in [0, vocab), one per row.
    A token array on the device is read back for the check (one host sync per call)."""
    ids = token_ids(token, m.config.vocab_size, "decode token ids")
    ids = ids.reshape(1) if ids.ndim == 0 else ids
    if ids.shape != (state.batch_size,):
        raise ValueError(f"decode takes one token per sequence, int32[{state.batch_size}]; got shape {ids.shape}")
    return jnp.asarray(ids)


@functools.partial(jax.jit, static_argnames=("graphdef", "policy", "run"), donate_argnames=("state",))
def _decode_step(graphdef, params, policy_params, state, token, *, policy, run):
    return _forward_token(nnx.merge(graphdef, params), bind_params(policy, policy_params), state, token, run)


@on_model_mesh
def decode_step(
    m: LanguageModel,
    state: KVState,
    token,
    policy: Policy | None = None,
    *,
    attention_impl: str = "auto",
    scan_layers: bool | None = None,
):
    """(float32[B, V] logits, new state) after feeding int32[B] tokens; the old state is donated.

    Refuses a state made by another policy or model, and a step past the room the state was prefilled
    with (`prefill(..., max_new_tokens=)`), which would overwrite an entry the policy keeps."""
    run = Execution(attention_impl, scan_layers)
    policy = _for_state(m, state, policy)
    _check_origin(m, state, policy, 1)
    static_policy, policy_params = split_params(policy)
    token = _step_tokens(m, state, token)
    origin, state = state.origin, state.replace(origin=None)  # static: kept out of the jit cache key
    logits, state = _decode_step(m.graphdef, m.params, policy_params, state, token, policy=static_policy, run=run)
    return logits, _decoded(state.replace(origin=origin), 1)


@struct.dataclass(frozen=True)
class DecodeLoop:
    """Carry of the decode `while_loop`: the output so far, the token to feed next, and the cache."""

    step: jax.Array  # int32 scalar: tokens written so far
    tokens: jax.Array  # int32[B, N]
    last: jax.Array  # int32[B]: last written token, not yet fed to the model
    done: jax.Array  # bool[B]
    key: jax.Array
    kv: KVState


@functools.partial(jax.jit, donate_argnames=("kv", "tokens"))
def _start_loop(kv, logits, tokens, step, done, sampling, key, eos_ids, pad_id):
    """Samples the token after a prefill into column `step` and opens the loop carry."""
    key, sub = jax.random.split(key)
    token = jnp.where(done, pad_id, sample(logits, sampling, sub))
    return DecodeLoop(
        step=step + 1,
        tokens=tokens.at[:, step].set(token),
        last=token,
        done=done | jnp.isin(token, eos_ids),
        key=key,
        kv=kv,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "policy", "run"), donate_argnames=("loop",))
def _decode(
    graphdef, params, policy_params, loop: DecodeLoop, sampling, eos_ids, pad_id, stop_length, *, policy, run: Execution
):
    """Decodes until every row is done, the output is full, or the longest row reaches `stop_length`."""
    model = nnx.merge(graphdef, params)
    policy = bind_params(policy, policy_params)
    stack = model.layer_stack(loop.kv.layers, run.scans(True))  # the weights stacked once, not per token
    max_new_tokens = loop.tokens.shape[1]

    def keep_going(s: DecodeLoop):
        return (s.step < max_new_tokens) & ~jnp.all(s.done) & (jnp.max(s.kv.length) < stop_length)

    def body(s: DecodeLoop) -> DecodeLoop:
        step_logits, kv = _forward_token(model, policy, s.kv, s.last, run, stack)
        key, sub = jax.random.split(s.key)
        token = jnp.where(s.done, pad_id, sample(step_logits, sampling, sub))
        return DecodeLoop(
            step=s.step + 1,
            tokens=s.tokens.at[:, s.step].set(token),
            last=token,
            done=s.done | jnp.isin(token, eos_ids),
            key=key,
            kv=kv,
        )

    return jax.lax.while_loop(keep_going, body, loop)


@functools.partial(jax.jit, static_argnames=("steps",), donate_argnames=("kv",))
def _open_loop(kv, token, steps):
    """The loop carry for feeding `token` first; built under jit so its arrays are placed as
    `_start_loop`'s are, and `_decode` reuses what generate compiled at the same shapes."""
    batch = token.shape[0]
    return DecodeLoop(
        step=jnp.int32(0),
        tokens=jnp.zeros((batch, steps), jnp.int32),
        last=token,
        done=jnp.zeros((batch,), bool),
        key=jax.random.key(0),
        kv=kv,
    )


@on_model_mesh
def greedy_decode(
    m: LanguageModel,
    state: KVState,
    token,
    steps: int,
    policy: Policy | None = None,
    *,
    attention_impl: str = "auto",
    scan_layers: bool | None = None,
) -> jax.Array:
    """int32[B, steps]: greedy tokens after feeding int32[B] `token`, by generate's jitted decode loop
    with no EOS stop (so benchmarks time exactly `steps` steps); the state is donated."""
    steps = check_count("steps", steps, 1)
    token = _step_tokens(m, state, token)
    run = Execution(attention_impl, scan_layers)
    policy = _for_state(m, state, policy)
    _check_origin(m, state, policy, steps)
    policy, policy_params = split_params(policy)
    _check_context(m, int(jnp.max(state.length)) + steps, policy)
    loop = _open_loop(state.replace(origin=None), token, steps)
    no_eos, no_stop = jnp.asarray([-1], jnp.int32), jnp.int32(np.iinfo(np.int32).max)
    sampling = SamplingParams.create(loop.last.shape[0])
    return _decode(
        m.graphdef, m.params, policy_params, loop, sampling, no_eos, jnp.int32(0), no_stop, policy=policy, run=run
    ).tokens


def _rope_switch_length(m: LanguageModel) -> int:
    """Where decoding must re-prefill: transformers recomputes the whole cache with LongRoPE's long
    factors once a sequence outgrows the original context (Phi-3's `prepare_inputs_for_generation`)."""
    rope = m.config.rope
    return rope.original_max_position_embeddings if rope.kind == "longrope" else np.iinfo(np.int32).max


@on_model_mesh
def generate(
    m: LanguageModel,
    tokens,
    max_new_tokens: int = 64,
    policy: Policy | None = None,
    *,
    lengths=None,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    chunk_size: int | None = None,
    state: KVState | None = None,
    attention_impl: str = "auto",
    scan_layers: bool | None = None,
    packing: bool | Packing | None = None,
) -> jax.Array:
    """int32[B, max_new_tokens]: new tokens only; after a sequence's EOS its row holds the pad id.

    Prefill in chunks, then a jitted `lax.while_loop` decode over the donated state. Sampling
    settings and the seed are arrays: changing them (or the prompt contents) does not recompile.
    `eos_token_id=None` uses the model's EOS ids; `()` disables stopping. With `state`, the tokens
    continue that state (`prefill(..., state=)`, donated) instead of starting one: ask a compressed
    context a question. `attention_impl` and `scan_layers`: how it runs (`Execution`). `packing` (True
    or a `kvjax.packing.Packing`) prefills a ragged batch packed into fewer rows: the same tokens, less
    padding computed.
    """
    max_new_tokens = check_count("max_new_tokens", max_new_tokens, 1)
    chunk_size = None if chunk_size is None else check_count("chunk_size", chunk_size, 1)
    seed = check_count("seed", seed, None)
    packing = as_packing(packing)
    prompts, lengths = _prompt_batch(tokens, lengths, m.config.vocab_size)
    run = Execution(attention_impl, scan_layers)
    if state is not None:
        if packing is not None:
            raise ValueError("packing applies to a new prefill; tokens continuing a state run as decode steps")
        policy = _for_state(m, state, policy)
        _check_origin(m, state, policy, int(lengths.max()) + max_new_tokens - 1)  # the answer fits as well
        if int(jnp.max(state.length)) + int(lengths.max()) + max_new_tokens > _rope_switch_length(m):
            raise ValueError("a continued state cannot cross LongRoPE's switch, which re-prefills the whole history")
        kv, logits = _run_continue(m, state, prompts, lengths, policy, run)
        kv = kv.replace(origin=None)
    else:
        policy = _checked(m, policy).resolve(int(lengths.max()))
        kv, logits = _run_prefill(m, prompts, lengths, policy, chunk_size, max_new_tokens, run, packing)
    static_policy, policy_params = split_params(policy)
    decode = functools.partial(_decode, m.graphdef, m.params, policy_params, policy=static_policy, run=run)
    batch = logits.shape[0]
    eos = m.config.eos_token_ids if eos_token_id is None else eos_token_id
    eos = np.atleast_1d(np.asarray(eos if np.size(eos) else [-1], np.int32))
    pad = m.config.pad_token_id if m.config.pad_token_id is not None else int(eos[0]) if eos[0] >= 0 else 0
    sampling = SamplingParams.create(batch, temperature, top_k, top_p)
    eos, pad = jnp.asarray(eos), jnp.int32(pad)
    # A policy that keeps RoPE positions inside its cache (`position_limit`) never crosses LongRoPE's switch.
    switch = _rope_switch_length(m) if policy.position_limit(1) is None else np.iinfo(np.int32).max
    stop = switch if state is None and int(lengths.max()) <= switch else np.iinfo(np.int32).max
    loop = _start_loop(
        kv,
        logits,
        jnp.full((batch, max_new_tokens), pad, jnp.int32),
        jnp.int32(0),
        jnp.zeros((batch,), bool),
        sampling,
        jax.random.key(seed),
        eos,
        pad,
    )
    loop = decode(loop, sampling, eos, pad, jnp.int32(stop))
    step = int(loop.step)
    if step < max_new_tokens and not bool(jnp.all(loop.done)):
        # Crossed LongRoPE's switch: re-prefill prompt + output with long factors, then go on.
        generated = np.asarray(loop.tokens[:, :step])
        history = np.zeros((batch, prompts.shape[1] + step), np.int32)
        for row, prompt, new, n in zip(history, prompts, generated, lengths):
            row[: n + step] = np.concatenate([prompt[:n], new])
        kv, logits = _run_prefill(m, history, lengths + step, policy, chunk_size, max_new_tokens - step, run, packing)
        loop = _start_loop(kv, logits, loop.tokens, jnp.int32(step), loop.done, sampling, loop.key, eos, pad)
        no_stop = jnp.int32(np.iinfo(np.int32).max)
        loop = decode(loop, sampling, eos, pad, no_stop)
    return loop.tokens


def release_compiled() -> None:
    """Drops every program the jitted paths above compiled, for shapes and policies that will not come back
    (`kvjax eval` calls it after each task and length). XLA:CPU maps each compiled program's code in a few
    thousand memory regions, and the kernel allows 65,530 per process by default: an evaluation that kept
    every policy's programs would stop with "Cannot allocate memory" after about thirty policies."""
    for fn in (
        _logits,
        _prefill,
        _prefill_shared,
        _packed_prefill,
        _continue,
        _decode_step,
        _start_loop,
        _decode,
        _open_loop,
    ):
        fn.clear_cache()
