"""Codebook initialisation and health, as training procedures (both off by
default; the official code has neither): k-means initialisation of every
codebook from the first batch's keys, and the restart of dead codes from the
current batch's keys.

Both act on the EMA state itself (`codebook_sum`, `codebook_count`; the
codebook is their ratio), so they are plain parameter values: checkpoints
carry them and the EMA rule continues from them unchanged (docs/math.md,
"Codebook initialisation and restart"). They run between optimizer updates,
outside the compiled train step, from a forward pass of the batch's first
update segment without dropout (`prepare_codebooks` is the hook `fit` calls
before each batch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._config import check_literals
from ..nn import Transformer, TransformerState, VectorQuantizer
from ..ops._common import HIGHEST, quantize

CodebookInit = Literal["official", "kmeans"]
CODEBOOK_INITS: tuple[str, ...] = get_args(CodebookInit)

# Salts of the keys drawn from the train state's rng (which the dropout stream
# does not consume: they are folded in, never split off).
_KMEANS_SALT = 0xC0DE1
_RESTART_SALT = 0xC0DE2


@dataclasses.dataclass(frozen=True)
class CodebookConfig:
    """Codebook initialisation and dead-code restart (training procedures;
    the defaults are the official behaviour: neither)."""

    init: CodebookInit = "official"
    """official (the model's own init: random sums, counts 1) or kmeans (before the first update, each codebook becomes the k-means centroids of the keys its quantizer sees on the first batch's first update segment)."""
    kmeans_iters: int = 10
    """Lloyd iterations per codebook of the k-means init."""
    restart_threshold: float = 0.0
    """Codes whose EMA count is below this fraction of their head's mean EMA count are re-seeded from keys of the current batch (0 = off; e.g. 0.1: less than a tenth of a fair share)."""
    restart_every: int = 10
    """Check for dead codes before every this many training batches (not before the first)."""

    def __post_init__(self):
        check_literals(self)
        for name in ("kmeans_iters", "restart_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(
                    f"CodebookConfig.{name} must be an int >= 1; got {v!r}"
                )
        t = self.restart_threshold
        if (
            isinstance(t, bool)
            or not isinstance(t, (int, float))
            or not math.isfinite(t)
            or not 0 <= t < 1
        ):
            raise ValueError(
                "CodebookConfig.restart_threshold must be a finite number in "
                f"[0, 1) (0 = off); got {t!r}"
            )

    @property
    def active(self) -> bool:
        """Whether either procedure is on."""
        return self.init == "kmeans" or self.restart_threshold > 0


# ---------------------------------------------------------------------------
# The keys each quantizer sees


class _KeyRecorder(VectorQuantizer):
    """A `VectorQuantizer` whose statistics also return the keys (unscaled key
    space, float32) and their weights, so one forward pass gives every unit's
    keys without any change to the model."""

    def statistics(self, key, mask):
        stats = super().statistics(key, mask)
        stats["keys"] = jax.lax.stop_gradient(key.astype(jnp.float32))
        stats["key_weights"] = mask.astype(jnp.float32)
        return stats


def _as_recorder(q: VectorQuantizer) -> _KeyRecorder:
    r = object.__new__(_KeyRecorder)
    for f in dataclasses.fields(q):
        object.__setattr__(r, f.name, getattr(q, f.name))
    return r


def _is_quantizer(x) -> bool:
    return isinstance(x, VectorQuantizer)


@eqx.filter_jit
def unit_keys(
    model: Transformer,
    inputs: Int[Array, "batch seq"],
    weights: Float[Array, "batch seq"],
    state: TransformerState | None = None,
    doc_starts: Array | None = None,
) -> tuple[Float[Array, "units tokens heads d_k"], Float[Array, " tokens"]]:
    """The keys every attention unit's quantizer sees on `inputs` (no
    dropout), flattened over batch and sequence, and their weights (the loss
    mask, which weighs the codebook's EMA statistics).

    **Returns:** `(keys [2 * n_layer, batch * seq, heads, d_k], weights
    [batch * seq])`, units in call order (`model.attention_units()`).
    """
    recording = jax.tree.map(
        lambda x: _as_recorder(x) if _is_quantizer(x) else x,
        model,
        is_leaf=_is_quantizer,
    )
    _, _, aux = recording(inputs, state, mask=weights, doc_starts=doc_starts)
    keys = aux["vq"]["keys"]  # [units, B, T, H, K]
    u, b, t, h, k = keys.shape
    w = jnp.asarray(weights, jnp.float32).reshape(b * t)
    return keys.reshape(u, b * t, h, k), w


