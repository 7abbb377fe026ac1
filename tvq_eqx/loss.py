"""The pure training objective."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import check_token_ids, check_weights, out_of_range
from .nn import Transformer, TransformerState


def _check_batch(batch, model) -> None:
    if not isinstance(batch, dict):
        raise TypeError(
            f"batch must be a dict with inputs/targets/loss_mask; got {type(batch).__name__}"
        )
    missing = [k for k in ("inputs", "targets") if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; it has {sorted(batch)}")
    for name in ("inputs", "targets", "loss_mask"):
        if name not in batch:  # only loss_mask may be missing: all ones
            continue
        if not hasattr(batch[name], "shape") or not hasattr(batch[name], "dtype"):
            raise TypeError(
                f"batch[{name!r}] must be an array; got {type(batch[name]).__name__}"
            )
    shape = tuple(batch["inputs"].shape)
    for name in ("targets", "loss_mask"):
        if name in batch and tuple(batch[name].shape) != shape:
            raise ValueError(
                f"batch[{name!r}] has shape {tuple(batch[name].shape)}; batch['inputs'] has {shape}"
            )
    if not jnp.issubdtype(batch["targets"].dtype, jnp.integer):
        raise TypeError(
            f"batch['targets'] must be integer; got {batch['targets'].dtype}"
        )
    if "loss_mask" not in batch:
        return
    mask_dtype = batch["loss_mask"].dtype
    if not (
        jnp.issubdtype(mask_dtype, jnp.floating)
        or jnp.issubdtype(mask_dtype, jnp.integer)
        or jnp.issubdtype(mask_dtype, jnp.bool_)
    ):
        raise TypeError(
            f"batch['loss_mask'] must be float, integer or bool; got {mask_dtype}"
        )


def codebook_metrics(vq: dict[str, Array]) -> dict[str, Array]:
    """Codebook health from the per-unit statistics (averaged over units, heads)."""
    count = vq["code_count"]  # [units, heads, codes]
    total = jnp.sum(count, axis=-1, keepdims=True)
    p = count / jnp.maximum(total, 1.0)
    entropy = -jnp.sum(
        jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1
    )
    return dict(
        code_entropy=jnp.mean(entropy),
        code_perplexity=jnp.mean(jnp.exp(entropy)),
        dead_code_fraction=jnp.mean((count == 0).astype(jnp.float32)),
        quant_rel_error=jnp.mean(vq["sq_err"] / jnp.maximum(vq["sq_norm"], 1e-30)),
    )


def loss_fn(
    model: Transformer,
    batch: dict[str, Array],
    state: TransformerState | None = None,
    *,
    key: PRNGKeyArray | None = None,
    sequence_key: PRNGKeyArray | None = None,
) -> tuple[Array, dict]:
    """LM loss + c_beta * commit loss + codebook (EMA surrogate) loss, as the
    official Transformer-VQ objective.

    **Arguments:**

    - `batch`: `{"inputs": int [B, T], "targets": int [B, T], "loss_mask": [B, T]}`
      (any integer dtype for the ids, uint8 included). `loss_mask` holds
      weights >= 0 (1 = count the position, 0 = ignore it); where it is 0 the
      target is not read, so an ignore index such as -1 may stand there.
      Without `loss_mask` every position counts (all ones).
    - `batch["doc_starts"]` (optional): bool `[B, T]`, True where a packed
      document starts; attention stays inside documents (see `vq_attention`).
    - `state`: the carried `TransformerState`, or None (the default) for no
      history (as `model.init_state(B)`).
    - `key`: dropout key; None disables dropout.
    - `sequence_key`: the per-sequence key of the LayerDrop and sinusoid
      dropout masks (see `Transformer`); pass the same one for every update
      segment of a sequence.

    **The terms:**

    - LM loss: the masked negative log-likelihood summed and divided by all
      `B * T` positions (`lm_loss_average="positions"`, official) or by the
      number of unmasked tokens (`"tokens"`).
    - commit loss (official): for each attention unit, `sum_h ||k' - c'||^2`
      in the quantizer's pre-scaled space (`k' = k d_k^-1/4`) times the mask,
      averaged over all `B * T` positions; summed over units (two per layer)
      and layers. `c_beta` therefore means what it means officially.
    - codebook loss: its gradient w.r.t. the codebook arrays is
      `theta - EMA_target`, so one SGD step with learning rate 1 on it
      performs the EMA update (route those arrays to such an optimizer). It
      enters `loss` with value zero (`cb - stop_gradient(cb)`): same
      gradient, readable loss; its surrogate value is reported as
      `metrics["codebook_loss"]`. It also gives every quantizer's
      `ema_tally` the gradient -1 (the same step adds 1 to it: the tally that
      makes any other optimizer on the codebook loud).

    **Returns:** `(loss, aux)` with `aux["state"]` the new state and
    `aux["metrics"]` a dict of float32 scalars: `loss` (the objective),
    `lm_loss` (mean negative log-likelihood per unmasked token, nats, whatever
    `lm_loss_average`), `lm_loss_sum`, `token_count`, `bits_per_token`,
    `mask_fraction`, `commit_loss`, `codebook_loss`, `code_entropy`,
    `code_perplexity`, `dead_code_fraction`, `quant_rel_error`.
    """
    sums, new_state = _loss_sums(
        model, batch, state, key=key, sequence_key=sequence_key
    )
    n_positions = float(batch["inputs"].shape[0] * batch["inputs"].shape[1])
    loss, metrics = _loss_from_sums(model, sums, n_positions)
    return loss, {"state": new_state, "metrics": metrics}


def _loss_sums(
    model: Transformer,
    batch: dict[str, Array],
    state: TransformerState | None = None,
    *,
    key: PRNGKeyArray | None = None,
    sequence_key: PRNGKeyArray | None = None,
) -> tuple[dict[str, Any], TransformerState]:
    """The forward pass of `loss_fn` (same arguments), stopped at sums that
    add up over the rows of a batch: `lm_sum` (masked negative
    log-likelihood, differentiable), `n_tokens` (the mask's sum) and `vq`
    (the quantizers' statistics, `[2 * n_layer, ...]`: `commit_sum`
    differentiable, the codebook statistics not). Summed over micro-batches
    they are the whole batch's (gradient accumulation, `train_step`'s
    `grad_accum`). **Returns:** `(sums, new_state)`."""
    _check_batch(batch, model)
    mask = _loss_mask(batch)
    logprobs, new_state, aux = model(
        batch["inputs"],
        state,
        key=key,
        mask=mask,
        sequence_key=sequence_key,
        doc_starts=batch.get("doc_starts"),
    )
    lm_sum, n_tokens = _lm_sums(logprobs, batch["targets"], mask)
    return dict(lm_sum=lm_sum, n_tokens=n_tokens, vq=aux["vq"]), new_state


def _trainable_objective(
    model: Transformer,
    sums: dict[str, Any],
    *,
    n_positions: float | Array,
    n_tokens: float | Array,
) -> Array:
    """The LM term plus `c_beta` times the commit term of `sums`, with the
    given denominators: a batch's own (`loss_fn`), or those of the whole
    batch a micro-batch is part of, so that the micro-batches' gradients add
    up to the whole batch's. The codebook term is left out: its gradient is
    a function of the whole batch's statistics (`_codebook_objective`)."""
    if model.config.lm_loss_average == "positions":
        lm_term = sums["lm_sum"] / n_positions
    else:
        lm_term = sums["lm_sum"] / jnp.maximum(n_tokens, 1.0)
    commit = jnp.sum(sums["vq"]["commit_sum"]) / n_positions
    return lm_term + model.config.c_beta * commit


def _codebook_objective(model: Transformer, vq: dict[str, Array]) -> Array:
    """The codebook term of the loss (value 0): its gradient is the EMA step
    towards the statistics `vq` and the tally's +1 (see `loss_fn`)."""
    return _codebook_terms(model, vq)[1]


def _loss_from_sums(
    model: Transformer, sums: dict[str, Any], n_positions: float | Array
) -> tuple[Array, dict[str, Array]]:
    """`loss_fn`'s loss and metrics from a batch's `_loss_sums` (summed over
    its micro-batches or not) and its number of positions `B * T`."""
    lm_sum, n_tokens, vq = sums["lm_sum"], sums["n_tokens"], sums["vq"]
    lm_loss = lm_sum / jnp.maximum(n_tokens, 1.0)
    commit = jnp.sum(vq["commit_sum"]) / n_positions
    codebook_loss, codebook_term = _codebook_terms(model, vq)
    loss = (
        _trainable_objective(model, sums, n_positions=n_positions, n_tokens=n_tokens)
        + codebook_term
    )
    metrics = dict(
        loss=loss,
        lm_loss=lm_loss,
        lm_loss_sum=lm_sum,
        token_count=n_tokens,
        bits_per_token=lm_loss / math.log(2.0),
        mask_fraction=n_tokens / n_positions,
        commit_loss=commit,
        codebook_loss=codebook_loss,
        **codebook_metrics(vq),
    )
    metrics = {
        k: jax.lax.stop_gradient(v).astype(jnp.float32) for k, v in metrics.items()
    }
    return loss, metrics


def _loss_mask(batch: dict[str, Array]) -> Float[Array, "batch seq"]:
    """`batch["loss_mask"]` as float32 weights (checked: negative weights
    would make the loss negative, NaN would poison it), or all ones."""
    if "loss_mask" in batch:
        return check_weights(
            jnp.asarray(batch["loss_mask"]).astype(jnp.float32), "batch['loss_mask']"
        )
    return jnp.ones(batch["inputs"].shape, jnp.float32)


def _lm_sums(logprobs, targets, mask) -> tuple[Array, Array]:
    """The masked negative log-likelihood summed, and the tokens counted.
    Targets of any integer dtype (uint8 included); where the mask is 0 a
    target is ignored, whatever its value (the -1 "ignore index" idiom)."""
    n_vocab = logprobs.shape[-1]
    targets = check_token_ids(
        jnp.asarray(targets), n_vocab, "batch['targets']", ignore=mask == 0
    )
    bad = out_of_range(targets, n_vocab)
    if bad is not None:  # only ignored positions can be out of range here
        targets = jnp.where(bad, jnp.zeros((), targets.dtype), targets)
    token_logp = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return -jnp.sum(token_logp * mask), jnp.sum(mask)


def _codebook_terms(model: Transformer, vq: dict[str, Array]) -> tuple[Array, Array]:
    """The codebook surrogate's value (reported) and its term in the loss
    (value 0, the surrogate's gradient: the EMA step and the tally's +1)."""
    # One term per unit position (first / second of each layer), each summed
    # over the stacked layers: statistics [2 * n_layer, ...] -> [n_layer, 2, ...].
    n_layer = model.config.n_layer
    count, key_sum = (
        vq[k].reshape(n_layer, 2, *vq[k].shape[1:])
        for k in ("code_count", "code_key_sum")
    )
    # asarray: an Array for the checker (sum() starts from the int 0).
    codebook_loss = jnp.asarray(
        sum(
            unit.quantizer.codebook_loss(count[:, j], key_sum[:, j])
            for j, unit in enumerate(model.layers.stacked.units)
        )
    )
    # Its gradient step (lr 1) adds 1 to every `ema_tally` (see VectorQuantizer).
    tally_loss = jnp.asarray(
        sum(unit.quantizer.tally_loss() for unit in model.layers.stacked.units)
    )
    # The surrogates' values are meaningless (only their gradients matter), so
    # they enter with value 0 and `loss` stays readable as LM loss + commit term.
    surrogate = codebook_loss + tally_loss
    return codebook_loss, surrogate - jax.lax.stop_gradient(surrogate)
