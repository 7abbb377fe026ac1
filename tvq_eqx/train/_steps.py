"""Train and eval steps: update segments scanned with the carried attention
state, data-parallel over a device mesh."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Int, PRNGKeyArray, UInt32

from ..loss import (
    _codebook_objective,
    _loss_from_sums,
    _loss_mask,
    _loss_sums,
    _trainable_objective,
    loss_fn,
)
from ..nn import Transformer, TransformerState
from ._optimizer import CODEBOOK, param_labels

Batch = Mapping[str, Any]
_BATCH_KEYS = ("inputs", "targets", "loss_mask")
# With document masking on, also the streams' packed-document starts.
_DOC_KEY = "doc_starts"
# Metrics that add up over update segments (everything else is averaged).
_SUMMED = ("lm_loss_sum", "token_count", "skipped_updates")
DATA_AXIS = "data"
# The mesh axis that context parallelism splits each sequence over.
SEQ_AXIS = "seq"


class TrainState(eqx.Module):
    """Everything that changes during training (and goes into a checkpoint).

    - `model`: the `Transformer` (float32 parameters, EMA codebooks).
    - `opt_state`: the optimizer state for `eqx.filter(model, eqx.is_inexact_array)`.
    - `attn_state`: the attention state carried from one batch to the next
      (rows of a `TokenStream` batch continue the previous batch's rows).
    - `step`: optimizer updates done so far.
    - `rng`: raw key data (`jax.random.key_data`) of the dropout key stream.
    """

    model: Transformer
    opt_state: Any
    attn_state: TransformerState
    step: Int[Array, ""]
    rng: UInt32[Array, " _"]


def init_train_state(
    model: Transformer,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    *,
    key: PRNGKeyArray,
) -> TrainState:
    """A fresh `TrainState`: optimizer initialised on the model's float arrays,
    empty attention state for `batch_size` rows, step 0, dropout key `key`.

    The model's arrays are copied, so `model` stays valid after a donating
    step (`make_train_step`) consumes the train state."""
    dyn, static = eqx.partition(model, eqx.is_array)
    model = eqx.combine(jax.tree.map(jnp.copy, dyn), static)
    params = eqx.filter(model, eqx.is_inexact_array)
    return TrainState(
        model=model,
        opt_state=optimizer.init(params),
        attn_state=model.init_state(batch_size),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(key),
    )


def _batch_keys(doc_masking: bool) -> tuple[str, ...]:
    """The batch entries the steps use (everything else is dropped)."""
    return (*_BATCH_KEYS, _DOC_KEY) if doc_masking else _BATCH_KEYS


def _check_batch(
    batch: Batch,
    *,
    segment_len: int,
    block_len: int,
    what: str,
    doc_masking: bool = False,
) -> None:
    missing = [k for k in _BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"{what} batch is missing {missing}")
    if doc_masking and _DOC_KEY not in batch:
        raise ValueError(
            f"{what} batch is missing 'doc_starts' (bool [batch, seq], True "
            "where a packed document starts), which doc_masking=True needs; "
            "the tvq_eqx.data streams give it"
        )
    shape = tuple(batch["inputs"].shape)
    if len(shape) != 2:
        raise ValueError(f"{what} batch['inputs'] must be [batch, seq]; got {shape}")
    if doc_masking and tuple(batch[_DOC_KEY].shape) != shape:
        raise ValueError(
            f"{what} batch['doc_starts'] must have the shape of batch['inputs'] "
            f"{shape}; got {tuple(batch[_DOC_KEY].shape)}"
        )
    # A segment of any length: the model pads a partial last block (and says
    # so, when it is traced, for the options that need whole blocks).
    if shape[1] % segment_len != 0:
        raise ValueError(
            f"{what}: sequence length {shape[1]} must be a multiple of the "
            f"segment length {segment_len} (block_len {block_len})"
        )


def _segments(
    batch: Batch, segment_len: int, *, doc_masking: bool = False
) -> dict[str, Array]:
    """[B, T] -> [T / segment_len, B, segment_len] for the scan. With
    `doc_masking`, `doc_starts` is cut the same way: a segment's first tokens
    continue the carried state's document unless marked, so the slices of
    the batch's marks mean what the whole does."""

    def split(x):
        x = jnp.asarray(x)
        b, t = x.shape
        return jnp.swapaxes(x.reshape(b, t // segment_len, segment_len), 0, 1)

    return {k: split(batch[k]) for k in _batch_keys(doc_masking)}


def _select_state(reset: Bool[Array, ""], fresh, state):
    return jax.tree.map(lambda f, s: jnp.where(reset, f, s), fresh, state)


def _reduce_metrics(metrics: dict[str, Array]) -> dict[str, Array]:
    """Per-segment metrics [n] -> one value: sums for counts, means otherwise;
    `lm_loss`/`bits_per_token` recomputed from the sums."""
    out = {
        k: (jnp.sum(v, axis=0) if k in _SUMMED else jnp.mean(v, axis=0))
        for k, v in metrics.items()
    }
    out["lm_loss"] = out["lm_loss_sum"] / jnp.maximum(out["token_count"], 1.0)
    out["bits_per_token"] = out["lm_loss"] / math.log(2.0)
    return out


def train_step(
    train_state: TrainState,
    batch: Batch,
    *,
    optimizer: optax.GradientTransformation,
    update_len: int,
    reset: Bool[Array, ""] | bool = False,
    doc_masking: bool = False,
    skip_nonfinite: bool = False,
    grad_accum: int = 1,
) -> tuple[TrainState, dict[str, Array]]:
    """One batch of training: `seq / update_len` optimizer updates.

    The batch's `[B, seq]` arrays are split into update segments of
    `update_len` tokens; a `lax.scan` over segments computes `loss_fn` on each
    (dropout on: a fresh `key` per segment, and one `sequence_key` for the
    whole batch, so that LayerDrop and sinusoid-dropout masks stay fixed
    across its segments as the official "timeless" masks), applies one
    optimizer update, and
    carries the attention state (with no gradient through it) to the next
    segment, as the official `update_len` does. `reset` (scalar bool) starts
    from an empty attention state instead of `train_state.attn_state` (a new
    stream, e.g. a new epoch). `doc_masking` passes the batch's `doc_starts`
    (bool `[B, seq]`, required then) to `loss_fn`, so attention stays inside
    each packed document; off (default, official), the batch reaching
    `loss_fn` has no `doc_starts`. `skip_nonfinite`: an update whose loss or
    gradient norm is not finite is not applied (parameters, optimizer and
    attention state stay as before it) and counts in `skipped_updates`; its
    other metrics count as 0.

    `grad_accum` (gradient accumulation, default 1 = off): each update
    segment's rows are cut into `grad_accum` micro-batches (rows `i`,
    `i + grad_accum`, `i + 2 grad_accum`, ... form micro-batch `i`, each
    with its rows' carried attention state), scanned one after the other
    (only one micro-batch's activations exist at a time), and their
    gradients and codebook statistics summed before the one optimizer
    update: equal, to float rounding, to the update on the whole segment
    (`lm_loss_average` "positions" or "tokens" alike; the codebook's EMA step
    is taken once, on the whole segment's statistics). The batch size must
    be a multiple of `grad_accum`. With dropout, each micro-batch draws its
    own masks (the same distribution as the whole batch's, other draws).

    Pure and un-jitted; `make_train_step` gives the jitted, donating,
    optionally sharded version.

    **Returns:** the new `TrainState` and metrics (float32 scalars) over the
    whole batch: `lm_loss_sum`, `token_count` summed over segments,
    `lm_loss`/`bits_per_token` recomputed from them, the rest averaged, plus
    `grad_norm` (global norm of the non-codebook gradient, before clipping,
    averaged over segments).
    """
    model = train_state.model
    c = model.config
    _check_batch(
        batch,
        segment_len=update_len,
        block_len=c.block_len,
        what="train",
        doc_masking=doc_masking,
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    b = batch["inputs"].shape[0]
    check_grad_accum(grad_accum, b)
    attn = _select_state(
        jnp.asarray(reset), model.init_state(b), train_state.attn_state
    )

    # One key per sequence (this batch) for the LayerDrop and sinusoid-dropout
    # masks, shared by all its update segments (the official "timeless" rng);
    # a fresh key per segment for the other dropouts.
    rng, sequence_key = jax.random.split(jax.random.wrap_key_data(train_state.rng))

    def body(carry, segment):
        params, opt_state, attn, rng = carry
        rng, sub = jax.random.split(rng)

        def objective(p):
            return loss_fn(
                eqx.combine(p, static),
                segment,
                attn,
                key=sub,
                sequence_key=sequence_key,
            )

        if grad_accum == 1:
            (_, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
            metrics, new_attn = aux["metrics"], aux["state"]
        else:
            grads, metrics, new_attn = _accumulated_grads(
                params, static, segment, attn, sub, sequence_key, grad_accum
            )
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        main_grads = _without_codebook(grads)
        metrics = dict(metrics, grad_norm=optax.tree.norm(main_grads))
        new_attn = jax.tree.map(jax.lax.stop_gradient, new_attn)
        if skip_nonfinite:
            (new_params, new_opt_state, new_attn), metrics = _unless_nonfinite(
                (new_params, new_opt_state, new_attn),
                (params, opt_state, attn),
                metrics,
            )
        return (new_params, new_opt_state, new_attn, rng), metrics

    init = (params, train_state.opt_state, attn, rng)
    (params, opt_state, attn, rng), metrics = jax.lax.scan(
        body, init, _segments(batch, update_len, doc_masking=doc_masking)
    )
    n_update = batch["inputs"].shape[1] // update_len
    new_state = TrainState(
        # The partitioned model put back together (the checker sees optax Params).
        model=cast(Transformer, eqx.combine(params, static)),
        opt_state=opt_state,
        attn_state=attn,
        step=train_state.step + n_update,
        rng=jax.random.key_data(rng),
    )
    return new_state, _reduce_metrics(metrics)


def check_grad_accum(
    grad_accum: int, batch_size: int, mesh: Mesh | None = None
) -> None:
    """`grad_accum` is a positive int dividing the batch (with `mesh`: each
    device's part of it, so that every micro-batch is split over all the
    devices of the data axis); a `ValueError` naming `grad_accum`
    (`--grad-accum`) and the batch otherwise."""
    _check_grad_accum_value(grad_accum)
    n_dev = 1 if mesh is None else mesh.shape.get(DATA_AXIS, 1)
    if batch_size % (n_dev * grad_accum) == 0:
        return
    if n_dev == 1:
        raise ValueError(
            f"grad_accum={grad_accum} (--grad-accum) must divide the batch size "
            f"{batch_size} (each micro-batch takes batch_size / grad_accum rows)"
        )
    raise ValueError(
        f"grad_accum={grad_accum} (--grad-accum) must divide each device's part "
        f"of the batch: batch size {batch_size} over the {n_dev} devices of the "
        f"mesh's data axis is {batch_size / n_dev:g} rows per device (the batch "
        f"size must be a multiple of {n_dev} x {grad_accum} = {n_dev * grad_accum})"
    )


def _check_grad_accum_value(grad_accum: int) -> None:
    if (
        isinstance(grad_accum, bool)
        or not isinstance(grad_accum, int)
        or grad_accum < 1
    ):
        raise ValueError(
            f"grad_accum (--grad-accum) must be a positive int; got {grad_accum!r}"
        )


def _micro_rows(x: Array, n: int, axis: int) -> Array:
    """`x` with its batch axis `axis` (size B) cut into `n` micro-batches, as
    a new leading axis: `[..., B, ...] -> [n, ..., B / n, ...]`, micro-batch
    `i` holding rows `i, i + n, i + 2n, ...`. Strided, not contiguous: a batch
    split over devices in contiguous blocks (data parallelism) gives every
    micro-batch an equal part on every device."""
    shape = x.shape
    b = shape[axis]
    x = x.reshape(*shape[:axis], b // n, n, *shape[axis + 1 :])
    return jnp.moveaxis(x, axis + 1, 0)


def _whole_rows(x: Array, axis: int) -> Array:
    """The inverse of `_micro_rows`: `[n, ..., B / n, ...] -> [..., B, ...]`."""
    n = x.shape[0]
    x = jnp.moveaxis(x, 0, axis + 1)
    shape = x.shape
    return x.reshape(*shape[:axis], shape[axis] * n, *shape[axis + 2 :])


def _accumulated_grads(params, static, segment, attn, key, sequence_key, n: int):
    """The gradient, metrics and new attention state of one update segment,
    computed over `n` micro-batches of its rows (`train_step`'s
    `grad_accum`) and equal to those of the whole segment.

    Every term of the loss is a sum over rows divided by a denominator of
    the whole segment (its positions `B * T`, or its tokens, known from the
    mask before the forward pass), so the micro-batches' gradients of their
    share add up to the whole segment's. The codebook's gradient (the EMA
    step) depends on the segment's statistics, which add up over rows, so it
    is taken once from their sum; the reported metrics come from the summed
    sums as `loss_fn`'s do."""
    b, t = segment["inputs"].shape
    n_positions = float(b * t)
    n_tokens = jnp.sum(_loss_mask(segment))
    micro = {k: _micro_rows(v, n, 0) for k, v in segment.items()}
    # The stacked unit states are [n_layer, batch, ...]; the position (a
    # scalar) is the same for every row.
    micro_states = jax.tree.map(lambda x: _micro_rows(x, n, 1), attn.stacked)

    def body(acc, xs):
        i, rows, stacked = xs
        state = TransformerState(stacked=stacked, position=attn.position)

        def objective(p):
            sums, new_state = _loss_sums(
                eqx.combine(p, static),
                rows,
                state,
                # Own dropout masks per micro-batch (fixed across the update
                # segments for its rows, as the whole batch's).
                key=jax.random.fold_in(key, i),
                sequence_key=jax.random.fold_in(sequence_key, i),
            )
            part = _trainable_objective(
                eqx.combine(p, static),
                sums,
                n_positions=n_positions,
                n_tokens=n_tokens,
            )
            return part, (sums, new_state)

        (_, (sums, new_state)), g = jax.value_and_grad(objective, has_aux=True)(params)
        acc = jax.tree.map(lambda a, x: a + x.astype(a.dtype), acc, g)
        return acc, (sums, new_state.stacked)

    # float32 sums whatever the parameter dtype.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    acc, (sums, new_stacked) = jax.lax.scan(
        body, zeros, (jnp.arange(n), micro, micro_states)
    )
    sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)
    model = eqx.combine(params, static)
    codebook_grads = jax.grad(
        lambda p: _codebook_objective(eqx.combine(p, static), sums["vq"])
    )(params)
    grads = jax.tree.map(
        lambda a, c, p: (a + c).astype(p.dtype), acc, codebook_grads, params
    )
    _, metrics = _loss_from_sums(model, sums, n_positions)
    new_attn = TransformerState(
        stacked=jax.tree.map(lambda x: _whole_rows(x, 1), new_stacked),
        position=attn.position + t,
    )
    return grads, metrics, new_attn


def _unless_nonfinite(new, old, metrics: dict[str, Array]):
    """`new` where the update's loss and gradient norm are finite, else `old`
    (the update is skipped); the metrics of a skipped update count as 0 and
    `skipped_updates` counts it."""
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    metrics = {k: jnp.where(ok, v, 0.0) for k, v in metrics.items()}
    metrics["skipped_updates"] = 1.0 - ok.astype(jnp.float32)
    return kept, metrics


def _without_codebook(grads):
    labels = param_labels(grads)
    return jax.tree.map(lambda g, lab: None if lab == CODEBOOK else g, grads, labels)


def eval_step(
    model: Transformer,
    attn_state: TransformerState,
    batch: Batch,
    *,
    segment_len: int,
    reset: Bool[Array, ""] | bool = False,
    doc_masking: bool = False,
) -> tuple[TransformerState, dict[str, Array]]:
    """Summed LM loss over a batch, scanning segments with the carried state.

    No dropout, no parameter change. `segment_len` (dividing `seq`; any
    length, see `Transformer`) bounds memory: only `[B, segment_len, n_vocab]`
    log-probabilities exist at a time. `reset` starts from an empty state.
    `doc_masking` passes the batch's `doc_starts` to `loss_fn`, as in
    `train_step`.

    **Returns:** the new attention state and `{"lm_loss_sum": nats,
    "token_count": masked-in targets}` (float32 sums).
    """
    c = model.config
    _check_batch(
        batch,
        segment_len=segment_len,
        block_len=c.block_len,
        what="eval",
        doc_masking=doc_masking,
    )
    b = batch["inputs"].shape[0]
    attn = _select_state(jnp.asarray(reset), model.init_state(b), attn_state)

    def body(attn, segment):
        _, aux = loss_fn(model, segment, attn, key=None)
        m = aux["metrics"]
        out = dict(lm_loss_sum=m["lm_loss_sum"], token_count=m["token_count"])
        return aux["state"], out

    attn, sums = jax.lax.scan(
        body, attn, _segments(batch, segment_len, doc_masking=doc_masking)
    )
    return attn, jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)


# ----------------------------------------------------------------------------
# Devices


# jax.Device aliases a class of the compiled jaxlib, which has no stubs.
def make_mesh(
    devices: Iterable[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
    *,
    data: int | None = None,
    seq: int = 1,
) -> Mesh:
    """A mesh over `devices` (default: all, across hosts): 1-D data-parallel
    (axis `"data"`), or with `seq > 1` a `("data", "seq")` mesh whose `"seq"`
    axis of that size splits each sequence (context parallelism: the model's
    config needs `seq_axis="seq"`, `batch_axis="data"`; `train.for_mesh`).
    `data` (default: the devices left once `seq` is taken) times `seq` must
    be the number of devices."""
    devs = np.asarray(list(jax.devices() if devices is None else devices))
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1 or devs.size % seq:
        raise ValueError(
            f"seq={seq!r} must be a positive int dividing the {devs.size} devices"
        )
    data = devs.size // seq if data is None else data
    if isinstance(data, bool) or not isinstance(data, int) or data * seq != devs.size:
        raise ValueError(
            f"data x seq = {data!r} x {seq} must equal the {devs.size} devices"
        )
    if seq == 1:
        return Mesh(devs, (DATA_AXIS,))
    return Mesh(devs.reshape(data, seq), (DATA_AXIS, SEQ_AXIS))


def has_seq_axis(mesh: Mesh | None) -> bool:
    """Whether `mesh` splits sequences (a `"seq"` axis of size > 1)."""
    return mesh is not None and mesh.shape.get(SEQ_AXIS, 1) > 1


def _mesh_context(mesh: Mesh | None):
    """`jax.set_mesh(mesh)` when the model's attention needs the mesh (a
    `"seq"` axis), else nothing."""
    return jax.set_mesh(mesh) if has_seq_axis(mesh) else contextlib.nullcontext()


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def _attn_shardings(attn_state: TransformerState, mesh: Mesh):
    # The unit states are stacked `[n_layer, batch, ...]`: split axis 1; the
    # position (a scalar) is replicated.
    layers_batch = NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))
    return jax.tree.map(
        lambda x: layers_batch if jnp.ndim(x) >= 1 else _replicated(mesh),
        attn_state,
    )


def check_batch_splits(batch_size: int, mesh: Mesh) -> None:
    """The batch splits evenly over the mesh's data axis (a `ValueError`
    otherwise)."""
    n = mesh.shape.get(DATA_AXIS, 1)
    if batch_size % n != 0:
        raise ValueError(
            f"batch size {batch_size} must be a multiple of the number of devices "
            f"{n} on the mesh's data axis (the batch is split across them)"
        )


def shard_batch(
    batch: Batch, mesh: Mesh, *, doc_masking: bool = False
) -> dict[str, Array]:
    """Put a host batch (numpy, identical on every host) on the mesh, split
    along the batch axis: `inputs`, `targets`, `loss_mask`, and with
    `doc_masking` `doc_starts` (other entries are dropped). Works across
    hosts: each host supplies only its addressable shards."""
    missing = [k for k in _batch_keys(doc_masking) if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing} (doc_masking={doc_masking})")
    out = {}
    for k in _batch_keys(doc_masking):
        x = np.asarray(batch[k])
        check_batch_splits(x.shape[0], mesh)
        out[k] = jax.make_array_from_callback(
            x.shape, _batch_sharded(mesh), lambda idx, x=x: x[idx]
        )
    return out


def shard_train_state(train_state: TrainState, mesh: Mesh) -> TrainState:
    """Replicate model, optimizer state, step and rng; split the attention
    state along its batch axis."""
    check_batch_splits(train_state.attn_state.batch_size, mesh)
    rep = _replicated(mesh)
    dyn, static = eqx.partition(train_state, eqx.is_array)
    dyn = jax.tree.map(lambda x: jax.device_put(x, rep), dyn)
    ts = eqx.combine(dyn, static)
    attn = jax.device_put(ts.attn_state, _attn_shardings(ts.attn_state, mesh))
    return eqx.tree_at(lambda t: t.attn_state, ts, attn)


def _constrain(ts: TrainState, mesh: Mesh | None) -> TrainState:
    if mesh is None:
        return ts
    rep = _replicated(mesh)
    dyn, static = eqx.partition(ts, eqx.is_array)
    dyn = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rep), dyn)
    ts = eqx.combine(dyn, static)
    attn = jax.lax.with_sharding_constraint(
        ts.attn_state, _attn_shardings(ts.attn_state, mesh)
    )
    return eqx.tree_at(lambda t: t.attn_state, ts, attn)


