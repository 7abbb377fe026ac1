"""Autoregressive generation with the carried attention state.

The model takes any length, but generation keeps its calls on whole blocks
(one compiled shape for every decode step, and the windows the Pallas kernels
need). Generation therefore keeps two things:

- the model's `TransformerState` after every *completed* block (previous block
  and compressive cache: everything older than the current block), and
- the current, partly filled block, padded to `block_len`.

Each new token runs the model once on the current block from the carried
state and reads the log-probabilities at the last known position; causality
makes the padding after it irrelevant, and the attention is exact, so this
equals a full forward pass over the whole text. When the block fills up, the
state returned by that same call becomes the carried state. Cost per token:
one block, `O(block_len * (block_len + n_code))` attention work per layer,
independent of how long the context already is.

Prefill: the prompt's complete blocks (every block before the one holding its
last token) go through the model in one call, the linear-time form working on
all of them in parallel. They are placed at the *end* of a buffer of a
power-of-two number of blocks (so prompts in one bucket share a compiled
program), after whole blocks of padding that are masked as a separate
document (`doc_starts` at the prompt's first token): the prompt keeps its
block alignment, sees none of the padding, and the state after the call is
the prompt's own (its absolute position starts at 0: the state's position
starts at minus the padding). Attention `"full"` cannot mask documents; its
prefill reads the blocks one call at a time instead.

`prefill_chunk` (a multiple of `block_len`; None = the whole bucket in one
call) reads the bucket in chunks of that many tokens instead, one model call
per chunk carrying the state, looped inside one compiled program (one compile
per bucket and chunk size). The bucket grows to a whole number of chunks
(more padding blocks before the prompts); a row's state stays empty, its
position moving on, until the chunk holding its first token, where the
padding before that token is masked as in the one call, so every row's state
is that of its own tokens. Chunks of padding only are skipped. On a CPU the
one call's per-block cache terms (an array over all the prompt's blocks) cost
more memory traffic than they save: see `PREFILL_CHUNK` for the measured
default.

Prompts of different lengths in one batch (a list of 1-D arrays, or a padded
`[batch, length]` array with `lengths`): every row keeps its own place in its
current block and its own absolute position (`DecodeCarry.position` and
`TransformerState.position` are `[batch]`), so each row completes its blocks
when it would alone, and its tokens are those of its prompt sampled alone
(given the same key, see below).

Tokens are generated in chunks whose buffer length is a power of two (at
most `chunk_len`), looping only over the steps asked for. Token `i` (from 0)
is drawn with `jax.random.fold_in(key, i)` (for the default threefry keys this
is `jax.random.split(key, n)[i]` for any `n > i`), so the tokens do not depend
on the bucket or the chunking. `key` may also be one key per row
(`jax.random.split(key, batch)`): row `r` then draws its token `i` with
`fold_in(keys[r], i)`, exactly as its prompt sampled alone with
`key=keys[r]`; with one key the rows draw together from
`fold_in(key, i)`, so a row's tokens depend on the batch it is in.
"""

from __future__ import annotations

import codecs
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, Bool, Float, Int, Integer, Key, PRNGKeyArray, UInt32

from .nn import Transformer, TransformerState

CHUNK_LEN = 1024
"""Default number of tokens per compiled generation call (`sample_iter`)."""

PREFILL_CHUNK = 2048
"""Tokens per model call while reading the prompt with `sample` /
`sample_iter`'s default `prefill_chunk="auto"`: this many, rounded down to a
whole number of blocks (at least one block).

Chosen from `python -m benchmarks.run ttft` (docs/benchmarks.md, 1-layer
model, block 32, on a shared 2-core CPU, three runs): against the one call
(`prefill_chunk=None`), chunks of 2048 tokens were 1.4-1.9x faster at 16k and
64k tokens, and at 1k they are the one call (the 1k bucket is smaller than a
chunk); chunks of 512 were as fast at 16k-64k but slower at 1k (two calls
where one does), chunks of 8192 slower than 2048 at 16k-64k. On a GPU
(more parallelism per call) the best chunk is unmeasured and likely larger:
pass `prefill_chunk` explicitly there."""

_MIN_STEP_BUCKET = 16
_MAX_STREAM = 2**32  # per-token keys are fold_in(key, i) with i a uint32


def _is_tracer(x) -> bool:
    return isinstance(x, Tracer)


class SampleInterrupted(KeyboardInterrupt):
    """`sample` interrupted (Ctrl-C) between two chunks; `tokens` holds what
    was generated until then (int32 `[batch, n]`, or `[n]` for a 1-D prompt,
    as `sample` would have returned it for `steps=n`).

    A `KeyboardInterrupt`, so code that stops on Ctrl-C still stops."""

    def __init__(self, tokens: np.ndarray):
        super().__init__(
            f"sampling interrupted after {tokens.shape[-1]} generated tokens "
            "(their ids are in .tokens)"
        )
        self.tokens = tokens