# ---------------------------------------------------------------------------
# k-means


def sample_tokens(
    key: PRNGKeyArray, weights: Float[Array, " tokens"], n_head: int, k: int
) -> tuple[Int[Array, "heads k"], Array]:
    """`k` distinct tokens per head, uniformly among those of weight > 0
    (independently per head): `(index [heads, k], valid [heads, k])`; `valid`
    is False where fewer than `k` tokens have weight > 0."""
    n = weights.shape[0]
    m = min(k, n)
    g = jax.random.gumbel(key, (n_head, n))
    scores = jnp.where(weights[None, :] > 0, g, -jnp.inf)
    vals, idx = jax.lax.top_k(scores, m)
    valid = jnp.isfinite(vals)
    if m < k:
        idx = jnp.pad(idx, ((0, 0), (0, k - m)))
        valid = jnp.pad(valid, ((0, 0), (0, k - m)))
    return idx, valid


def _gather_keys(keys, idx):
    """keys [N, H, K], idx [H, k] -> keys[idx[h, s], h] as [H, k, K]."""
    heads = jnp.arange(keys.shape[1])[:, None]
    return keys[idx, heads]


def lloyd(
    keys: Float[Array, "tokens heads d_k"],
    weights: Float[Array, " tokens"],
    init: Float[Array, "heads codes d_k"],
    iters: int,
) -> tuple[Float[Array, "heads codes d_k"], Float[Array, "heads codes"]]:
    """`iters` weighted Lloyd iterations per head from the centroids `init`:
    assign every key to its nearest centroid (the quantizer's own rule,
    `ops.quantize`: squared Euclidean, ties to the lowest index), then move
    each centroid to the weighted mean of its keys; a centroid with no
    weight stays where it is (no division by zero).

    **Returns:** the centroids and the weighted count of the keys of the last
    assignment (the centroids are their means)."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1; got {iters!r}")
    n_code = init.shape[1]
    keys = keys.astype(jnp.float32)
    w = weights.astype(jnp.float32)

    def step(c, _):
        codes = quantize(keys, c)  # [N, H]
        onehot = jax.nn.one_hot(codes, n_code, dtype=jnp.float32) * w[:, None, None]
        count = jnp.sum(onehot, axis=0)  # [H, S]
        total = jnp.einsum("nhs,nhk->hsk", onehot, keys, precision=HIGHEST)
        mean = total / jnp.where(count > 0, count, 1.0)[..., None]
        return jnp.where(count[..., None] > 0, mean, c), count

    centroids, counts = jax.lax.scan(step, init.astype(jnp.float32), None, iters)
    return centroids, counts[-1]


@eqx.filter_jit
def _kmeans_unit(q_sum, q_count, keys, weights, key, iters: int):
    """One unit's new `(codebook_sum, codebook_count)` (per head)."""
    n_head, n_code, _ = q_sum.shape
    # The codebook as `VectorQuantizer.codebook` reads it.
    current = q_sum / jnp.maximum(q_count, 1e-2)[..., None]
    idx, valid = sample_tokens(key, weights, n_head, n_code)
    init = jnp.where(valid[..., None], _gather_keys(keys, idx), current)
    centroids, count = lloyd(keys, weights, init, iters)
    # The EMA's fixed point for this batch: count = the code's weighted tokens
    # per update, sum = count x centroid; at least the official initial count
    # 1, so that a code without tokens keeps its centroid (sum / count).
    count = jnp.maximum(count, 1.0)
    return count[..., None] * centroids, count


def _unit_index(u: int) -> tuple[int, int]:
    """(stacked unit j, layer l) of attention unit `u` in call order."""
    return u % 2, u // 2


def _set_unit(model: Transformer, u: int, new_sum, new_count) -> Transformer:
    j, layer = _unit_index(u)
    q = model.layers.stacked.units[j].quantizer
    return eqx.tree_at(
        lambda m: (
            m.layers.stacked.units[j].quantizer.codebook_sum,
            m.layers.stacked.units[j].quantizer.codebook_count,
        ),
        model,
        (
            q.codebook_sum.at[layer].set(new_sum),
            q.codebook_count.at[layer].set(new_count),
        ),
    )


