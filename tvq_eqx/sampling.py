"""Autoregressive generation with the carried attention state.

The model runs on whole blocks (`seq % block_len == 0`). Generation therefore
keeps two things:

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

Compilation is bucketed: the prompt is zero-padded to a power-of-two number
of blocks and read block by block up to its true length, and tokens are
generated in chunks whose buffer length is a power of two (at most
`chunk_len`), looping only over the steps asked for; so prompts and lengths
in the same bucket reuse one compiled program, and the results are those of
the unpadded run. Token `i` (from 0) is drawn with
`jax.random.fold_in(key, i)` (for the default threefry keys this is
`jax.random.split(key, n)[i]` for any `n > i`), so the tokens do not depend
on the bucket or the chunking.
"""

from __future__ import annotations

import codecs
import math
import sys
from collections.abc import Callable, Iterator
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, Float, Int, Integer, PRNGKeyArray

from .nn import Transformer, TransformerState

CHUNK_LEN = 1024
"""Default number of tokens per compiled generation call (`sample_iter`)."""

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


def sample_token(
    logprobs: Float[Array, "*batch vocab"],
    key: PRNGKeyArray,
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

    Concrete arguments are checked (`ValueError` for a NaN, infinite or
    negative temperature, a `top_p` outside (0, 1]); traced ones cannot be,
    and a traced non-positive temperature means greedy.
    """
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
    - `position`: int32 scalar, index in `block` of the last known token.
    """

    state: TransformerState
    block: Int[Array, "batch block_len"]
    position: Int[Array, ""]


def decode_step(
    model: Transformer,
    carry: DecodeCarry,
    key: PRNGKeyArray,
    *,
    temperature: float | Float[Array, ""] = 1.0,
    top_p: float | Float[Array, ""] = 1.0,
    top_k: int | Int[Array, ""] | None = None,
) -> tuple[DecodeCarry, Int[Array, " batch"], Float[Array, "batch vocab"]]:
    """One generated token: run the model on the current block from the
    carried state, read the log-probabilities at `carry.position`, draw a
    token (`sample_token`) and write it after it; when the block is full, the
    state of that same call becomes the carried state and a new block starts
    with the token.

    Traceable (use it in `jax.lax.scan`); `sample` is this step scanned.

    **Returns:** the new carry, the drawn tokens `[batch]` and the
    log-probabilities they were drawn from `[batch, vocab]`.
    """
    big_l = model.config.block_len
    logprobs, new_state, _ = model(carry.block, carry.state)
    lp = jax.lax.dynamic_index_in_dim(logprobs, carry.position, axis=1, keepdims=False)
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


def _check_prompt(model: Transformer, prompt) -> np.ndarray:
    """The prompt as a host int32 `[batch, length]` array, every id checked
    against `[0, n_vocab)` in its own dtype (so uint8 / int8 prompts, what
    `tvq_eqx.data.load_bytes` gives, are read correctly, and wide ids cannot
    wrap into range)."""
    if not isinstance(model, Transformer):
        raise TypeError(
            f"model must be a tvq_eqx.Transformer; got {type(model).__name__}"
        )
    if _is_tracer(prompt):
        raise TypeError(
            "prompt must be a concrete array: sample / sample_iter run a host "
            "loop and cannot be traced (use decode_step inside jax.jit)"
        )
    prompt = np.asarray(prompt)
    if not np.issubdtype(prompt.dtype, np.integer):
        raise TypeError(f"prompt must be integer token ids; got dtype {prompt.dtype}")
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(
            f"prompt must be [batch, length] or [length] with batch, length >= 1; "
            f"got shape {tuple(prompt.shape)}"
        )
    n_vocab = model.config.n_vocab
    low, high = int(prompt.min()), int(prompt.max())  # Python ints: no wrapping
    if low < 0 or high >= n_vocab:
        bad = low if low < 0 else high
        raise ValueError(
            f"prompt token ids must be in [0, n_vocab={n_vocab}); got {bad} "
            f"(prompt dtype {prompt.dtype}, shape {tuple(prompt.shape)})"
        )
    return prompt.astype(np.int32)


def _check_steps(steps) -> int:
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int >= 0; got {steps!r}")
    if steps < 0:
        raise ValueError(f"steps must be an int >= 0; got {steps!r}")
    return int(steps)


def _check_key(key) -> None:
    if not isinstance(key, jax.Array) or _is_tracer(key):
        raise TypeError(
            f"key must be a concrete PRNG key (jax.random.key(seed)); got "
            f"{type(key).__name__}"
        )
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not (typed and key.shape == ()) and not (
        key.dtype == jnp.uint32 and key.shape == (2,)
    ):
        raise TypeError(
            f"key must be one PRNG key (jax.random.key(seed)); got dtype "
            f"{key.dtype}, shape {tuple(key.shape)}"
        )


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def sample(
    model: Transformer,
    prompt: Integer[Array, "*batch prompt"] | Integer[np.ndarray, "*batch prompt"],
    *,
    steps: int,
    key: PRNGKeyArray,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    chunk_len: int = CHUNK_LEN,
) -> Int[Array, "*batch steps"]:
    """Generate `steps` tokens after `prompt` (see the module docstring for
    the scheme and its cost).

    **Arguments:**

    - `model`: a `Transformer` (dropout off during generation).
    - `prompt`: integer `[batch, length]` or `[length]`, `length >= 1`, token
      ids in `[0, n_vocab)` (any integer dtype, uint8 included); every row
      has the same length.
    - `steps`: number of new tokens (>= 0).
    - `key`: PRNG key; token `i` is drawn with `jax.random.fold_in(key, i)`.
    - `temperature`: softmax temperature, finite and >= 0; 0 is greedy.
    - `top_p`: nucleus mass in (0, 1] (1 = plain sampling).
    - `top_k`: draw only among the `top_k` most likely tokens (None = all);
      with `top_p`, a token must pass both.
    - `chunk_len`: tokens per compiled call (memory and Ctrl-C granularity);
      the tokens do not depend on it.

    **Returns:** the `steps` generated tokens, int32 `[batch, steps]` (or
    `[steps]` for a 1-D prompt).

    **Raises:** `SampleInterrupted` (a `KeyboardInterrupt`) on Ctrl-C
    between two chunks, with the tokens generated so far in `.tokens`; use
    `sample_iter` to consume a long generation as it is produced.
    """
    steps = _check_steps(steps)
    chunks: list[np.ndarray] = []
    one_d = np.ndim(prompt) == 1
    it = sample_iter(
        model,
        prompt,
        steps=steps,
        key=key,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        chunk_len=chunk_len,
    )
    try:
        chunks.extend(it)
    except KeyboardInterrupt as interrupt:
        if isinstance(interrupt, SampleInterrupted):
            raise
        done = _concat(chunks, one_d, prompt)
        raise SampleInterrupted(done) from interrupt
    return jnp.asarray(_concat(chunks, one_d, prompt))


def _concat(chunks, one_d, prompt) -> np.ndarray:
    if chunks:
        return np.concatenate(chunks, axis=-1)
    b = 1 if one_d else np.shape(prompt)[0]
    return np.zeros((0,) if one_d else (b, 0), np.int32)


def sample_iter(
    model: Transformer,
    prompt: Integer[Array, "*batch prompt"] | Integer[np.ndarray, "*batch prompt"],
    *,
    steps: int | None,
    key: PRNGKeyArray,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    chunk_len: int = CHUNK_LEN,
) -> Iterator[Int[np.ndarray, "*batch chunk"]]:
    """`sample` as a stream: yields the generated tokens in consecutive
    chunks of at most `chunk_len` (host numpy int32 `[batch, n]`, or `[n]`
    for a 1-D prompt), each as soon as it is generated. Their concatenation
    is `sample(..., steps=steps)` with the same key, whatever `chunk_len`.

    Memory stays bounded by one chunk however long the stream, and a Ctrl-C
    stops it between two chunks (the `KeyboardInterrupt` reaches the caller,
    who has every chunk yielded so far). `steps=None` streams without end
    (up to 2**32 tokens). Arguments are checked before the first token;
    see `sample` for them.
    """
    steps = None if steps is None else _check_steps(steps)
    if (
        isinstance(chunk_len, (bool, np.bool_))
        or not isinstance(chunk_len, (int, np.integer))
        or chunk_len < 1
    ):
        raise ValueError(f"chunk_len must be an int >= 1; got {chunk_len!r}")
    temperature = _check_temperature(temperature)
    top_p = _check_top_p(top_p)
    top_k = _check_top_k(top_k)
    _check_key(key)
    one_d = np.ndim(prompt) == 1
    tokens = _check_prompt(model, prompt)
    total = _MAX_STREAM if steps is None else steps
    if total > _MAX_STREAM:
        raise ValueError(f"steps must be <= 2**32; got {steps!r}")
    filters = (temperature, top_p, top_k)
    return _stream(model, tokens, key, filters, total, int(chunk_len), one_d)


def _stream(model, tokens, key, filters, total, chunk_len, one_d):
    if total == 0:
        return
    big_l = model.config.block_len
    b, p = tokens.shape
    # Prompt bucket: a power-of-two number of blocks, zero-padded.
    n_blocks = _pow2_at_least(-(-p // big_l))
    padded = np.zeros((b, n_blocks * big_l), np.int32)
    padded[:, :p] = tokens
    if n_blocks == 1:  # nothing to read: no compiled prefill needed
        state = model.init_state(b)
        carry = DecodeCarry(state, jnp.asarray(padded), jnp.int32(p - 1))
    else:
        carry = _prefill(model, jnp.asarray(padded), jnp.int32(p))
    temperature, top_p, top_k = filters
    # Traced scalars: one compiled chunk for every setting.
    traced = (jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k))
    done = 0
    while done < total:
        count = min(total - done, chunk_len)
        size = min(_pow2_at_least(max(count, _MIN_STEP_BUCKET)), chunk_len)
        carry, out = _decode_chunk(
            model, carry, key, jnp.uint32(done), jnp.int32(count), *traced, size
        )
        chunk = np.asarray(out)[:, :count]
        done += count
        yield chunk[0] if one_d else chunk


@eqx.filter_jit
def _prefill(
    model: Transformer, padded: Int[Array, "batch padded"], length: Int[Array, ""]
) -> DecodeCarry:
    """The carry after the prompt `padded[:, :length]` (zeros after it):
    every complete block before the one holding the last prompt token goes
    through the model (one call per block, a loop of dynamic length over the
    padded bucket); that last block becomes the current block."""
    big_l = model.config.block_len
    b = padded.shape[0]
    n_full = (length - 1) // big_l

    def read_block(i, state):
        block = jax.lax.dynamic_slice_in_dim(padded, i * big_l, big_l, axis=1)
        _, state, _ = model(block, state)
        return state

    state = jax.lax.fori_loop(0, n_full, read_block, model.init_state(b))
    start = n_full * big_l
    # The padding is zeros, so the current block is zero after the prompt.
    block = jax.lax.dynamic_slice_in_dim(padded, start, big_l, axis=1)
    return DecodeCarry(state, block, (length - 1 - start).astype(jnp.int32))


@eqx.filter_jit
def _decode_chunk(
    model: Transformer,
    carry: DecodeCarry,
    key: PRNGKeyArray,
    offset: Array,
    count: Int[Array, ""],
    temperature: Float[Array, ""],
    top_p: Float[Array, ""],
    top_k: Int[Array, ""],
    size: int,
) -> tuple[DecodeCarry, Int[Array, "batch size"]]:
    """`count <= size` tokens (`decode_step` looped), token `offset + i`
    drawn with `fold_in(key, offset + i)`; written into a `[batch, size]`
    buffer (zeros after `count`). Compiled once per `size`."""
    b = carry.block.shape[0]

    def body(i, loop):
        carry, out = loop
        k = jax.random.fold_in(key, offset + i.astype(jnp.uint32))
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