def _real_scalar(name: str, value, expected: str) -> float:
    """A concrete real scalar argument as a Python float (bools, strings,
    complex numbers and arrays with more than one element rejected)."""
    ok_type = isinstance(value, (int, float, np.number, np.ndarray, jax.Array))
    if isinstance(value, (bool, np.bool_)) or not ok_type:
        raise TypeError(f"{name} must be {expected}; got {value!r}")
    dtype = np.asarray(value).dtype if not isinstance(value, jax.Array) else value.dtype
    if np.ndim(value) != 0 or not (
        jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
    ):
        raise TypeError(f"{name} must be {expected}; got {value!r}")
    return float(value)


def _check_temperature(temperature) -> float:
    """A concrete temperature: finite and >= 0 (0 = greedy)."""
    expected = "a finite number >= 0 (0 = greedy decoding)"
    t = _real_scalar("temperature", temperature, expected)
    if not (math.isfinite(t) and t >= 0.0):
        raise ValueError(f"temperature must be {expected}; got {temperature!r}")
    return t


def _check_top_p(top_p) -> float:
    expected = "a number in (0, 1] (1 = plain sampling)"
    p = _real_scalar("top_p", top_p, expected)
    if not 0.0 < p <= 1.0:  # False for NaN too
        raise ValueError(f"top_p must be {expected}; got {top_p!r}")
    return p


def _check_top_k(top_k) -> int:
    """A concrete top_k as the traced convention: None -> 0 (off), else an
    int >= 1."""
    if top_k is None:
        return 0
    if (
        isinstance(top_k, (bool, np.bool_))
        or not isinstance(top_k, (int, np.integer))
        or top_k < 1
    ):
        raise ValueError(f"top_k must be None or an int >= 1; got {top_k!r}")
    return int(top_k)