def _unit_quantizer(model: Transformer, u: int) -> tuple[Array, Array]:
    j, layer = _unit_index(u)
    q = model.layers.stacked.units[j].quantizer
    return q.codebook_sum[layer], q.codebook_count[layer]


def kmeans_init(
    model: Transformer,
    inputs: Int[Array, "batch seq"],
    *,
    key: PRNGKeyArray,
    iters: int = 10,
    weights: Float[Array, "batch seq"] | None = None,
    state: TransformerState | None = None,
    doc_starts: Array | None = None,
) -> Transformer:
    """`model` with every codebook set to the k-means centroids of the keys
    its quantizer sees on `inputs` (weighted by `weights`, the loss mask;
    default all ones), unit by unit in call order: unit `u` is fitted on the
    keys of the model whose units before `u` are already initialised (a
    unit's keys depend only on the units before it), so afterwards every
    codebook is the k-means of exactly the keys the model gives it.

    Per head: `iters` Lloyd iterations (`lloyd`) from distinct keys drawn
    uniformly among the tokens of weight > 0 (`key`, per unit); with fewer
    such tokens than codes, the remaining codes start from their current
    codeword. The EMA state becomes `codebook_count = max(n, 1)`, `codebook_sum
    = codebook_count * centroid`, with `n` the centroid's weighted tokens
    (the EMA's fixed point for this batch: the next EMA step on the same
    assignment changes nothing). `ema_tally` is unchanged.
    """
    n_units = 2 * model.config.n_layer
    for u in range(n_units):
        keys, w = unit_keys(model, inputs, _weights(inputs, weights), state, doc_starts)
        q_sum, q_count = _unit_quantizer(model, u)
        new_sum, new_count = _kmeans_unit(
            q_sum, q_count, keys[u], w, jax.random.fold_in(key, u), iters
        )
        model = _set_unit(model, u, new_sum, new_count)
    return model


def _weights(inputs, weights):
    if weights is None:
        return jnp.ones(jnp.shape(inputs), jnp.float32)
    if tuple(jnp.shape(weights)) != tuple(jnp.shape(inputs)):
        raise ValueError(
            f"weights must have the shape of inputs {tuple(jnp.shape(inputs))}; "
            f"got {tuple(jnp.shape(weights))}"
        )
    return jnp.asarray(weights, jnp.float32)


# ---------------------------------------------------------------------------
# Dead-code restart


@jax.jit
def _restart_unit(q_sum, q_count, keys, weights, key, threshold):
    """One unit's `(codebook_sum, codebook_count, restarted [H, S])`."""
    n_head, n_code, _ = q_sum.shape
    # The head's mean count before the restart (a fair share of its tokens).
    fair = jnp.mean(q_count, axis=-1, keepdims=True)  # [H, 1]
    dead = q_count < threshold * fair
    idx, valid = sample_tokens(key, weights, n_head, n_code)
    redo = dead & valid
    fair = jnp.broadcast_to(fair, q_count.shape)
    new_sum = jnp.where(
        redo[..., None], fair[..., None] * _gather_keys(keys, idx), q_sum
    )
    new_count = jnp.where(redo, fair, q_count)
    return new_sum, new_count, redo


