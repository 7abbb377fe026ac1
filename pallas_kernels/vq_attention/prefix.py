"""The cache every block reads, in one kernel: block sums, their prefix over
blocks and the division to means, without the float32 `[N, S, V]` round trip.

XLA computes the cache as four passes over `[N, S, V]` arrays: per-block value
sums (a one-hot matmul, float32 out), their prefix over blocks (float32 in
and out), the division by the counts and the cast (float32 in, value dtype
out); about 20 bytes per element, 30 KB per token at the official shape.
This kernel keeps the running sum of one `[bs, bv]` tile of (codes, value
columns) in registers and walks the blocks in order:

    for n in 0..N-1:   mean[n] = acc / max(count[n], 1)     (what block n reads)
                       acc     = a[n] * acc + onehot(codes of group n)^T . V

so the only `[N, S, V]` traffic is writing the means once, in the value
dtype. `a[n]` is the cache decay (or 0 where block n restarts the cache at a
document start; absent: 1). `count[n]` (float32, from XLA, which needs it
for the log-count bias anyway) divides exactly as the XLA form does. Keys
that do not enter the cache (invalid window slots, keys before their
group's document start) carry code -1 (a zero one-hot row).

Grid `(BH, S/bs, V/bv)`, every program independent; the loop over blocks and
over row chunks of `bl` keys is inside. Whole-sequence refs (the codes and
values of every group) are indexed with dynamic row slices of `bl` rows,
powers of two as Triton needs. GPU (Triton) and interpret mode; on TPU the
whole-sequence blocks would not fit VMEM, so the caller keeps the XLA form
there. The backward (linear, needing no residual but the codes and counts)
is the XLA form's transpose, wired by the caller (`tvq_eqx.ops._pallas`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._common import dot_precision, dot_tn, fori, iota
from ._platform import pallas_call
from .config import BlockSizes
from .partition import batch_head_call

# (code rows, value columns, key rows per step, warps) caps per platform and
# float32-ness; GPU values from the AOT gate's register counts at the official
# shape (benchmarks/aot_compile.py; docs/kernels.md).
PREFIX_TILES = {
    ("gpu", False): (128, 64, 64, 8),  # sm_90 128 / sm_80 213 registers
    ("gpu", True): (64, 32, 32, 4),  # sm_90 96 / sm_80 168 registers
    ("other", False): (128, 128, 128, 4),
    ("other", True): (128, 128, 128, 4),
}


def _largest_pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap dividing n."""
    size = 1
    while size * 2 <= cap and n % (size * 2) == 0:
        size *= 2
    return size


@dataclasses.dataclass(frozen=True)
class PrefixStatic:
    """Static settings of one call (`num_heads` as `batch_head_call` wants)."""

    num_heads: int
    block_len: int
    n_blocks: int
    block_rows: int  # bl
    block_code: int  # bs
    block_v: int  # bv
    decay: bool
    f32_inputs: bool
    float32_dots: str
    sizes: BlockSizes
    num_warps: int
    interpret: bool | None
    target: str | None = None  # as `Static.target`


