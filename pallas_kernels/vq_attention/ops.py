"""The differentiable op: padding to kernel-friendly sizes, the custom_vjp that
wires the forward kernel to the backward kernels."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import backward as _bwd
from . import forward as _fwd
from ._common import MASK_VALUE, Static
from ._platform import unavailable
from .config import BlockSizes, Tiles, resolve_tiles
from .partition import batch_head_call, match_varying


def _pad_axis(x, axis, size, value=0.0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


# Inside the custom_vjp, operands are [B, H, ...] (the codebook [H, ...]), and
# each kernel call goes through `batch_head_call` (partition.py): split over the
# batch and head mesh axes under jit. The codebook (argument 4) is per head.
def _forward(st, *args):
    return batch_head_call(_fwd.forward, st, args, head_args=(4,))


def _dk(st, ds_win, q, k_ext):
    return _bwd.dkv_call(st, "dk", ds_win, q, k_ext)


def _dv(st, p_win, dout, v_ext):
    return _bwd.dkv_call(st, "dv", p_win, dout, v_ext)


# The kernels' operands, in their order (`vq_attention_core`'s arguments): the
# custom_vjp passes them as one tuple, the backward names them.
class Operands(NamedTuple):
    q: Any
    k_ext: Any
    v_ext: Any
    prev_valid: Any
    codebook: Any
    cache_bias: Any
    cache_mean: Any
    window_bias: Any
    key_from: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st: Static, *operands):
    out, _ = _forward(st, *operands)
    return out


def _core_fwd(st, *operands):
    out, lse = _forward(st, *operands)
    return out, (operands, out, lse)


def _core_bwd(st, res, dout):
    operands, out, lse = res
    ops = Operands(*operands)
    dout = dout.astype(ops.v_ext.dtype)
    delta = jnp.sum(
        out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1, keepdims=True
    )  # [B, H, T, 1]
    dq, p_win, ds_win, p_code, dwindow_bias = ds_kernel(st, ops, dout, lse, delta)
    dk = dk_kernel(st, ops, ds_win)
    dv = dv_kernel(st, ops, p_win, dout)
    if st.use_cache:
        dcache_mean = (
            dmean_kernel(st, ops, p_code, dout)
            if st.cache_grad
            else jnp.zeros_like(ops.cache_mean)
        )
        dcodebook = jnp.zeros_like(ops.codebook)
        dcache_bias = jnp.zeros_like(ops.cache_bias)
    else:
        dcache_mean = dcodebook = dcache_bias = None
    return (
        dq,
        dk,
        dv,
        jnp.zeros_like(ops.prev_valid),
        dcodebook,
        dcache_bias,
        dcache_mean,
        dwindow_bias,
        None,  # key_from: integer, no gradient
    )


_core.defvjp(_core_fwd, _core_bwd)


def _as_int(name: str, value, minimum: int) -> int:
    """`value` as a Python int >= minimum (numpy integers accepted, bools not)."""
    if isinstance(value, numbers.Integral | np.integer) and not isinstance(
        value, bool | np.bool_
    ):
        value = operator.index(value)
        if value >= minimum:
            return value
    raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


def _static_scale(scale) -> float:
    """The kernels' scale: a finite Python number (compiled into the kernels)."""
    if isinstance(scale, bool | np.bool_) or not (
        isinstance(scale, numbers.Real)
        or (hasattr(scale, "shape") and tuple(scale.shape) == ())
    ):
        raise ValueError(f"scale must be a real number; got {scale!r}")
    try:
        scale = float(scale)
    except jax.errors.ConcretizationTypeError:
        raise ValueError(
            "scale must be a Python float for the Pallas kernels (it is compiled "
            "in); for a traced scale multiply it into q and pass scale=1.0 "
            "(tvq_eqx.vq_attention does this)"
        ) from None
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale!r}")
    return scale