def restart_dead_codes(
    model: Transformer,
    inputs: Int[Array, "batch seq"],
    *,
    key: PRNGKeyArray,
    threshold: float,
    weights: Float[Array, "batch seq"] | None = None,
    state: TransformerState | None = None,
    doc_starts: Array | None = None,
) -> tuple[Transformer, Int[Array, ""]]:
    """`model` with every dead code re-seeded from a key its quantizer sees
    on `inputs` (weights: the loss mask, default all ones), and the number of
    codes re-seeded. A code is dead when its EMA count is below `threshold`
    times the mean EMA count of its head (`m`, the head's fair share).

    Per unit and head, the dead codes get distinct keys drawn uniformly
    among the tokens of weight > 0 (`key`, per unit; one forward pass gives
    all units' keys); a re-seeded code gets `codebook_count = m` and
    `codebook_sum = m * key`, so its codeword is that key with the weight of
    an average code, and the EMA continues from there. With fewer such
    tokens than dead codes, the rest stay as they are. Every other code is
    left bit-identical.
    """
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not 0 <= threshold < 1
    ):
        raise ValueError(f"threshold must be a number in [0, 1); got {threshold!r}")
    keys, w = unit_keys(model, inputs, _weights(inputs, weights), state, doc_starts)
    total = jnp.zeros((), jnp.int32)
    for u in range(keys.shape[0]):
        q_sum, q_count = _unit_quantizer(model, u)
        new_sum, new_count, redo = _restart_unit(
            q_sum, q_count, keys[u], w, jax.random.fold_in(key, u), float(threshold)
        )
        model = _set_unit(model, u, new_sum, new_count)
        total = total + jnp.sum(redo, dtype=jnp.int32)
    return model, total


# ---------------------------------------------------------------------------
# The training loop's hook


def prepare_codebooks(
    train_state: Any,
    batch: Mapping[str, Any],
    config: CodebookConfig,
    *,
    update_len: int,
    reset: bool,
    doc_masking: bool = False,
) -> tuple[Any, dict[str, Array]]:
    """What `fit` does before each training batch (and a loop of your own
    can do the same before `train_step`): with `config.init == "kmeans"` and
    `train_state.step == 0`, `kmeans_init`; with `config.restart_threshold >
    0`, before every `config.restart_every`-th batch after the first,
    `restart_dead_codes`.

    Both use the keys of the batch's first update segment (`update_len`
    tokens) with the attention state the train step starts from (empty when
    `reset`), no dropout, the loss mask as weights, and a key folded from
    `train_state.rng` (so a resumed run draws what the uninterrupted run
    draws, and the dropout stream is unchanged). The gate is the step
    counter, saved in every checkpoint: a resumed run (step > 0) never
    initialises again.

    **Returns:** the train state and, with the restart on,
    `{"restarted_codes": n}` (codes re-seeded before this batch; 0 between
    checks), else `{}`.
    """
    if not config.active:
        return train_state, {}
    step = int(train_state.step)
    seq = np.shape(batch["inputs"])[1]
    batch_index = step // max(seq // update_len, 1)
    do_init = config.init == "kmeans" and step == 0
    do_restart = (
        config.restart_threshold > 0
        and batch_index > 0
        and batch_index % config.restart_every == 0
    )
    # With the restart on, every batch reports it (0 between checks), so
    # that every training record has the same fields.
    metrics: dict[str, Array] = (
        {"restarted_codes": jnp.zeros((), jnp.float32)}
        if config.restart_threshold > 0
        else {}
    )
    if not (do_init or do_restart):
        return train_state, metrics
    model = train_state.model
    # A model replicated over a mesh gets its inputs replicated likewise;
    # otherwise they stay uncommitted, as the model's arrays, so that the
    # train step meets the arrays it was compiled for (no recompile).
    where = model.layers.stacked.units[0].quantizer.codebook_sum.sharding

    def first_segment(name, dtype=None):
        x = np.asarray(batch[name])[:, :update_len]
        x = x if dtype is None else x.astype(dtype)
        if isinstance(where, jax.sharding.NamedSharding):
            return jax.device_put(x, where)
        return jnp.asarray(x)

    inputs = first_segment("inputs")
    weights = first_segment("loss_mask", np.float32) if "loss_mask" in batch else None
    doc_starts = first_segment("doc_starts") if doc_masking else None
    state = None if reset else train_state.attn_state
    rng = jax.random.wrap_key_data(train_state.rng)
    if do_init:
        model = kmeans_init(
            model,
            inputs,
            key=jax.random.fold_in(rng, _KMEANS_SALT),
            iters=config.kmeans_iters,
            weights=weights,
            state=state,
            doc_starts=doc_starts,
        )
    if do_restart:
        model, n = restart_dead_codes(
            model,
            inputs,
            key=jax.random.fold_in(rng, _RESTART_SALT),
            threshold=config.restart_threshold,
            weights=weights,
            state=state,
            doc_starts=doc_starts,
        )
        metrics["restarted_codes"] = n.astype(jnp.float32)
    return eqx.tree_at(lambda t: t.model, train_state, model), metrics