def _prefix_kernel(*refs, st: PrefixStatic):
    if st.decay:
        code_ref, v_ref, a_ref, count_ref, sum0_ref, mean_ref, total_ref = refs
    else:
        code_ref, v_ref, count_ref, sum0_ref, mean_ref, total_ref = refs
        a_ref = None
    L, bl, bs, bv = st.block_len, st.block_rows, st.block_code, st.block_v
    prec = dot_precision(st.f32_inputs, st.float32_dots)
    code_ids = pl.program_id(1) * bs + iota((bl, bs), 1)

    def block(n, acc):
        count = count_ref[n]  # [bs, 1]
        mean_ref[n] = (acc / jnp.where(count > 0, count, 1.0)).astype(mean_ref.dtype)

        def chunk(c, x):
            rows = pl.ds(pl.multiple_of(n * L + c * bl, bl), bl)
            onehot = (code_ref[rows, :] == code_ids).astype(v_ref.dtype)  # [bl, bs]
            return x + dot_tn(onehot, v_ref[rows, :], prec)

        x = fori(0, L // bl, chunk, jnp.zeros((bs, bv), jnp.float32))
        if a_ref is not None:
            acc = a_ref[pl.ds(n, 1), :] * acc  # [1, 1] factor
        return acc + x

    total_ref[...] = fori(0, st.n_blocks, block, sum0_ref[...])


def _prefix_call(st: PrefixStatic, codes, values, a, count, sum0):
    """One kernel call on `[BH, ...]` operands (padded: S and V to tiles)."""
    bh, rows, _ = codes.shape
    n_code, d_v = sum0.shape[1:]
    bs, bv = st.block_code, st.block_v
    in_specs = [
        pl.BlockSpec((None, rows, 1), lambda b, s, v: (b, 0, 0)),
        pl.BlockSpec((None, rows, bv), lambda b, s, v: (b, 0, v)),
    ]
    args = [codes, values]
    if st.decay:
        in_specs.append(pl.BlockSpec((None, st.n_blocks, 1), lambda b, s, v: (b, 0, 0)))
        args.append(a)
    in_specs += [
        pl.BlockSpec((None, st.n_blocks, bs, 1), lambda b, s, v: (b, 0, s, 0)),
        pl.BlockSpec((None, bs, bv), lambda b, s, v: (b, s, v)),
    ]
    args += [count, sum0]
    return pallas_call(
        functools.partial(_prefix_kernel, st=st),
        name="vq_attention_cache_prefix",
        grid=(bh, n_code // bs, d_v // bv),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, st.n_blocks, bs, bv), lambda b, s, v: (b, 0, s, v)),
            pl.BlockSpec((None, bs, bv), lambda b, s, v: (b, s, v)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((bh, st.n_blocks, n_code, d_v), values.dtype),
            jax.ShapeDtypeStruct((bh, n_code, d_v), jnp.float32),
        ],
        target=st.target,
        num_warps=st.num_warps,
        num_stages=1,
        interpret=st.interpret,
    )(*args)


def cache_prefix(
    codes,
    values,
    a,
    count,
    sum0,
    *,
    block_len: int,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    tiles: tuple[int, int, int, int] | None = None,
    target: str | None = None,
):
    """Every block's cached means and the cache after the last block.

    **Arguments** (`[B, H, ...]` layout, N = number of blocks):

    - `codes` int32 `[B, H, R, 1]`, R >= N * L: the code of each key in
      order (groups of L keys; group n enters the cache after block n
      reads it), -1 for a key that does not enter; rows past N * L unused.
    - `values` `[B, H, R, V]`: their values (the dtype of the means).
    - `a` float32 `[B, H, N]` or None (all 1): the factor on the cache
      before group n is added (decay; 0 restarts it).
    - `count` float32 `[B, H, N, S]`: the count of every code in the cache
      block n reads (divides the sums into means; 0 = empty code).
    - `sum0` float32 `[B, H, S, V]`: the cache before block 0 (sums).

    `tiles`: (code rows, value columns, key rows per step, warps) caps, for
    tile sweeps; None = `PREFIX_TILES` of the platform and dtype.
    `target`: as `prepare_operands`' (the platform being lowered for, when
    the caller knows it).

    **Returns:** (means `[B, H, N, S, V]` in `values.dtype`, sums after the
    last group `[B, H, S, V]` float32). Forward only: the caller wires the
    (linear) backward.
    """
    b, h, n_blk, n_code = count.shape
    d_v = values.shape[-1]
    if block_sizes is None:
        block_sizes = BlockSizes.for_platform(target or jax.default_backend())
    gpu = block_sizes.platform == "gpu"
    min_tile = block_sizes.min_tile
    # Pad codes and value columns to whole tiles (and Triton's minimum 16).
    s_pad = -(-max(n_code, min_tile) // 16) * 16 if gpu else n_code
    v_pad = -(-max(d_v, min_tile) // 16) * 16 if gpu else d_v
    f32 = values.dtype == jnp.float32
    if tiles is None:
        tiles = PREFIX_TILES[("gpu" if gpu else "other", f32)]
    max_code, max_v, max_rows, num_warps = tiles
    st = PrefixStatic(
        num_heads=h,
        block_len=block_len,
        n_blocks=n_blk,
        block_rows=_largest_pow2_divisor(block_len, max_rows),
        block_code=_largest_pow2_divisor(s_pad, max_code),
        block_v=_largest_pow2_divisor(v_pad, max_v),
        decay=a is not None,
        f32_inputs=f32,
        float32_dots=block_sizes.float32_dots or ("bf16x6" if gpu else "highest"),
        sizes=block_sizes,
        num_warps=num_warps,
        interpret=interpret,
        target=target,
    )
    if gpu and st.block_rows < 16:
        raise ValueError(
            f"cache_prefix on GPU needs 16 | block_len; got block_len={block_len}"
        )

    def pad(x, axis, size, value=0.0):
        extra = size - x.shape[axis]
        if not extra:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        return jnp.pad(x, widths, constant_values=value)

    values = pad(values, 3, v_pad)
    count = pad(count, 3, s_pad, 1.0)[..., None]  # [B, H, N, S, 1]
    sum0 = pad(pad(sum0, 2, s_pad), 3, v_pad)
    if a is not None:
        a = a[..., None]  # [B, H, N, 1]
    args = (codes.astype(jnp.int32), values, a, count, sum0)
    mean, total = batch_head_call(_prefix_call, st, args)
    return mean[..., :n_code, :d_v], total[..., :n_code, :d_v]