def _key_rows(key) -> tuple[int, ...]:
    """The batch shape of `key`: () for one key, else one key per entry
    (typed keys, or raw uint32 keys with a trailing axis of 2)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return tuple(key.shape)
    return tuple(key.shape[:-1])


def sample_token(
    logprobs: Float[Array, "*batch vocab"],
    key: PRNGKeyArray | Key[Array, " *batch"] | UInt32[Array, "*batch 2"],
    *,
    temperature: float | Float[Array, ""] = 1.0,
    top_p: float | Float[Array, ""] = 1.0,
    top_k: int | Int[Array, ""] | None = None,
) -> Int[Array, "*batch"]:
    """Draw one token per row from `softmax(logprobs / temperature)`
    restricted to its nucleus.

    - `temperature == 0`: greedy (argmax, ties -> lowest id).
    - `top_p` in (0, 1]: nucleus sampling; keeps the smallest set of most
      likely tokens whose probability reaches `top_p` (always at least the
      most likely one), renormalised. `top_p = 1` keeps every token.
    - `top_k`: keep only the `top_k` most likely tokens (ties broken toward
      the lowest id), applied together with `top_p` (a token must pass
      both); None keeps every token. Traced, `top_k <= 0` means None (one
      compiled program for every `top_k`).

    `key` is one key for all rows, or one key per row (shape `*batch`, e.g.
    `jax.random.split(key, batch)`): row `r` then draws exactly what it
    draws alone (`logprobs[r]`) with `key[r]`.

    Concrete arguments are checked (`ValueError` for a NaN, infinite or
    negative temperature, a `top_p` outside (0, 1]); traced ones cannot be,
    and a traced non-positive temperature means greedy.
    """
    rows = _key_rows(key)
    if rows != ():
        if rows != tuple(logprobs.shape[:-1]):
            raise ValueError(
                f"key holds keys of shape {rows}; one key per row needs the "
                f"logprobs' batch shape {tuple(logprobs.shape[:-1])}"
            )
        flat_keys = key.reshape(-1, *key.shape[len(rows) :])
        flat = logprobs.reshape(-1, logprobs.shape[-1])
        draw = jax.vmap(
            lambda lp, k: sample_token(
                lp, k, temperature=temperature, top_p=top_p, top_k=top_k
            )
        )
        return draw(flat, flat_keys).reshape(rows)
    if not _is_tracer(temperature):
        _check_temperature(temperature)
    if not _is_tracer(top_p):
        _check_top_p(top_p)
    if not _is_tracer(top_k):
        top_k = _check_top_k(top_k)
    logprobs = logprobs.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    greedy = jnp.argmax(logprobs, axis=-1).astype(jnp.int32)
    scaled = jax.nn.log_softmax(logprobs / jnp.maximum(temperature, 1e-6), axis=-1)
    # Nucleus: sort descending; keep a token if the mass strictly before it
    # is < top_p.
    order = jnp.argsort(-scaled, axis=-1, stable=True)
    sorted_lp = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jnp.exp(sorted_lp)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = before < top_p
    top_k = jnp.asarray(top_k, jnp.int32)
    rank = jnp.arange(sorted_lp.shape[-1], dtype=jnp.int32)
    in_top_k = jnp.broadcast_to((top_k <= 0) | (rank < top_k), keep_sorted.shape)
    keep_sorted = keep_sorted & in_top_k
    keep_sorted = keep_sorted.at[..., 0].set(True)
    inverse = jnp.argsort(order, axis=-1)
    keep = jnp.take_along_axis(keep_sorted, inverse, axis=-1)
    masked = jnp.where(keep, scaled, -jnp.inf)
    drawn = jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)
    return jnp.where(temperature <= 0, greedy, drawn)


class DecodeCarry(NamedTuple):
    """What generation carries from one token to the next.

    - `state`: the model's `TransformerState` after every *completed* block.
    - `block`: int32 `[batch, block_len]`, the current block: known tokens up
      to `position`, zeros after.
    - `position`: int32, index in `block` of the last known token: a scalar
      (every row at the same place), or `[batch]`, one per row (prompts of
      different lengths; `state.position` is then `[batch]` too, and each
      row's state moves on when its own block is full).
    """

    state: TransformerState
    block: Int[Array, "batch block_len"]
    position: Int[Array, ""] | Int[Array, " batch"]


def decode_step(
    model: Transformer,
    carry: DecodeCarry,
    key: PRNGKeyArray | Key[Array, " batch"] | UInt32[Array, "batch 2"],
    *,
    temperature: float | Float[Array, ""] = 1.0,
    top_p: float | Float[Array, ""] = 1.0,
    top_k: int | Int[Array, ""] | None = None,
) -> tuple[DecodeCarry, Int[Array, " batch"], Float[Array, "batch vocab"]]:
    """One generated token: run the model on the current block from the
    carried state, read the log-probabilities at `carry.position`, draw a
    token (`sample_token`; `key` one key, or one per row) and write it after
    it; when the block is full, the state of that same call becomes the
    carried state and a new block starts with the token (per row, for a
    per-row `position`).

    Traceable (use it in `jax.lax.scan`); `sample` is this step scanned.

    **Returns:** the new carry, the drawn tokens `[batch]` and the
    log-probabilities they were drawn from `[batch, vocab]`.
    """
    big_l = model.config.block_len
    if carry.position.ndim == 1 and carry.state.position.ndim == 0:
        raise ValueError(
            "a per-row carry.position needs a per-row carry.state.position "
            f"(shape {tuple(carry.position.shape)}); got a scalar"
        )
    logprobs, new_state, _ = model(carry.block, carry.state)
    if carry.position.ndim == 0:
        lp = jax.lax.dynamic_index_in_dim(
            logprobs, carry.position, axis=1, keepdims=False
        )
        tok = sample_token(lp, key, temperature=temperature, top_p=top_p, top_k=top_k)
        full = carry.position == big_l - 1
        state = jax.tree.map(lambda n, o: jnp.where(full, n, o), new_state, carry.state)
        fresh = jnp.zeros_like(carry.block).at[:, 0].set(tok)
        written = jax.lax.dynamic_update_index_in_dim(
            carry.block, tok, carry.position + 1, axis=1
        )
        block = jnp.where(full, fresh, written)
        position = jnp.where(full, 0, carry.position + 1).astype(jnp.int32)
        return DecodeCarry(state, block, position), tok, lp
    pos = carry.position
    lp = jnp.take_along_axis(logprobs, pos[:, None, None], axis=1)[:, 0]
    tok = sample_token(lp, key, temperature=temperature, top_p=top_p, top_k=top_k)
    full = pos == big_l - 1  # [batch]: these rows' blocks are complete
    state = _where_rows(full, new_state, carry.state)
    col = jnp.arange(big_l)[None, :]
    written = jnp.where(col == (pos + 1)[:, None], tok[:, None], carry.block)
    fresh = jnp.where(col == 0, tok[:, None], 0)
    block = jnp.where(full[:, None], fresh, written)
    position = jnp.where(full, 0, pos + 1).astype(jnp.int32)
    return DecodeCarry(state, block, position), tok, lp


def _where_rows(
    pick: Bool[Array, " batch"], new: TransformerState, old: TransformerState
) -> TransformerState:
    """Row `r` of `new` where `pick[r]`, else of `old` (every stacked array
    has its batch axis second, after the layer axis; `position` per row)."""

    def select(n, o):
        return jnp.where(pick.reshape((1, -1) + (1,) * (n.ndim - 2)), n, o)

    stacked = jax.tree.map(select, new.stacked, old.stacked)
    position = jnp.where(pick, new.position, old.position)
    return TransformerState(stacked=stacked, position=position)


def _prompt_ids(prompt, name: str) -> np.ndarray:
    """`prompt` as a host integer array (concrete, integer dtype)."""
    if _is_tracer(prompt):
        raise TypeError(
            f"{name} must be a concrete array: sample / sample_iter run a host "
            "loop and cannot be traced (use decode_step inside jax.jit)"
        )
    ids = np.asarray(prompt)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} must be integer token ids; got dtype {ids.dtype}")
    return ids


def _check_range(model: Transformer, ids: np.ndarray, name: str, shape) -> None:
    """Every id in `[0, n_vocab)`, read in its own dtype (so uint8 / int8
    prompts, what `tvq_eqx.data.load_bytes` gives, are read correctly, and
    wide ids cannot wrap into range)."""
    n_vocab = model.config.n_vocab
    low, high = int(ids.min()), int(ids.max())  # Python ints: no wrapping
    if low < 0 or high >= n_vocab:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name} token ids must be in [0, n_vocab={n_vocab}); got {bad} "
            f"({name} dtype {ids.dtype}, shape {tuple(shape)})"
        )


class _Prompts(NamedTuple):
    """Checked prompts: `rows` host int32 `[batch, max length]` (zeros after
    each row's end), `lengths` `[batch]`, and whether the output is 1-D."""

    rows: np.ndarray
    lengths: np.ndarray
    one_d: bool


def _check_prompt(model: Transformer, prompt, lengths=None) -> _Prompts:
    """The prompt(s) as `_Prompts`: a `[length]` or `[batch, length]` array
    (every row `length` long, or `lengths[r]` with `lengths`; what follows a
    row's end is ignored), or a list of 1-D arrays (prompts of different
    lengths)."""
    if not isinstance(model, Transformer):
        raise TypeError(
            f"model must be a tvq_eqx.Transformer; got {type(model).__name__}"
        )
    if isinstance(prompt, (list, tuple)):
        if lengths is not None:
            raise ValueError(
                "lengths is for a padded [batch, length] prompt array; a list of "
                "prompts gives each prompt's own length"
            )
        if not prompt:
            raise ValueError("prompt must hold at least one prompt; got an empty list")
        ids = [_prompt_ids(p, f"prompt[{r}]") for r, p in enumerate(prompt)]
        for r, row in enumerate(ids):
            if row.ndim != 1 or row.shape[0] == 0:
                raise ValueError(
                    f"prompt[{r}] must be 1-D [length] with length >= 1 (a list "
                    f"holds one prompt per row); got shape {tuple(row.shape)}"
                )
            _check_range(model, row, f"prompt[{r}]", row.shape)
        sizes = np.array([row.shape[0] for row in ids], np.int64)
        rows = np.zeros((len(ids), int(sizes.max())), np.int32)
        for r, row in enumerate(ids):
            rows[r, : row.shape[0]] = row
        return _Prompts(rows, sizes, False)
    ids = _prompt_ids(prompt, "prompt")
    one_d = ids.ndim == 1
    if one_d:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(
            f"prompt must be [batch, length] or [length] with batch, length >= 1 "
            f"(or a list of 1-D prompts); got shape {tuple(np.shape(prompt))}"
        )
    b, p = ids.shape
    if lengths is None:
        _check_range(model, ids, "prompt", np.shape(prompt))
        return _Prompts(ids.astype(np.int32), np.full(b, p, np.int64), one_d)
    if one_d:
        raise ValueError(
            "lengths needs a padded [batch, length] prompt; got a 1-D prompt"
        )
    sizes = _check_lengths(lengths, b, p)
    real = np.arange(p)[None, :] < sizes[:, None]
    _check_range(model, ids[real], "prompt", ids.shape)
    return _Prompts(np.where(real, ids, 0).astype(np.int32), sizes, False)


def _check_lengths(lengths, b: int, p: int) -> np.ndarray:
    if _is_tracer(lengths):
        raise TypeError("lengths must be concrete (host ints), not traced")
    sizes = np.asarray(lengths)
    if not (np.issubdtype(sizes.dtype, np.integer) and sizes.shape == (b,)):
        raise ValueError(
            f"lengths must be {b} ints (one per prompt row, prompt shape "
            f"{(b, p)}); got {sizes.dtype} shape {tuple(sizes.shape)}"
        )
    if sizes.min() < 1 or sizes.max() > p:
        raise ValueError(
            f"lengths must be in [1, {p}] (the prompt's padded length); got "
            f"{sizes.tolist()}"
        )
    return sizes.astype(np.int64)


def _check_steps(steps) -> int:
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int >= 0; got {steps!r}")
    if steps < 0:
        raise ValueError(f"steps must be an int >= 0; got {steps!r}")
    return int(steps)


def _check_key(key, batch: int | None = None) -> None:
    """One concrete PRNG key, or (given `batch`) one per row: typed `[batch]`
    or raw uint32 `[batch, 2]` (`jax.random.split(key, batch)`)."""
    if not isinstance(key, jax.Array) or _is_tracer(key):
        raise TypeError(
            f"key must be a concrete PRNG key (jax.random.key(seed)); got "
            f"{type(key).__name__}"
        )
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = key.dtype == jnp.uint32 and key.ndim >= 1 and key.shape[-1] == 2
    rows = _key_rows(key) if typed or raw else None
    if rows == () or (batch is not None and rows == (batch,)):
        return
    per_row = (
        "" if batch is None else f" or one per row (jax.random.split(key, {batch}))"
    )
    raise TypeError(
        f"key must be one PRNG key (jax.random.key(seed)){per_row}; got dtype "
        f"{key.dtype}, shape {tuple(key.shape)}"
    )


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


_PromptArg = (
    Integer[Array, "*batch prompt"]
    | Integer[np.ndarray, "*batch prompt"]
    | Sequence[Integer[Array, " _"] | Integer[np.ndarray, " _"]]
)
_KeyArg = PRNGKeyArray | Key[Array, " _"] | UInt32[Array, "_ 2"]


def sample(
    model: Transformer,
    prompt: _PromptArg,
    *,
    steps: int,
    key: _KeyArg,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    chunk_len: int = CHUNK_LEN,
    lengths: Sequence[int] | Integer[np.ndarray, " _"] | None = None,
    prefill_chunk: int | Literal["auto"] | None = "auto",
) -> Int[Array, "*batch steps"]:
    """Generate `steps` tokens after `prompt` (see the module docstring for
    the scheme and its cost).

    **Arguments:**

    - `model`: a `Transformer` (dropout off during generation).
    - `prompt`: integer `[batch, length]` or `[length]`, `length >= 1`, token
      ids in `[0, n_vocab)` (any integer dtype, uint8 included); or prompts
      of different lengths: a list of 1-D arrays, or a `[batch, length]`
      array padded after each row's end with `lengths`.
    - `steps`: number of new tokens (>= 0).
    - `key`: PRNG key; token `i` is drawn with `jax.random.fold_in(key, i)`.
      Or one key per row (`jax.random.split(key, batch)`): row `r`'s tokens
      are then exactly those of its prompt sampled alone with `key[r]`.
    - `temperature`: softmax temperature, finite and >= 0; 0 is greedy.
    - `top_p`: nucleus mass in (0, 1] (1 = plain sampling).
    - `top_k`: draw only among the `top_k` most likely tokens (None = all);
      with `top_p`, a token must pass both.
    - `chunk_len`: tokens per compiled call (memory and Ctrl-C granularity);
      the tokens do not depend on it.
    - `lengths`: with a padded `[batch, length]` prompt, each row's prompt
      length (in `[1, length]`); the ids after it are ignored.
    - `prefill_chunk`: tokens per model call while reading the prompt, a
      multiple of `block_len` (None = the whole prompt, bucketed, in one
      call; a chunk at least the bucket is that one call); the state and
      the tokens do not depend on it (up to float rounding). `"auto"`:
      `PREFILL_CHUNK` (2048) tokens rounded down to whole blocks (at least
      one), the fastest measured on a CPU (see `PREFILL_CHUNK`; GPU
      unmeasured). Attention `"full"` reads the prompt one block per call
      whatever its value.

    **Returns:** the `steps` generated tokens, int32 `[batch, steps]` (or
    `[steps]` for a 1-D prompt).

    **Raises:** `SampleInterrupted` (a `KeyboardInterrupt`) on Ctrl-C
    between two chunks, with the tokens generated so far in `.tokens`; use
    `sample_iter` to consume a long generation as it is produced.
    """
    steps = _check_steps(steps)
    job = _checked(
        model, prompt, lengths, steps, key, temperature, top_p, top_k, chunk_len,
        prefill_chunk,
    )  # fmt: skip
    chunks: list[np.ndarray] = []
    try:
        chunks.extend(_stream(job))
    except KeyboardInterrupt as interrupt:
        if isinstance(interrupt, SampleInterrupted):
            raise
        raise SampleInterrupted(_concat(chunks, job)) from interrupt
    return jnp.asarray(_concat(chunks, job))


def _concat(chunks, job: _Job) -> np.ndarray:
    if chunks:
        return np.concatenate(chunks, axis=-1)
    b = job.prompts.rows.shape[0]
    return np.zeros((0,) if job.prompts.one_d else (b, 0), np.int32)


def sample_iter(
    model: Transformer,
    prompt: _PromptArg,
    *,
    steps: int | None,
    key: _KeyArg,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    chunk_len: int = CHUNK_LEN,
    lengths: Sequence[int] | Integer[np.ndarray, " _"] | None = None,
    prefill_chunk: int | Literal["auto"] | None = "auto",
) -> Iterator[Int[np.ndarray, "*batch chunk"]]:
    """`sample` as a stream: yields the generated tokens in consecutive
    chunks of at most `chunk_len` (host numpy int32 `[batch, n]`, or `[n]`
    for a 1-D prompt), each as soon as it is generated. Their concatenation
    is `sample(..., steps=steps)` with the same key, whatever `chunk_len`.

    Memory stays bounded by one chunk however long the stream, and a Ctrl-C
    stops it between two chunks (the `KeyboardInterrupt` reaches the caller,
    who has every chunk yielded so far). `steps=None` streams without end
    (up to 2**32 tokens). Arguments are checked before the first token;
    see `sample` for them (prompts of different lengths included).
    """
    steps = None if steps is None else _check_steps(steps)
    job = _checked(
        model, prompt, lengths, steps, key, temperature, top_p, top_k, chunk_len,
        prefill_chunk,
    )  # fmt: skip
    return _stream(job)


class _Job(NamedTuple):
    model: Transformer
    prompts: _Prompts
    key: Array
    filters: tuple[float, float, int]
    total: int
    chunk_len: int
    prefill_chunk: int | None  # resolved: "auto" is a number of tokens


def _checked(
    model, prompt, lengths, steps, key, temperature, top_p, top_k, chunk_len,
    prefill_chunk,
) -> _Job:  # fmt: skip
    """Every argument checked (in this order), before anything runs."""
    if (
        isinstance(chunk_len, (bool, np.bool_))
        or not isinstance(chunk_len, (int, np.integer))
        or chunk_len < 1
    ):
        raise ValueError(f"chunk_len must be an int >= 1; got {chunk_len!r}")
    filters = (
        _check_temperature(temperature),
        _check_top_p(top_p),
        _check_top_k(top_k),
    )
    prompts = _check_prompt(model, prompt, lengths)
    prefill_chunk = _check_prefill_chunk(model, prefill_chunk)
    _check_key(key, prompts.rows.shape[0])
    total = _MAX_STREAM if steps is None else steps
    if total > _MAX_STREAM:
        raise ValueError(f"steps must be <= 2**32; got {steps!r}")
    return _Job(model, prompts, key, filters, total, int(chunk_len), prefill_chunk)


def _auto_prefill_chunk(block_len: int) -> int:
    """`PREFILL_CHUNK` tokens rounded down to whole blocks, at least one."""
    return max(PREFILL_CHUNK // block_len, 1) * block_len


def _check_prefill_chunk(model: Transformer, prefill_chunk) -> int | None:
    """None, `"auto"` (resolved to `_auto_prefill_chunk`), or a positive int
    multiple of the model's `block_len` (the model reads whole blocks)."""
    big_l = model.config.block_len
    if prefill_chunk is None:
        return None
    if isinstance(prefill_chunk, str) and prefill_chunk == "auto":
        return _auto_prefill_chunk(big_l)
    expected = f'None, "auto" or a positive multiple of block_len ({big_l})'
    if isinstance(prefill_chunk, (bool, np.bool_)) or not isinstance(
        prefill_chunk, (int, np.integer)
    ):
        raise TypeError(f"prefill_chunk must be {expected}; got {prefill_chunk!r}")
    if prefill_chunk < 1 or prefill_chunk % big_l:
        raise ValueError(f"prefill_chunk must be {expected}; got {prefill_chunk!r}")
    return int(prefill_chunk)


def _stream(job: _Job):
    if job.total == 0:
        return
    carry = _start(
        job.model,
        job.prompts.rows,
        job.prompts.lengths,
        prefill_chunk=job.prefill_chunk,
    )
    temperature, top_p, top_k = job.filters
    # Traced scalars: one compiled chunk for every setting.
    traced = (jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k))
    done = 0
    while done < job.total:
        count = min(job.total - done, job.chunk_len)
        size = min(_pow2_at_least(max(count, _MIN_STEP_BUCKET)), job.chunk_len)
        carry, out = _decode_chunk(
            job.model, carry, job.key, jnp.uint32(done), jnp.int32(count), *traced, size
        )
        chunk = np.asarray(out)[:, :count]
        done += count
        yield chunk[0] if job.prompts.one_d else chunk


def _start(
    model: Transformer,
    rows: np.ndarray,
    lengths: np.ndarray,
    prefill=None,
    prefill_chunk: int | None = None,
):
    """The carry after the prompts `rows[r, :lengths[r]]`: each row's
    complete blocks (those before the block holding its last token) read by
    `prefill` (default: `_prefill` with `prefill_chunk` None or at least the
    bucket, else `_prefill_chunks` in chunks of `prefill_chunk` tokens, and
    `_prefill_blocks` for attention "full"), its last block as its current
    block; positions per row."""
    big_l = model.config.block_len
    b = rows.shape[0]
    n_full = (lengths - 1) // big_l
    block = np.zeros((b, big_l), np.int32)
    for r in range(b):
        lo = n_full[r] * big_l
        block[r, : lengths[r] - lo] = rows[r, lo : lengths[r]]
    position = jnp.asarray(lengths - 1 - n_full * big_l, jnp.int32)
    n_max = int(n_full.max())
    if n_max == 0:  # nothing to read: no compiled prefill needed
        state = _per_row(model.init_state(b))
    else:
        # Bucket: a power-of-two number of blocks, each row's complete blocks
        # at its end (the padding before them).
        n_buf = _pow2_at_least(n_max) * big_l
        chunk = None  # None: one call (or `prefill`)
        if prefill is None and prefill_chunk is not None and prefill_chunk < n_buf:
            chunk = prefill_chunk if _masks_documents(model) else None
        if chunk is not None:  # a whole number of chunks: more padding before
            n_buf = -(-n_buf // chunk) * chunk
        history = np.zeros((b, n_buf), np.int32)
        for r in range(b):
            k = n_full[r] * big_l
            history[r, n_buf - k :] = rows[r, :k]
        args = (model, jnp.asarray(history), jnp.asarray(n_full, jnp.int32))
        if chunk is not None:
            state = _prefill_chunks(*args, chunk)
        else:
            if prefill is None:
                prefill = _prefill if _masks_documents(model) else _prefill_blocks
            state = prefill(*args)
    return DecodeCarry(state, jnp.asarray(block), position)


def _masks_documents(model: Transformer) -> bool:
    """Whether the model can mask the bucket's padding as a document (the
    rule's one home: `TransformerConfig.check_masks_documents`)."""
    try:
        model.config.check_masks_documents("the one-call prefill")
    except ValueError:
        return False
    return True


def _per_row(state: TransformerState) -> TransformerState:
    """`state` with its (shared) position as one per row."""
    b = state.batch_size
    position = jnp.broadcast_to(state.position, (b,)).astype(jnp.int32)
    return TransformerState(stacked=state.stacked, position=position)


@eqx.filter_jit
def _prefill(
    model: Transformer,
    history: Int[Array, "batch padded"],
    n_full: Int[Array, " batch"],
) -> TransformerState:
    """The state after row `r`'s `n_full[r]` blocks, which end `history[r]`,
    in one model call over all of `history`: the padding before them is
    masked as another document (the prompt's first token starts one), the
    absolute position starts at minus the padding (0 at the prompt), and
    window slots the prompt does not fill are zeroed, as reading the blocks
    alone from the empty state leaves them; rows without complete blocks get
    the empty state."""
    big_l = model.config.block_len
    b, t = history.shape
    pad = t - n_full * big_l
    has = n_full > 0
    doc_starts = (jnp.arange(t)[None, :] == pad[:, None]) & has[:, None]
    empty = _per_row(model.init_state(b))
    start = TransformerState(stacked=empty.stacked, position=-pad.astype(jnp.int32))
    _, state, _ = model(history, start, doc_starts=doc_starts)
    return _where_rows(has, _clear_stale_window(state), empty)


@eqx.filter_jit
def _prefill_chunks(
    model: Transformer,
    history: Int[Array, "batch padded"],
    n_full: Int[Array, " batch"],
    chunk: int,
) -> TransformerState:
    """`_prefill` in chunks of `chunk` tokens (`padded` a multiple of it):
    one model call per chunk carrying the state, a loop over the chunks from
    the first holding a prompt token. A row whose prompt has not begun keeps
    the empty state (its position moving on) instead of the padding's; in
    the chunk holding its first token the padding before it is masked as
    another document, as in the one call; from there on its state is its
    prompt's. Compiled once per bucket and `chunk`."""
    big_l = model.config.block_len
    b, t = history.shape
    pad = t - n_full * big_l
    has = n_full > 0
    doc_starts = (jnp.arange(t)[None, :] == pad[:, None]) & has[:, None]
    empty = _per_row(model.init_state(b))

    def empty_at(position):
        return TransformerState(stacked=empty.stacked, position=position)

    def read_chunk(c, state):
        lo = c * chunk
        tokens = jax.lax.dynamic_slice_in_dim(history, lo, chunk, axis=1)
        starts = jax.lax.dynamic_slice_in_dim(doc_starts, lo, chunk, axis=1)
        _, new, _ = model(tokens, state, doc_starts=starts)
        begun = lo + chunk > pad  # the row has a prompt token up to here
        return _where_rows(begun, new, empty_at(new.position))

    first = (t - jnp.max(n_full) * big_l) // chunk
    start = empty_at((first * chunk - pad).astype(jnp.int32))
    state = jax.lax.fori_loop(first, t // chunk, read_chunk, start)
    return _where_rows(has, _clear_stale_window(state), empty)


def _clear_stale_window(state: TransformerState) -> TransformerState:
    """Window slots before the state's `length` (which no attention reads)
    set to zero, the values the empty state starts them with."""

    def clear(unit):
        m = unit.window_code.shape[2]
        live = jnp.arange(m)[None, None, :] >= m - unit.length[..., None]

        def zero(x):
            return jnp.where(live.reshape(live.shape + (1,) * (x.ndim - 3)), x, 0)

        return eqx.tree_at(
            lambda u: (u.window_code, u.window_key, u.window_value),
            unit,
            (zero(unit.window_code), zero(unit.window_key), zero(unit.window_value)),
        )

    stacked = tuple(clear(unit) for unit in state.stacked)
    return TransformerState(stacked=stacked, position=state.position)  # type: ignore[arg-type]


@eqx.filter_jit
def _prefill_blocks(
    model: Transformer,
    history: Int[Array, "batch padded"],
    n_full: Int[Array, " batch"],
) -> TransformerState:
    """`_prefill` one block at a time (one model call per block of the
    longest prompt, a loop of dynamic length, each row's state moving on from
    its own first block): for attention "full", which cannot mask the
    padding as a document; and the earlier prefill, kept as the baseline of
    the time-to-first-token benchmark (benchmarks/decode.py)."""
    big_l = model.config.block_len
    b, t = history.shape
    n_blk = t // big_l

    def read_block(i, state):
        block = jax.lax.dynamic_slice_in_dim(history, i * big_l, big_l, axis=1)
        _, new, _ = model(block, state)
        return _where_rows(i >= n_blk - n_full, new, state)

    first = n_blk - jnp.max(n_full)
    return jax.lax.fori_loop(first, n_blk, read_block, _per_row(model.init_state(b)))


def _fold_in(key, n):
    """`fold_in(key, n)` for one key or for each of a batch of keys."""
    if _key_rows(key) == ():
        return jax.random.fold_in(key, n)
    return jax.vmap(lambda k: jax.random.fold_in(k, n))(key)


@eqx.filter_jit
def _decode_chunk(
    model: Transformer,
    carry: DecodeCarry,
    key: Array,
    offset: Array,
    count: Int[Array, ""],
    temperature: Float[Array, ""],
    top_p: Float[Array, ""],
    top_k: Int[Array, ""],
    size: int,
) -> tuple[DecodeCarry, Int[Array, "batch size"]]:
    """`count <= size` tokens (`decode_step` looped), token `offset + i`
    drawn with `fold_in(key, offset + i)` (each row's own key for per-row
    keys); written into a `[batch, size]` buffer (zeros after `count`).
    Compiled once per `size`."""
    b = carry.block.shape[0]

    def body(i, loop):
        carry, out = loop
        k = _fold_in(key, offset + i.astype(jnp.uint32))
        carry, tok, _ = decode_step(
            model, carry, k, temperature=temperature, top_p=top_p, top_k=top_k
        )
        out = jax.lax.dynamic_update_index_in_dim(out, tok, i, axis=1)
        return carry, out

    out = jnp.zeros((b, size), jnp.int32)
    return jax.lax.fori_loop(0, count, body, (carry, out))


class TokenPrinter:
    """Writes generated tokens to a text stream as they come, chunk by chunk
    (`sample_iter`'s chunks): byte tokens through an incremental UTF-8
    decoder (a character split between two chunks prints whole; invalid
    bytes as U+FFFD, as `tvq_eqx.data.decode_bytes`), other text with
    `decode` (token ids -> str) per chunk, and without a decoder the ids.

        printer = TokenPrinter(decode_bytes, byte_level=True)
        for chunk in sample_iter(model, prompt, steps=200, key=key):
            printer.write(chunk)
        printer.close()
    """

    def __init__(
        self,
        decode: Callable[[np.ndarray], str] | None,
        *,
        byte_level: bool,
        stream=None,
    ):
        self.decode = decode
        self.stream = sys.stdout if stream is None else stream
        self.count = 0  # tokens written so far
        self._tail = np.zeros(0, np.int32)
        self._utf8 = (
            codecs.getincrementaldecoder("utf-8")("replace") if byte_level else None
        )

    def write(self, tokens) -> None:
        toks = np.asarray(tokens).reshape(-1)
        if self._utf8 is not None:
            raw = np.where(toks < 256, toks, 0xFF).astype(np.uint8).tobytes()
            text = self._utf8.decode(raw)
        elif self.decode is not None:
            # Decoded with the tokens before it, so that a piece whose text
            # depends on what precedes it (sentencepiece drops the space of
            # a text's first word) prints as in one whole decode.
            before = self.decode(self._tail)
            text = self.decode(np.concatenate([self._tail, toks]))
            text = text[len(before) :] if text.startswith(before) else text
            self._tail = np.concatenate([self._tail, toks])[-8:]
        else:
            text = "".join(f"{int(t)} " for t in toks)
        self.count += toks.size
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        """Flush a character the decoder still holds, and end the line."""
        tail = self._utf8.decode(b"", final=True) if self._utf8 is not None else ""
        self.stream.write(tail + "\n")
        self.stream.flush()