def _train_inner(
    batch,
    train_state,
    optimizer,
    update_len,
    mesh,
    doc_masking,
    skip_nonfinite,
    grad_accum,
):
    reset = batch["reset"]
    batch = {k: v for k, v in batch.items() if k != "reset"}
    new, metrics = train_step(
        train_state,
        batch,
        optimizer=optimizer,
        update_len=update_len,
        reset=reset,
        doc_masking=doc_masking,
        skip_nonfinite=skip_nonfinite,
        grad_accum=grad_accum,
    )
    return _constrain(new, mesh), metrics


# Module level, so that compiled programs are reused by every step function
# with the same (hashable) optimizer, update_len and mesh.
_train_donating = eqx.filter_jit(_train_inner, donate="all-except-first")
_train_keeping = eqx.filter_jit(_train_inner)


def _place(batch: Batch, mesh: Mesh | None, doc_masking: bool) -> dict[str, Array]:
    """The batch entries the steps use, on the device(s); a missing one is
    named by `_check_batch` in the step."""
    keys = [k for k in _batch_keys(doc_masking) if k in batch]
    if mesh is not None and len(keys) == len(_batch_keys(doc_masking)):
        return shard_batch(batch, mesh, doc_masking=doc_masking)
    return {k: jnp.asarray(batch[k]) for k in keys}


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    update_len: int,
    mesh: Mesh | None = None,
    donate: bool = True,
    doc_masking: bool = False,
    skip_nonfinite: bool = False,
    grad_accum: int = 1,
) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """`train_step` compiled with `eqx.filter_jit`.

    Returns `step(train_state, batch, *, reset=False) -> (train_state,
    metrics)`. With `donate`, the input `train_state`'s buffers are donated
    (reused for the output; do not use the old one afterwards). With `mesh`,
    the batch is split over the mesh's devices and the train state replicated
    (attention state split by batch): XLA inserts the cross-device sums, so
    gradients and the codebook statistics are global and every device holds
    the same parameters and codebook. Pass host (numpy) batches; they are
    placed with `shard_batch`. `doc_masking`: the batch's `doc_starts` reach
    `loss_fn` (see `train_step`); off, they are dropped. `skip_nonfinite`,
    `grad_accum`: as in `train_step` (with `mesh`, `grad_accum` must divide
    each device's part of the batch).
    """
    _check_grad_accum_value(grad_accum)
    jitted = _train_donating if donate else _train_keeping

    def step(train_state: TrainState, batch: Batch, *, reset: bool = False):
        if doc_masking:
            train_state.model.config.check_masks_documents("doc_masking")
        placed = _place(batch, mesh, doc_masking)
        if "inputs" in placed:  # a missing one is named in the step
            check_grad_accum(grad_accum, placed["inputs"].shape[0], mesh)
        placed["reset"] = jnp.asarray(reset, dtype=bool)
        with _mesh_context(mesh):
            return jitted(
                placed,
                train_state,
                optimizer,
                update_len,
                mesh,
                doc_masking,
                skip_nonfinite,
                grad_accum,
            )

    return step


