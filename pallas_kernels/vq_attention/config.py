"""Tile sizes of the VQ-attention kernels: a frozen, validated dataclass that is
passed statically (it is hashable) to every kernel."""

from __future__ import annotations

import dataclasses


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Upper bounds for the tiles; each is clipped to the (padded) dimension.

    **Fields:**

    - `block_q`: query rows per program (must divide `block_len` once clipped).
    - `block_k`: window keys per inner-loop step (must divide `block_len`).
    - `block_code`: codebook rows per inner-loop step (codes are padded to a
      multiple of it with empty codes).
    - `block_v`: value columns per program (d_v is padded to a multiple).
    - `num_warps`, `num_stages`: Triton launch parameters (GPU only).
    - `vmem_limit_bytes`: Mosaic VMEM limit (TPU only; None = compiler default).
    - `min_tile`: smallest tile along any matmul dimension (16 on GPU, where
      Triton's `tl.dot` needs M, N, K >= 16): d_k, codes and d_v are padded up
      to it, and a block length below it is rejected.

    All tiles are powers of two: Triton needs power-of-two element counts, and
    TPU wants multiples of 128 on the lane dimension (the TPU preset uses 128).
    """

    block_q: int = 64
    block_k: int = 64
    block_code: int = 64
    block_v: int = 256
    num_warps: int = 4
    num_stages: int = 2
    vmem_limit_bytes: int | None = None
    min_tile: int = 1

    def __post_init__(self):
        for field in ("block_q", "block_k", "block_code", "block_v", "min_tile"):
            value = getattr(self, field)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not _is_pow2(value)
            ):
                raise ValueError(
                    f"BlockSizes.{field} must be a power of two; got {value!r}"
                )
        for field in ("block_q", "block_k", "block_code", "block_v"):
            if getattr(self, field) < self.min_tile:
                raise ValueError(
                    f"BlockSizes.{field}={getattr(self, field)} is below "
                    f"min_tile={self.min_tile}"
                )
        for field in ("num_warps", "num_stages"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"BlockSizes.{field} must be a positive int; got {value!r}"
                )

    @classmethod
    def for_platform(cls, platform: str) -> BlockSizes:
        """Defaults per platform ("gpu"/"cuda"/"rocm", "tpu", else interpret)."""
        if platform in ("gpu", "cuda", "rocm"):
            return cls(min_tile=16)
        if platform == "tpu":
            return cls(
                block_q=128,
                block_k=128,
                block_code=128,
                block_v=512,
                vmem_limit_bytes=64 * 1024 * 1024,
            )
        return cls()


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Concrete tiles for one call (after clipping and padding)."""

    block_len: int  # L
    block_q: int  # bq | L
    block_k: int  # bk | L
    block_code: int  # bc | S_pad
    block_v: int  # bv | V_pad
    codes: int  # S_pad
    d_k: int  # K_pad
    d_v: int  # V_pad


def resolve_tiles(
    sizes: BlockSizes, *, block_len: int, codes: int, d_k: int, d_v: int
) -> Tiles:
    """Clip tiles to the problem and compute padded dimensions."""
    bq = min(sizes.block_q, block_len)
    bk = min(sizes.block_k, block_len)
    if block_len < sizes.min_tile:
        raise ValueError(
            f"block_len={block_len} is below the smallest tile {sizes.min_tile} "
            f"of BlockSizes {sizes} (Triton dots need >= 16 rows)"
        )
    if block_len % bq or block_len % bk:
        raise ValueError(
            f"block_len={block_len} must be a multiple of the query tile {bq} and "
            f"the key tile {bk} (BlockSizes {sizes}); use a power-of-two block_len"
        )
    floor = sizes.min_tile
    bc = max(min(sizes.block_code, next_pow2(codes)), floor)
    bv = max(min(sizes.block_v, next_pow2(d_v)), floor)
    s_pad = -(-codes // bc) * bc
    v_pad = -(-d_v // bv) * bv
    k_pad = max(next_pow2(d_k), floor)
    return Tiles(block_len, bq, bk, bc, bv, s_pad, k_pad, v_pad)