def prepare_operands(
    q,
    k_ext,
    v_ext,
    prev_valid,
    codebook=None,
    cache_bias=None,
    cache_mean=None,
    window_bias=None,
    key_from=None,
    *,
    block_len: int,
    scale: float,
    num_heads: int,
    cache_grad: bool = True,
    window_len: int | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    debug: bool = False,
    target: str | None = None,
):
    """Validate and pad `vq_attention_core`'s arguments; returns the kernels'
    static settings and operands `(st, operands)` (an `Operands` of
    `[B, H, ...]` arrays), or `(None, empty output)` when there is nothing
    to compute. The kernel stages below take them: a benchmark times each
    kernel alone on exactly what the op runs.

    VQ attention on kernel-layout arrays (see README.md for the math).

    **Arguments** (BH = batch * heads, head index = bh % num_heads):

    - `q` `[BH, T, K]`; `k_ext` `[BH, T + L, K]` quantized keys whose first
      block is the previous segment's last block; `v_ext` `[BH, T + L, V]`.
    - `prev_valid` float32 `[BH, 1, 1]`: 1 where that first block is valid.
    - `codebook` `[H, S, K]`, `cache_bias` float32 `[BH, N, 1, S]` (log count,
      MASK_VALUE for empty codes), `cache_mean` `[BH, N, S, V]`: the cache of
      each block; all None for window-only attention.
    - `window_bias` float32 `[BH, T, 2L]` or None: additive bias of query t to
      window column c (c < L: previous block, else current block).
    - `key_from` int32 `[BH, T, 1]` or None (packed documents): query t sees
      window columns `c >= key_from[t]` only (its document's start; columns
      counted from the previous block's start), and the cache only where
      `key_from[t] < 0` (its document began before the window). Must not
      exceed the query's own column (`L + t mod L`): every query sees itself.
    - `cache_grad=False` (the official `grad_thru_cache=False`): the state
      carried between blocks is stop-gradiented: no gradient to `cache_mean`,
      and none from a block's queries to the previous block's keys and values
      (`k_ext` / `v_ext` block n receive gradient only from block n's own
      queries); gradients within a block are unchanged.
    - `window_len` (only without the cache, 1 <= window_len <= block_len): a
      query attends only to window keys at distance 0..window_len (sliding
      window, the official `agg_cache=False` with mem_len = window_len).
      None: the whole previous block and the causal current block.
    - `target` ("gpu", "tpu" or "cpu"): the platform the program is lowered
      for, when the caller knows it (`vq_attention_core` traces one variant
      per platform); it picks the tile rule when `block_sizes` is None and
      each kernel's compiler settings. None: the rule of the local backend,
      the settings at lowering.

    """
    block_len = _as_int("block_len", block_len, 1)
    num_heads = _as_int("num_heads", num_heads, 1)
    scale = _static_scale(scale)
    operands = Operands(
        q, k_ext, v_ext, prev_valid, codebook, cache_bias, cache_mean, window_bias,
        key_from,
    )  # fmt: skip
    n_code = _check_shapes(operands, block_len=block_len, num_heads=num_heads)
    use_cache = codebook is not None
    window_len = _check_window_len(window_len, use_cache=use_cache, block_len=block_len)
    bh, seq, d_k = q.shape
    d_v = v_ext.shape[-1]
    if bh == 0 or seq == 0 or d_v == 0:
        # Nothing to compute (the shapes are consistent): the kernels' grids
        # would be empty, and an empty output has no gradient.
        return None, jnp.zeros((bh, seq, d_v), v_ext.dtype)
    if block_sizes is None:
        block_sizes = BlockSizes.for_platform(target or jax.default_backend())
    f32_inputs = q.dtype == jnp.float32 and v_ext.dtype == jnp.float32
    tiles = resolve_tiles(
        block_sizes, block_len=block_len, codes=n_code, d_k=d_k, d_v=d_v,
        float32=f32_inputs,
    )  # fmt: skip
    st = Static(
        tiles=tiles,
        sizes=block_sizes,
        scale=float(scale),
        num_heads=num_heads,
        n_blocks=seq // block_len,
        use_cache=use_cache,
        has_bias=window_bias is not None,
        cache_grad=cache_grad,
        f32_inputs=f32_inputs,
        interpret=interpret,
        debug=debug,
        window_grad=cache_grad,
        window_len=window_len,
        target=target,
    )
    padded = _pad_to_tiles(operands, tiles)
    # Batch and heads as separate dimensions (each may carry its own mesh
    # axes; see partition.py), and inside shard_map one varying type for all
    # operands (see match_varying).
    return st, Operands(*match_varying(*_split_batch_heads(padded, num_heads)))


