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
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .nn import Transformer, TransformerState


def sample_token(
    logprobs: Float[Array, "*batch vocab"],
    key: PRNGKeyArray,
    *,
    temperature: float | Float[Array, ""] = 1.0,
    top_p: float | Float[Array, ""] = 1.0,
) -> Int[Array, "*batch"]:
    """Draw one token per row from `softmax(logprobs / temperature)`
    restricted to its nucleus.

    - `temperature <= 0`: greedy (argmax, ties -> lowest id).
    - `top_p` in (0, 1]: nucleus sampling; keeps the smallest set of most
      likely tokens whose probability reaches `top_p` (always at least the
      most likely one), renormalised. `top_p = 1` keeps every token.
    """
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
    tok = sample_token(lp, key, temperature=temperature, top_p=top_p)
    full = carry.position == big_l - 1
    state = jax.tree.map(lambda n, o: jnp.where(full, n, o), new_state, carry.state)
    fresh = jnp.zeros_like(carry.block).at[:, 0].set(tok)
    written = jax.lax.dynamic_update_index_in_dim(
        carry.block, tok, carry.position + 1, axis=1
    )
    block = jnp.where(full, fresh, written)
    position = jnp.where(full, 0, carry.position + 1).astype(jnp.int32)
    return DecodeCarry(state, block, position), tok, lp


def _check_prompt(model: Transformer, prompt) -> Int[Array, "batch prompt"]:
    if not isinstance(model, Transformer):
        raise TypeError(
            f"model must be a tvq_eqx.Transformer; got {type(model).__name__}"
        )
    prompt = jnp.asarray(prompt)
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"prompt must be integer token ids; got dtype {prompt.dtype}")
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(
            f"prompt must be [batch, length] or [length] with length >= 1; got "
            f"shape {tuple(prompt.shape)}"
        )
    return prompt.astype(jnp.int32)


def sample(
    model: Transformer,
    prompt: Int[Array, "*batch prompt"] | Int[np.ndarray, "*batch prompt"],
    *,
    steps: int,
    key: PRNGKeyArray,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Int[Array, "*batch steps"]:
    """Generate `steps` tokens after `prompt` (see the module docstring for
    the scheme and its cost).

    **Arguments:**

    - `model`: a `Transformer` (dropout off during generation).
    - `prompt`: int `[batch, length]` or `[length]`, `length >= 1`, token ids
      in `[0, n_vocab)`; every row has the same length.
    - `steps`: number of new tokens (>= 0).
    - `key`: PRNG key.
    - `temperature`: softmax temperature; `<= 0` is greedy decoding.
    - `top_p`: nucleus mass in (0, 1] (1 = plain sampling).

    **Returns:** the `steps` generated tokens, int32 `[batch, steps]` (or
    `[steps]` for a 1-D prompt). Jit-compiled per (prompt shape, steps).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0; got {steps!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p!r}")
    one_d = jnp.ndim(prompt) == 1
    prompt = _check_prompt(model, prompt)
    if steps == 0:
        out = jnp.zeros((prompt.shape[0], 0), jnp.int32)
    else:
        out = _generate(
            model, prompt, key, jnp.float32(temperature), jnp.float32(top_p), steps
        )
    return out[0] if one_d else out


@eqx.filter_jit
def _generate(model, prompt, key, temperature, top_p, steps):
    c = model.config
    big_l = c.block_len
    b, p = prompt.shape
    prompt = eqx.error_if(
        prompt,
        (prompt < 0) | (prompt >= c.n_vocab),
        f"prompt token ids must be in [0, n_vocab={c.n_vocab})",
    )
    # Complete blocks before the block holding the last prompt token.
    n_full = (p - 1) // big_l
    state = model.init_state(b)
    if n_full > 0:
        _, state, _ = model(prompt[:, : n_full * big_l], state)
    tail = prompt[:, n_full * big_l :]
    buf = jnp.zeros((b, big_l), jnp.int32).at[:, : tail.shape[1]].set(tail)
    idx = jnp.int32(tail.shape[1] - 1)  # position of the last known token

    def body(carry, k):
        carry, tok, _ = decode_step(
            model, carry, k, temperature=temperature, top_p=top_p
        )
        return carry, tok

    carry = DecodeCarry(state=state, block=buf, position=idx)
    _, toks = jax.lax.scan(body, carry, jax.random.split(key, steps))
    return jnp.swapaxes(toks, 0, 1)