@eqx.filter_jit
def _eval_jitted(model, attn_state, batch, reset, segment_len, mesh, doc_masking):
    new, sums = eval_step(
        model,
        attn_state,
        batch,
        segment_len=segment_len,
        reset=reset,
        doc_masking=doc_masking,
    )
    if mesh is not None:
        new = jax.lax.with_sharding_constraint(new, _attn_shardings(new, mesh))
    return new, sums


def make_eval_step(
    *, segment_len: int, mesh: Mesh | None = None, doc_masking: bool = False
) -> Callable[..., tuple[TransformerState, dict[str, Array]]]:
    """`eval_step` compiled with `eqx.filter_jit`; with `mesh`, the batch and
    attention state are split over devices (sums are global); `doc_masking`
    as in `eval_step`.

    Returns `step(model, attn_state, batch, *, reset=False)`.
    """

    def step(model, attn_state, batch, *, reset: bool = False):
        if doc_masking:
            model.config.check_masks_documents("doc_masking")
        placed = _place(batch, mesh, doc_masking)
        with _mesh_context(mesh):
            return _eval_jitted(
                model,
                attn_state,
                placed,
                jnp.asarray(reset, dtype=bool),
                segment_len,
                mesh,
                doc_masking,
            )

    return step


def evaluate(
    model: Transformer,
    batches: Iterable[Batch],
    *,
    segment_len: int | None = None,
    mesh: Mesh | None = None,
    resets: Iterable[bool] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    doc_masking: bool = False,
) -> dict[str, float]:
    """Log-likelihood of a whole stream of batches with the carried state.

    `batches` are consecutive windows of the same rows (a `TokenStream` with
    `repeat=False`): the attention state flows from each batch into the next,
    so every token sees its whole history, however long the stream. The state
    starts empty; `resets` (one bool per batch) may restart it.
    `doc_masking`: attention stays inside the packed documents the batches'
    `doc_starts` mark (see `train_step`).

    **Returns:** `{"lm_loss_sum", "token_count", "nats_per_token",
    "bits_per_token", "perplexity", "batches"}` (Python floats). For byte-level
    data `bits_per_token` is bits per byte: `lm_loss_sum / (tokens ln 2)`.
    """
    segment_len = model.config.block_len if segment_len is None else segment_len
    step = make_eval_step(segment_len=segment_len, mesh=mesh, doc_masking=doc_masking)
    total, count, n = 0.0, 0.0, 0
    attn = None
    resets_it = iter(resets) if resets is not None else None
    it = batches if progress is None else progress(batches)
    for batch in it:
        b = np.asarray(batch["inputs"]).shape[0]
        if attn is None:
            attn = model.init_state(b)
            if mesh is not None:
                check_batch_splits(b, mesh)
                attn = jax.device_put(attn, _attn_shardings(attn, mesh))
        reset = bool(next(resets_it)) if resets_it is not None else False
        attn, sums = step(model, attn, batch, reset=reset)
        # float64 accumulation on the host: long streams stay exact.
        total += float(sums["lm_loss_sum"])
        count += float(sums["token_count"])
        n += 1
    if n == 0:
        raise ValueError("evaluate: no batches (empty evaluation data)")
    nats = total / max(count, 1.0)
    return dict(
        lm_loss_sum=total,
        token_count=count,
        nats_per_token=nats,
        bits_per_token=nats / math.log(2.0),
        perplexity=math.exp(min(nats, 700.0)),
        batches=float(n),
    )