def _check_shapes(ops: Operands, *, block_len: int, num_heads: int) -> int:
    """Raise `ValueError` naming the argument unless every operand has the
    shape `q`, `v_ext` and `block_len` imply; returns the number of codes
    (1 without the cache)."""
    q, v_ext, codebook = ops.q, ops.v_ext, ops.codebook
    if not hasattr(q, "ndim") or q.ndim != 3 or not hasattr(v_ext, "ndim"):
        got = tuple(q.shape) if hasattr(q, "shape") else type(q).__name__
        raise ValueError(f"q must be [batch*heads, seq, d_k]; got {got}")
    bh, seq, d_k = q.shape
    d_v = v_ext.shape[-1]
    L = block_len
    use_cache = codebook is not None
    if d_k == 0:
        raise ValueError(f"q {tuple(q.shape)}: d_k must be >= 1")
    if use_cache and codebook.ndim == 3 and codebook.shape[1] == 0:
        raise ValueError(
            f"codebook {tuple(codebook.shape)} has no codes; give at least one "
            f"or codebook=None (no cache)"
        )
    if seq % L:
        raise ValueError(f"q {tuple(q.shape)}: seq must be a multiple of block_len={L}")
    n_blk = seq // L
    if bh % num_heads:
        raise ValueError(f"q {tuple(q.shape)}: leading dim must be batch*{num_heads}")
    want: dict[str, tuple[int, ...]] = dict(
        k_ext=(bh, seq + L, d_k), v_ext=(bh, seq + L, d_v), prev_valid=(bh, 1, 1)
    )
    n_code = 1
    if use_cache:
        n_code = codebook.shape[1]
        want.update(
            codebook=(num_heads, n_code, d_k),
            cache_bias=(bh, n_blk, 1, n_code),
            cache_mean=(bh, n_blk, n_code, d_v),
        )
    if ops.window_bias is not None:
        want["window_bias"] = (bh, seq, 2 * L)
    if ops.key_from is not None:
        want["key_from"] = (bh, seq, 1)
        if not jnp.issubdtype(ops.key_from.dtype, jnp.integer):
            raise ValueError(
                f"key_from must be an integer array; got {ops.key_from.dtype}"
            )
    for name, shape in want.items():
        arr = getattr(ops, name)
        if arr is None or tuple(arr.shape) != shape:
            got = None if arr is None else tuple(arr.shape)
            raise ValueError(
                f"{name} must have shape {shape} for q {tuple(q.shape)}, "
                f"v_ext {tuple(v_ext.shape)}, block_len={L}; got {got}"
            )
    return n_code


def _check_window_len(window_len, *, use_cache: bool, block_len: int) -> int | None:
    """`window_len` as a Python int in [1, block_len], or None; only without
    the cache."""
    if window_len is None:
        return None
    if use_cache:
        raise ValueError(f"window_len={window_len} needs the cache off (codebook=None)")
    ok = isinstance(window_len, numbers.Integral | np.integer) and not (
        isinstance(window_len, bool | np.bool_)
    )
    if not ok or not 1 <= operator.index(window_len) <= block_len:
        raise ValueError(
            f"window_len must be an int in [1, block_len={block_len}]; got "
            f"{window_len!r}"
        )
    return operator.index(window_len)


def _pad_to_tiles(ops: Operands, tiles: Tiles) -> Operands:
    """The operands in the kernels' dtypes, padded to whole tiles: d_k, d_v
    and the codes (padded codes get MASK_VALUE bias, so no query picks them)."""
    q = _pad_axis(ops.q, 2, tiles.d_k)
    dtype = ops.v_ext.dtype
    codebook, cache_bias, cache_mean = ops.codebook, ops.cache_bias, ops.cache_mean
    if codebook is not None:
        # The shape check rejected a missing cache_bias / cache_mean.
        assert cache_bias is not None and cache_mean is not None
        codebook = _pad_axis(
            _pad_axis(codebook.astype(q.dtype), 2, tiles.d_k), 1, tiles.codes
        )
        cache_bias = _pad_axis(
            cache_bias.astype(jnp.float32), 3, tiles.codes, MASK_VALUE
        )
        cache_mean = _pad_axis(
            _pad_axis(cache_mean.astype(dtype), 3, tiles.d_v), 2, tiles.codes
        )
    window_bias, key_from = ops.window_bias, ops.key_from
    return Operands(
        q=q,
        k_ext=_pad_axis(ops.k_ext.astype(q.dtype), 2, tiles.d_k),
        v_ext=_pad_axis(ops.v_ext, 2, tiles.d_v),
        prev_valid=ops.prev_valid.astype(jnp.float32),
        codebook=codebook,
        cache_bias=cache_bias,
        cache_mean=cache_mean,
        window_bias=None if window_bias is None else window_bias.astype(jnp.float32),
        key_from=None if key_from is None else key_from.astype(jnp.int32),
    )


