"""Public entry points: validate, default, and route to an implementation."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from pallas_kernels.vq_attention.config import PallasConfig

# Public entry points take plain `Array` so that our own validation (which
# names the argument and all shapes) runs before any annotation check.
from ._common import (
    VQAttentionState,
    as_int,
    cache_dtype,
    check_cache_decay,
    check_options,
    check_scale,
    resolve_mem_len,
    validate_inputs,
)
from ._padding import pad_end
from ._quadratic import vq_attention_quadratic
from ._xla import vq_attention_xla

# Jitted so eager calls compile once per shape instead of once per primitive;
# inside a user's jit these inline. `scale` is an operand, not static: a new
# value does not recompile, and it may be traced (a learned temperature).
_xla_jit = jax.jit(
    vq_attention_xla,
    static_argnames=(
        "block_len",
        "use_cache",
        "cache_grad",
        "mem_len",
        "sliding_window",
        "state_keys",
        "cache_decay",
    ),
)
_quadratic_jit = jax.jit(
    vq_attention_quadratic, static_argnames=("cache_decay", "block_len", "mem_len")
)
# Keyword arguments of `vq_attention_pallas` that are arrays; every other
# keyword-only argument is an option, static under jit.
_PALLAS_ARRAY_KWARGS = ("state", "rel_query", "rel_table", "doc_starts", "codes")


@functools.cache
def _pallas_jit():
    """`vq_attention_pallas` jitted like `_xla_jit` (built on first use: the
    kernels load only when they run). Eager calls otherwise re-trace and re-lower
    every kernel on each call. `scale` is static here (the kernels take a
    Python float); `_run_pallas` folds a traced scale into the query."""
    from ._pallas import vq_attention_pallas

    params = inspect.signature(vq_attention_pallas).parameters.values()
    static = tuple(
        p.name
        for p in params
        if p.kind is p.KEYWORD_ONLY and p.name not in _PALLAS_ARRAY_KWARGS
    )
    return jax.jit(vq_attention_pallas, static_argnames=static)


Implementation = Literal["xla", "pallas", "quadratic"]
_IMPLEMENTATIONS = ("xla", "pallas", "quadratic")


def default_implementation() -> str:
    """ "pallas" on GPU/TPU when the kernels are available, else "xla"."""
    if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") and _pallas_available():
        return "pallas"
    return "xla"


def _pallas_available() -> bool:
    try:
        from ._pallas import vq_attention_pallas as _  # noqa: F401
    except ImportError:
        return False
    return True


def _check_implementation(implementation) -> str:
    if implementation is None:
        return default_implementation()
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {_IMPLEMENTATIONS} or None; got "
            f"{implementation!r}"
        )
    if implementation == "pallas" and not _pallas_available():
        raise ValueError(
            "implementation='pallas' needs the pallas_kernels package, which is "
            "not importable here; use implementation='xla'"
        )
    return implementation


def _check_pallas(pallas) -> PallasConfig:
    if pallas is None:
        return PallasConfig()
    if not isinstance(pallas, PallasConfig):
        raise ValueError(
            f"pallas must be a tvq_eqx.PallasConfig or None; got {pallas!r}"
        )
    return pallas


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """The attention options of one call, validated and defaulted once at the
    public boundary (`resolve`); everything below trusts them. Frozen and
    hashable: static under jit."""

    implementation: str
    pallas: PallasConfig
    block_len: int
    mem_len: int
    use_cache: bool = True
    cache_grad: bool = True
    sliding_window: bool = False
    state_keys: str = "codewords"
    cache_decay: float = 1.0

    @classmethod
    def resolve(
        cls,
        *,
        implementation: str | None,
        pallas: PallasConfig | None,
        block_len: int | np.integer,
        mem_len: int | np.integer | None = None,
        state: VQAttentionState | None = None,
        use_cache: bool = True,
        cache_grad: bool = True,
        sliding_window: bool | None = None,
        state_keys: str = "codewords",
        cache_decay: float | int | np.number = 1.0,
    ) -> AttentionOptions:
        """Check every option (errors name the argument) and fill the
        defaults: the implementation for this backend, `mem_len` from the
        state or `block_len`, `sliding_window` from `use_cache`."""
        implementation = _check_implementation(implementation)
        pallas = _check_pallas(pallas)
        block_len = as_int("block_len", block_len, 1)
        sliding_window = check_options(
            use_cache=use_cache, sliding_window=sliding_window, state_keys=state_keys
        )
        if not isinstance(cache_grad, bool):
            raise ValueError(f"cache_grad must be a bool; got {cache_grad!r}")
        return cls(
            implementation=implementation,
            pallas=pallas,
            block_len=block_len,
            mem_len=resolve_mem_len(mem_len, state, block_len),
            use_cache=use_cache,
            cache_grad=cache_grad,
            sliding_window=sliding_window,
            state_keys=state_keys,
            cache_decay=check_cache_decay(cache_decay),
        )

    def form_kwargs(self) -> dict:
        """The keyword options of `vq_attention_xla` / `vq_attention_pallas`."""
        return dict(
            block_len=self.block_len,
            mem_len=self.mem_len,
            use_cache=self.use_cache,
            cache_grad=self.cache_grad,
            sliding_window=self.sliding_window,
            state_keys=self.state_keys,
            cache_decay=self.cache_decay,
        )


def vq_attention(
    query: Array,
    key: Array,
    value: Array,
    codebook: Array,
    *,
    block_len: int | np.integer,
    scale: float | int | np.number | Array | None = None,
    implementation: str | None = None,
    pallas: PallasConfig | None = None,
    cache_decay: float | int | np.number = 1.0,
    doc_starts: Array | None = None,
) -> Float[Array, "batch seq heads d_v"]:
    """Causal softmax attention over vector-quantized keys, exact, in linear time.

    Each key is replaced by its nearest codeword (`codebook[h, z]`, squared
    Euclidean distance in float32, ties to the lowest index) with a
    straight-through gradient; then
    `o_i = sum_{j<=i} exp(s_ij) v_j / sum_{j<=i} exp(s_ij)`, `s_ij = scale q_i . C[z_j]`.
    Keys older than the previous block are read through a per-code cache
    (counts and value means), which is exact.

    **Arguments:**

    - `query`, `key`: `[batch, seq, heads, d_k]`; `value`: `[batch, seq, heads, d_v]`.
    - `codebook`: `[heads, codes, d_k]`; receives no gradient.
    - `block_len`: block length. Outputs do not depend on it (up to
      rounding). `seq` may be any length: a partial last block is padded at
      the end and its padded rows dropped.
    - `scale`: score scale, default `1/sqrt(d_k)`: a finite real number, or a
      0-d array that may be traced (a learned temperature; differentiable).
      A new value does not recompile, except on the pallas kernels, which
      compile per Python value (a traced scale is folded into the query there).
    - `implementation`: `"xla"` (linear time, pure jnp), `"pallas"` (kernels;
      interpret mode on CPU), `"quadratic"` (the O(T^2) definition) or None
      (pallas on GPU/TPU, xla on CPU).
    - `pallas`: how the kernels run when the implementation is `"pallas"`
      (`PallasConfig`: tile sizes, backward choice, interpret mode); None =
      the defaults. Ignored by the other implementations.
    - `cache_decay` (gamma in (0, 1], default 1 = none, official): a decayed
      cache, each key weighted `gamma ** (blocks since it left the window)`
      (see `vq_attention_quadratic`); then the output depends on `block_len`.
    - `doc_starts`: bool `[batch, seq]`, True where a packed document starts:
      each query attends only to keys of its own document (the cache restarts
      at each start; still linear time). Every implementation.

    **Returns:** `[batch, seq, heads, d_v]` in `value.dtype`.

    Sizes: `seq = 0`, `batch = 0`, `heads = 0` or `d_v = 0` give the empty
    output of the right shape; `d_k = 0` and `codes = 0` raise a ValueError
    (nothing to quantize with). NaN or inf in the arrays is not checked (a pass
    over the data): it reaches every output of its block and of later blocks
    (masked weights are 0, and 0 * NaN = NaN). A non-finite `scale` raises
    when its value is known.

    Gradients: `dq` and `dv` equal the quadratic form's; `dk` flows only from
    queries in the same or the next block (the window, `mem_len = block_len`;
    the cache holds codewords, not keys), which is the paper's estimator.
    """
    opts = AttentionOptions.resolve(
        implementation=implementation,
        pallas=pallas,
        block_len=block_len,
        cache_decay=cache_decay,
    )
    validate_inputs(query, key, value, codebook, block_len=opts.block_len)
    scale = check_scale(scale, query.shape[-1])
    doc_starts = check_doc_starts(doc_starts, query)
    if opts.implementation == "quadratic":
        return _quadratic_jit(
            query,
            key,
            value,
            codebook,
            scale=scale,
            cache_decay=opts.cache_decay,
            block_len=opts.block_len,
            doc_starts=doc_starts,
        )
    # No state is carried: a partial last block is padded here (any option,
    # the decayed cache included), its rows dropped.
    t = query.shape[1]
    pad = -t % opts.block_len
    out, _ = run_resolved(
        pad_end(query, pad), pad_end(key, pad), pad_end(value, pad), codebook,
        None, opts, scale=scale, doc_starts=pad_end(doc_starts, pad, False),
    )  # fmt: skip
    return out[:, :t]


def check_doc_starts(doc_starts, query=None, *, shape=None, where=None):
    """`doc_starts` checked: None, or a bool `[batch, seq]` array shaped as
    `query`'s first two axes (or `shape`; `where` says whose shape, for the
    message). The one policy for packed documents, used by the op and the
    model: bool only, since a cast would read an int array of document ids
    as starts (a silent wrong answer)."""
    if doc_starts is None:
        return None
    if not hasattr(doc_starts, "shape") or not hasattr(doc_starts, "dtype"):
        raise TypeError(
            f"doc_starts must be a bool array [batch, seq]; got {type(doc_starts).__name__}"
        )
    if shape is None:
        assert query is not None, "check_doc_starts needs query or shape"
        shape, where = tuple(query.shape[:2]), f"shape {tuple(query.shape[:2])}"
        where += f" [batch, seq] (query {tuple(query.shape)})"
    if tuple(doc_starts.shape) != tuple(shape):
        raise ValueError(f"doc_starts must have {where}; got {tuple(doc_starts.shape)}")
    if doc_starts.dtype != jnp.bool_:
        raise TypeError(f"doc_starts must be a bool array; got {doc_starts.dtype}")
    return jnp.asarray(doc_starts)


def vq_attention_with_state(
    query: Array,
    key: Array,
    value: Array,
    codebook: Array,
    state: VQAttentionState | None,
    *,
    block_len: int | np.integer,
    scale: float | int | np.number | Array | None = None,
    rel_query: Array | None = None,
    rel_table: Array | None = None,
    use_cache: bool = True,
    cache_grad: bool = True,
    mem_len: int | np.integer | None = None,
    sliding_window: bool | None = None,
    state_keys: str = "codewords",
    implementation: str | None = None,
    pallas: PallasConfig | None = None,
    cache_decay: float | int | np.number = 1.0,
    doc_starts: Array | None = None,
) -> tuple[Float[Array, "batch seq heads d_v"], VQAttentionState]:
    """Streaming VQ attention: attend to `state`'s history, return the new state.

    Calling it on consecutive segments, passing the state along, equals one
    call on their concatenation (outputs, state, and gradients through the
    state). `state=None` is an empty history.

    **Extra arguments** (used by the model; names follow the official code):

    - `mem_len` (M >= 0; default: the state's window length, else
      `block_len`): each block attends directly to the last M keys before it
      plus itself (causal), and to every older key through the compressed
      cache. Any M works, smaller or larger than `block_len`; the output does
      not depend on it (the cache is exact), the key gradient does.
    - `rel_query` `[batch, seq, heads, d_k]`, `rel_table` `[R+1, heads, d_k]`
      with R <= M: an additive score bias `rel_query_i . rel_table[i-j]` for
      `0 <= i-j <= R` (Transformer-XL relative position term), zero beyond.
    - `cache_grad=False` (official `grad_thru_cache=False`): nothing carried
      between blocks passes gradient (keys and values of earlier blocks in the
      window, cached means, the incoming and returned state).
    - `use_cache=False` (official `agg_cache=False`): no cache; with
      `sliding_window` (default `not use_cache`) a query sees the last M
      tokens (distance <= M), with `sliding_window=False` its block's whole
      window (the "block_window" baseline).
    - `state_keys`: `"codewords"` (official): the window keeps the codewords
      quantized with the codebook of their own step; `"codes"`: it keeps
      codes and re-reads the current codebook. Only differs after a codebook
      update between calls.
    - `pallas`: `PallasConfig` for `implementation="pallas"` (as in
      `vq_attention`).
    - `cache_decay`: as in `vq_attention`; the carried cache is the decayed
      one, so streamed calls still equal one call.
    - `doc_starts`: as in `vq_attention`; a call's first tokens continue the
      history's document unless marked. The returned state holds only the
      last document's keys (window and cache).

    Any `seq`: a segment that is not whole blocks is padded at its end (the
    padded rows dropped) and the returned state is that of its real tokens
    (the window holds the last `mem_len` of them, the cache every older
    one), so the next segment goes on from token `seq`; streamed segments of
    any lengths equal one call on their concatenation. Except with a decayed
    cache (`cache_decay < 1`) or the block window (`use_cache=False,
    sliding_window=False`), whose state depends on where blocks begin: there
    `seq` must be a multiple of `block_len` (a ValueError says so).

    Sizes and `scale` as in `vq_attention`; `seq = 0` returns the state
    unchanged (cache in float32). The returned state's cache is float32
    whatever the activation dtype (see `VQAttentionState`).
    """
    opts = AttentionOptions.resolve(
        implementation=implementation,
        pallas=pallas,
        block_len=block_len,
        mem_len=mem_len,
        state=state,
        use_cache=use_cache,
        cache_grad=cache_grad,
        sliding_window=sliding_window,
        state_keys=state_keys,
        cache_decay=cache_decay,
    )
    scale, doc_starts = check_streaming_inputs(
        query, key, value, codebook, state, opts, scale=scale,
        rel_query=rel_query, rel_table=rel_table, doc_starts=doc_starts,
    )  # fmt: skip
    return run_resolved(
        query,
        key,
        value,
        codebook,
        state,
        opts,
        scale=scale,
        rel_query=rel_query,
        rel_table=rel_table,
        doc_starts=doc_starts,
    )


def check_streaming_inputs(
    query, key, value, codebook, state, opts: AttentionOptions, *, scale,
    rel_query=None, rel_table=None, doc_starts=None,
):  # fmt: skip
    """The array checks of a streaming call with resolved `opts` (shared by
    `vq_attention_with_state` and context parallelism): returns the checked
    `(scale, doc_starts)`."""
    if opts.implementation == "quadratic":
        raise ValueError(
            "implementation='quadratic' has no streaming state; use 'xla' or 'pallas'"
        )
    doc_starts = check_doc_starts(doc_starts, query)
    validate_inputs(
        query,
        key,
        value,
        codebook,
        block_len=opts.block_len,
        rel_query=rel_query,
        rel_table=rel_table,
        state=state,
        mem_len=opts.mem_len,
    )
    return check_scale(scale, query.shape[-1]), doc_starts


def run_resolved(
    query,
    key,
    value,
    codebook,
    state,
    opts: AttentionOptions,
    *,
    scale,
    rel_query=None,
    rel_table=None,
    doc_starts=None,
    codes=None,
):
    """Route validated inputs and resolved options to the xla form or the
    kernels (no checks repeated: the public entry points and context
    parallelism made them). `codes`: the keys' codes when the caller has
    quantized them already (context parallelism), else None."""
    b, t, h, _ = query.shape
    if t == 0:
        # Nothing to attend or to add to the history: the state is unchanged.
        return _empty_segment(query, key, value, codebook, state, mem_len=opts.mem_len)
    impl = opts.implementation
    if impl == "pallas" and b * h * value.shape[-1] == 0:
        # Zero-size batch, heads or values: no kernel work; the xla form
        # gives the (empty) output and the state exactly.
        impl = "xla"
    if impl == "pallas":
        if not isinstance(scale, float):
            # Traced: the kernels take the scale as a Python float, so a traced
            # one scales the query instead (the window bias is added unscaled
            # either way).
            query = query * jnp.asarray(scale).astype(query.dtype)
            scale = 1.0
        implementation_fn = functools.partial(_pallas_jit(), pallas=opts.pallas)
    else:
        implementation_fn = _xla_jit
    arrays = {"doc_starts": doc_starts, "codes": codes}
    return implementation_fn(
        query,
        key,
        value,
        codebook,
        scale=scale,
        state=state,
        rel_query=rel_query,
        rel_table=rel_table,
        **opts.form_kwargs(),
        **{name: x for name, x in arrays.items() if x is not None},
    )


def _empty_segment(query, key, value, codebook, state, *, mem_len):
    """Output and state of a zero-length segment: `[batch, 0, heads, d_v]`
    and the incoming state (an empty one for None), cache in float32."""
    b, _, h, _ = query.shape
    out = jnp.zeros((b, 0, h, value.shape[-1]), value.dtype)
    if state is None:
        state = VQAttentionState.empty_for(key, value, codebook, mem_len=mem_len)
    mean = state.cache_mean
    state = eqx.tree_at(
        lambda s: (s.cache_count, s.cache_mean),
        state,
        (
            state.cache_count.astype(jnp.float32),
            mean.astype(cache_dtype(mean.dtype)),
        ),
    )
    return out, state
