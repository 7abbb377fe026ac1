"""Runtime value checks shared by the model, the loss and sampling.

They run under `jit` (`eqx.error_if`) and compose with `vmap`, with a
batch-sharded `jit` (no resharding of the checked array) and with
`jax.shard_map` (`check_vma=True` included; a plain `eqx.error_if` on a
varying array fails there with "cond branches must have equal output
types"): see `error_if_any`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool


def varying_axes(x) -> tuple[str, ...]:
    """Manual mesh axes along which `x` varies inside `shard_map` (sorted;
    empty outside one or with `check_vma=False`)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.12
    axes = manual.varying if manual is not None else getattr(aval, "vma", ())
    return tuple(sorted(axes))


def error_if_any(x: Array, bad: Bool[Array, "*dims"], msg: str) -> Array:
    """`x` (a numeric array) unchanged, raising `msg` at run time if any entry
    of `bad` is true (on any device of an enclosing `shard_map`). As
    `eqx.error_if`, the check only runs if the returned value is used.

    The check runs on one scalar flag, tied to `x` by adding a zero it
    returns: `eqx.error_if` on `x` itself makes `x` the output of a
    conditional whose error branch is a host callback, which XLA places on
    one device; a batch-sharded `x` then had to be gathered there and split
    again ("Involuntary full rematerialization"). Inside a `shard_map` the
    flag is first summed over the mesh axes `x` and `bad` vary along, so it
    is replicated, as the conditional needs under `check_vma=True`.
    """
    flag = jnp.any(bad)
    axes = tuple(sorted(set(varying_axes(x)) | set(varying_axes(bad))))
    if axes:
        flag = jax.lax.psum(flag.astype(jnp.int32), axes) > 0
    zero = eqx.error_if(jnp.zeros((), x.dtype), flag, msg)
    return x + zero


def out_of_range(ids: Array, n_vocab: int) -> Bool[Array, "*dims"] | None:
    """Where `ids` (any integer dtype) lies outside `[0, n_vocab)`, or None
    when its dtype cannot hold such a value (e.g. uint8 ids with
    `n_vocab=256`). The bounds are compared in the ids' own dtype only where
    they fit in it: `uint8 >= 256` would wrap 256 to 0."""
    info = jnp.iinfo(ids.dtype)
    bad = None
    if info.min < 0:
        bad = ids < 0
    if info.max >= n_vocab:
        too_big = ids >= jnp.asarray(n_vocab, ids.dtype)
        bad = too_big if bad is None else bad | too_big
    return bad


def _host_ids_as_int32(ids, n_vocab: int, name: str):
    """numpy ids as a jax array; numpy's default int64 checked on the host
    and cast to int32 first (jax without x64 would truncate them, warning at
    every call)."""
    if not isinstance(ids, np.ndarray):
        return ids
    if ids.dtype.itemsize <= 4 or jax.config.jax_enable_x64:
        return jnp.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
        raise ValueError(f"{name} ids must be in [0, n_vocab={n_vocab})")
    return jnp.asarray(ids.astype(np.int32))


def check_token_ids(
    ids: Array | np.ndarray, n_vocab: int, name: str, *, ignore: Array | None = None
) -> Array:
    """`ids` with a run-time check that every entry is in `[0, n_vocab)`
    (positions where `ignore` is true are exempt); the error names `name`.
    Works for every integer dtype (uint8 byte tokens included)."""
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array; got {ids.dtype}")
    ids = _host_ids_as_int32(ids, n_vocab, name)
    bad = out_of_range(ids, n_vocab)
    if bad is None:
        return ids
    if ignore is not None:
        bad = bad & ~ignore
    return error_if_any(ids, bad, f"{name} ids must be in [0, n_vocab={n_vocab})")


def check_weights(mask: Array, name: str) -> Array:
    """`mask` (float) with a run-time check that every entry is finite and
    >= 0 (a negative weight would make the loss negative)."""
    bad = ~(jnp.isfinite(mask) & (mask >= 0))
    return error_if_any(
        mask, bad, f"{name} entries must be finite and >= 0 (0 = ignore the position)"
    )