def _split_batch_heads(ops: Operands, num_heads: int) -> Operands:
    """`[B*H, ...]` operands as `[B, H, ...]` (the codebook is per head)."""

    def split(x):
        if x is None:
            return None
        return x.reshape(x.shape[0] // num_heads, num_heads, *x.shape[1:])

    return Operands(
        **{n: x if n == "codebook" else split(x) for n, x in ops._asdict().items()}
    )


_ARRAY_ARGS = (
    "q", "k_ext", "v_ext", "prev_valid", "codebook", "cache_bias", "cache_mean",
    "window_bias", "key_from",
)  # fmt: skip
# Lowering platform -> the `target` of its variant.
_TARGETS = dict(cuda="gpu", rocm="gpu", tpu="tpu")


def vq_attention_core(*args, **kwargs) -> jax.Array:
    """VQ attention on kernel-layout arrays: `prepare_operands`' arguments
    (see its docstring), then the differentiable kernels.

    One variant per platform is traced and the one for the platform being
    lowered for is compiled: its tiles (when `block_sizes` is None) and its
    padding follow the target, not the machine that traces, so `jax.export`
    and ahead-of-time compiles for another platform get the target's rule.

    **Returns:** `[BH, T, V]` in `v_ext.dtype`. Differentiable in q, k_ext,
    v_ext, cache_mean and window_bias (zero cotangents for the rest)."""
    if "target" in kwargs:
        raise TypeError("vq_attention_core picks `target` itself")
    # The arrays pass through `platform_dependent`; the settings are static.
    given = inspect.signature(prepare_operands).bind(*args, **kwargs).arguments
    arrays = {k: v for k, v in given.items() if k in _ARRAY_ARGS}
    kwargs = {k: v for k, v in given.items() if k not in _ARRAY_ARGS}

    # jax.default_backend() says "gpu" where lowering says "cuda" / "rocm".
    local = dict(_TARGETS, gpu="gpu").get(jax.default_backend(), "cpu")

    def variant(target):
        def run(arrays):
            try:
                st, operands = prepare_operands(**arrays, **kwargs, target=target)
            except ValueError as e:
                if target == local:
                    raise
                # Not the machine's own platform: fail only if compiled for it.
                q, v_ext = arrays["q"], arrays["v_ext"]
                shape = (q.shape[0], q.shape[1], v_ext.shape[-1])
                message = f"for {target}: {e}"
                return unavailable(shape, v_ext.dtype, message, arrays)
            if st is None:
                assert isinstance(operands, jax.Array)
                return operands  # the empty output
            out = _core(st, *operands)
            q, v_ext = arrays["q"], arrays["v_ext"]
            return out.reshape(q.shape[0], *out.shape[2:])[..., : v_ext.shape[-1]]

        return run

    return jax.lax.platform_dependent(
        arrays,
        **{platform: variant(t) for platform, t in _TARGETS.items()},
        default=variant("cpu"),
    )


# Each kernel alone, on `prepare_operands`' output (benchmarks/kernel_parts.py
# times them one by one); `_core_fwd` / `_core_bwd` chain them.
def forward_kernel(st: Static, operands: Operands):
    """The forward kernel: (out `[B, H, T, V]`, lse `[B, H, T, 1]` f32)."""
    return _forward(st, *operands)


def ds_kernel(st: Static, operands: Operands, dout, lse, delta):
    """The query-side backward kernel: (dq, P_win, dS_win, P_code, d window
    bias), from the output's cotangent, lse and delta = rowsum(out * dout)."""
    return batch_head_call(
        _bwd.ds_call, st, (*operands, dout, lse, delta), head_args=(4,)
    )


def dk_kernel(st: Static, operands: Operands, ds_win):
    return batch_head_call(_dk, st, (ds_win, operands.q, operands.k_ext))


def dv_kernel(st: Static, operands: Operands, p_win, dout):
    return batch_head_call(_dv, st, (p_win, dout, operands.v_ext))


def dmean_kernel(st: Static, operands: Operands, p_code, dout):
    return batch_head_call(_bwd.dmean_call, st, (p_code, operands.cache_mean, dout))
