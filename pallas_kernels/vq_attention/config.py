"""Tile sizes and launch parameters of the VQ-attention kernels, and
`PallasConfig`, the one object the library takes for how the kernels run
(tiles, backward choice, interpret mode).

`BlockSizes` (frozen, validated, hashable: passed statically) holds what the
caller fixes; every field left `None` is filled per call by the rule of
`BlockSizes.platform` from the dtype and the problem's (d_k, d_v, codes,
block_len) in `resolve_tiles`, which returns the concrete `Tiles`.

The GPU rule (Triton on sm_90 / sm_80; every figure below from the
ahead-of-time compile gate, `benchmarks/aot_compile.py`, table in
docs/kernels.md):

- Per-thread registers are the binding limit (255 max, 4 warps = 128 threads
  per program). A float32 accumulator of `r x c` costs `r*c/128` registers per
  thread, so the largest live tiles are kept at <= 64 x 256 (forward `[bq, bv]`
  output accumulator) and <= 64 x 128 (`bwd_dq`'s `[bq, d_k]` dq accumulator).
- Shared memory is the other limit (227 KiB per block on sm_90, 163 KiB on
  sm_80): Triton keeps `num_stages` copies of every tile loaded inside a loop.
  `bwd_dq` therefore forms `dP = dO . V^T` by a loop over value chunks of
  `dq_block_dv` columns (never whole `[rows, d_v]` tiles): its working set is
  `stages * (bq + bk) * dq_block_dv * itemsize` plus the key tiles, independent
  of d_v.
- Tiles are powers of two and >= 16 (Triton dots), and wgmma (sm_90 tensor
  cores) wants 64-row operands: 64-row query tiles where registers allow.
- float32 inputs: dots use `float32_dots="bf16x6"` (six bfloat16 tensor-core
  products with float32 accumulation, ~float32 accuracy; see
  `_common.dot_precision`), not IEEE float32 FMA dots (`"highest"`), which run
  without tensor cores and spill. Each float32 operand lives as three bf16
  terms, so the float32 tiles are smaller: 32-row query tiles in the forward
  and `bwd_dq`, a 128-wide forward value tile, 16-key steps in `bwd_dq`.
- At least two key tiles per block (bf16 forward `block_k` 32 at block_len
  64): a one-step window loop is traced straight-line and spilled.
- sm_80 (`arch < 90`, mma.sync instead of wgmma) gets smaller tiles where the
  sm_90 ones spilled there.

Measured at d_k 32-128, d_v 256-1536, 64-512 codes, block 64-512 (the
official shape and the benchmarks' GPU presets); check other shapes with the
gate.

The TPU rule (Mosaic; every figure from the TPU gate, `benchmarks/aot_tpu.py`,
which runs libtpu's compiler on a CPU machine; table in docs/kernels.md):

- VMEM is the binding limit, and it differs by generation (`TPU_CHIPS`):
  16 MiB per core on v4, 64 MiB on v5p, 128 MiB on v5e and v6e. Mosaic keeps
  two buffers of every block (the next one is copied in while the current one
  is used), and `bwd_dq` reads whole `[block_len, d_v]` value blocks and the
  `[codes, d_v]` cache of its block: at the official shape in float32 that
  alone is 18 MiB. Where the estimate (`_dq_vmem_bytes`) exceeds the chip's
  budget, `bwd_dq` streams the value columns instead (`dq_stream_v`: a third,
  sequential grid axis over `dq_block_dv`-wide value chunks accumulating dP
  in VMEM scratch; only a `[rows, dq_block_dv]` slice of each value block is
  resident).
- Query, key and code tiles are the MXU's width (128 x 128 before v6, 256 x
  256 on v6e); value tiles 512 lanes. `vmem_limit_bytes` defaults to 3/4 of
  the chip's VMEM (Mosaic's own default is 16-32 MiB, below what the
  official shape's blocks need on v5e/v6e).
- The chip is the one being compiled for: the abstract mesh's device kind
  (ahead-of-time compiles, `use_abstract_mesh`), else the local TPU, else
  `BlockSizes.tpu` or v5e's rule.

Interpret mode (CPU) keeps one set of tiles for all kernels.

Which rule applies is decided when the program is lowered, not where it is
traced: `vq_attention_core` traces one variant per platform inside
`lax.platform_dependent`, so `jax.export` or an ahead-of-time compile for a
TPU from a CPU host gets the TPU's tiles.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

FLOAT32_DOTS = ("highest", "bf16x3", "bf16x6")
PLATFORMS = ("interpret", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class TpuChip:
    """What the TPU rule needs of a generation (per TensorCore)."""

    name: str
    vmem_bytes: int
    mxu: int  # systolic array width: the natural matmul tile


_MIB = 1024 * 1024
TPU_CHIPS = {
    "v2": TpuChip("v2", 16 * _MIB, 128),
    "v3": TpuChip("v3", 16 * _MIB, 128),
    "v4": TpuChip("v4", 16 * _MIB, 128),
    "v4i": TpuChip("v4i", 16 * _MIB, 128),
    "v5e": TpuChip("v5e", 128 * _MIB, 128),
    "v5p": TpuChip("v5p", 64 * _MIB, 128),
    "v6e": TpuChip("v6e", 128 * _MIB, 256),
    "v7x": TpuChip("v7x", 64 * _MIB, 256),
}
DEFAULT_TPU = "v5e"


def tpu_chip_of_kind(device_kind: str) -> str | None:
    """`TPU_CHIPS` key of a jax device kind ("TPU v5 lite" -> "v5e"), or None."""
    kind = device_kind.lower().replace("tpu", "").strip()
    table = {
        "v2": "v2",
        "v3": "v3",
        "v4": "v4",
        "v4 lite": "v4i",
        "v5 lite": "v5e",
        "v5e": "v5e",
        "v5": "v5p",
        "v5p": "v5p",
        "v6 lite": "v6e",
        "v6e": "v6e",
        "7x": "v7x",
        "v7x": "v7x",
        "v7": "v7x",
    }
    return table.get(kind)


def target_tpu_chip() -> str | None:
    """The TPU generation being compiled for: the abstract mesh's device
    (ahead-of-time compiles set one with `use_abstract_mesh`), else the
    local TPU's; None when neither is a TPU."""
    import jax

    get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    device = getattr(get_mesh(), "abstract_device", None) if get_mesh else None
    if device is not None and getattr(device, "platform", None) == "tpu":
        return tpu_chip_of_kind(device.device_kind)
    try:
        if jax.default_backend() == "tpu":
            return tpu_chip_of_kind(jax.devices()[0].device_kind)
    except RuntimeError:
        pass
    return None


_TILE_FIELDS = (
    "block_q",
    "block_k",
    "block_code",
    "block_v",
    "dq_block_q",
    "dq_block_k",
    "dq_block_code",
    "dq_block_dv",
    "kv_block_q",
    "kv_block_k",
    "kv_block_v",
)
_COUNT_FIELDS = ("num_warps", "dq_num_warps", "kv_num_warps", "num_stages")
# A backward tile left None follows the caller's forward tile of the same role
# (so BlockSizes(block_q=4) shrinks every kernel), else the platform rule.
_FOLLOWS = {
    "dq_block_q": "block_q",
    "dq_block_k": "block_k",
    "dq_block_code": "block_code",
    "dq_block_dv": "block_v",
    "kv_block_q": "block_q",
    "kv_block_k": "block_k",
    "kv_block_v": "block_v",
    "dq_num_warps": "num_warps",
    "kv_num_warps": "num_warps",
}


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


# `pl.next_power_of_2` and `pl.cdiv` on Python ints: the library imports this
# module for its config classes, and leaves importing Pallas to the kernels.
def _next_pow2(x: int) -> int:
    return 1 if x == 0 else 2 ** (x - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Upper bounds for the tiles (each is clipped to the padded dimension);
    `None` = chosen by the platform's rule (module docstring).

    **Fields:**

    - `block_q`, `block_k`, `block_code`, `block_v`: forward query rows per
      program, window keys and codebook rows per inner-loop step, value
      columns per program.
    - `dq_block_q`, `dq_block_k`, `dq_block_code`: the same for the query-side
      backward kernel `bwd_dq`; `dq_block_dv`: value columns per step of its
      `dO . V^T` loop.
    - `kv_block_q`, `kv_block_k`, `kv_block_v`: key-side backward kernels
      (`bwd_dk`, `bwd_dv`, `bwd_dmean`): query rows per loop step, key (or
      code) rows per program, value columns per program.
    - `num_warps`, `dq_num_warps`, `kv_num_warps`, `num_stages`: Triton launch
      parameters (GPU only) of the forward, `bwd_dq` and the key-side kernels.
    - `float32_dots`: how float32 operands are multiplied ("highest": IEEE
      float32; "bf16x3" / "bf16x6": 3 / 6 bfloat16 tensor-core products).
    - `vmem_limit_bytes`: Mosaic VMEM limit (TPU only; None = 3/4 of the
      chip's VMEM).
    - `dq_stream_v`: `bwd_dq` streams value columns through a sequential grid
      axis (TPU only; None = where whole value blocks would not fit VMEM).
    - `tpu`: TPU generation the rule tunes for (a `TPU_CHIPS` key, e.g.
      "v5e"); None = the chip being compiled for, else v5e.
    - `min_tile`: smallest tile along any matmul dimension (16 on GPU, where
      Triton's `tl.dot` needs M, N, K >= 16): d_k, codes and d_v are padded up
      to it, and a block length below it is rejected.
    - `platform`: whose rule fills the `None` fields ("interpret", "gpu", "tpu").
    - `arch`: GPU compute capability the rule tunes for (90: sm_90 / H100,
      80: sm_80 / A100); None = the local GPU's when jax runs on one, else 90.

    Block length, query and key tiles must divide `block_len`. All tiles are
    powers of two: Triton needs power-of-two element counts, and TPU wants
    multiples of 128 on the lane dimension (the TPU rule uses 128).
    """

    block_q: int | None = None
    block_k: int | None = None
    block_code: int | None = None
    block_v: int | None = None
    dq_block_q: int | None = None
    dq_block_k: int | None = None
    dq_block_code: int | None = None
    dq_block_dv: int | None = None
    kv_block_q: int | None = None
    kv_block_k: int | None = None
    kv_block_v: int | None = None
    num_warps: int | None = None
    dq_num_warps: int | None = None
    kv_num_warps: int | None = None
    num_stages: int | None = None
    float32_dots: str | None = None
    vmem_limit_bytes: int | None = None
    dq_stream_v: bool | None = None
    min_tile: int = 1
    platform: str = "interpret"
    arch: int | None = None
    tpu: str | None = None

    def __post_init__(self):
        if self.arch is not None and (
            isinstance(self.arch, bool) or not isinstance(self.arch, int)
        ):
            raise ValueError(f"BlockSizes.arch must be an int; got {self.arch!r}")
        if self.tpu is not None and self.tpu not in TPU_CHIPS:
            raise ValueError(
                f"BlockSizes.tpu must be one of {tuple(TPU_CHIPS)}; got {self.tpu!r}"
            )
        if self.platform not in PLATFORMS:
            raise ValueError(
                f"BlockSizes.platform must be one of {PLATFORMS}; got {self.platform!r}"
            )
        for field in (*_TILE_FIELDS, "min_tile"):
            value = getattr(self, field)
            if value is None and field != "min_tile":
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not _is_pow2(value)
            ):
                raise ValueError(
                    f"BlockSizes.{field} must be a power of two; got {value!r}"
                )
            if field != "min_tile" and value < self.min_tile:
                raise ValueError(
                    f"BlockSizes.{field}={value} is below min_tile={self.min_tile}"
                )
        for field in _COUNT_FIELDS:
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"BlockSizes.{field} must be a positive int; got {value!r}"
                )
        if self.dq_stream_v is not None and not isinstance(self.dq_stream_v, bool):
            raise ValueError(
                f"BlockSizes.dq_stream_v must be a bool or None; got "
                f"{self.dq_stream_v!r}"
            )
        if self.float32_dots is not None and self.float32_dots not in FLOAT32_DOTS:
            raise ValueError(
                f"BlockSizes.float32_dots must be one of {FLOAT32_DOTS}; "
                f"got {self.float32_dots!r}"
            )

    @classmethod
    def for_platform(cls, platform: str, **fixed) -> BlockSizes:
        """The rule of a platform ("gpu"/"cuda"/"rocm", "tpu", else
        interpret), with `fixed` fields overriding it."""
        if platform in ("gpu", "cuda", "rocm"):
            return cls(min_tile=16, platform="gpu", **fixed)
        if platform == "tpu":
            return cls(platform="tpu", **fixed)
        return cls(**fixed)


Backward = Literal["kernels", "xla"]
BACKWARDS: tuple[str, ...] = get_args(Backward)
CachePrefix = Literal["xla", "kernel"]
CACHE_PREFIXES: tuple[str, ...] = get_args(CachePrefix)


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """How the VQ-attention kernels run (frozen and hashable: a static
    argument under `jit`). Changes speed and debugging, never the math."""

    block_sizes: BlockSizes | None = None
    """Tile sizes and launch parameters (`BlockSizes`); None = the rule of the
    platform the program runs on (`BlockSizes.for_platform(jax.default_backend())`).
    On the command line: a config file's `[model.pallas.block_sizes]` table."""
    backward: Backward = "kernels"
    """kernels: the backward kernels; xla: differentiate the linear-time XLA form
    of the kernel forward (a debugging aid that isolates the backward kernels)."""
    interpret: bool | None = None
    """Pallas interpret mode: None = exactly when not lowered for cuda/rocm/tpu
    (so on CPU); True = everywhere (debugging on a GPU); False = never."""
    cache_prefix: CachePrefix = "xla"
    """How the cache every block reads is made: "xla" (block sums, their
    prefix over blocks and the division to means as XLA passes over float32
    `[N, S, V]` arrays) or "kernel" (one kernel keeps the running sums in
    registers and writes only the means; `prefix.py`). The same numbers up to
    summation order; "kernel" runs on GPU and in interpret mode, XLA on TPU.
    "xla" stays the default until GPU timings favour the kernel."""

    def __post_init__(self):
        if isinstance(self.block_sizes, dict):  # from `dataclasses.asdict`
            object.__setattr__(self, "block_sizes", BlockSizes(**self.block_sizes))
        if self.block_sizes is not None and not isinstance(
            self.block_sizes, BlockSizes
        ):
            raise ValueError(
                f"PallasConfig.block_sizes must be a BlockSizes or None; got "
                f"{self.block_sizes!r}"
            )
        if self.backward not in BACKWARDS:
            raise ValueError(
                f"PallasConfig.backward must be one of {BACKWARDS}; got "
                f"{self.backward!r}"
            )
        if self.cache_prefix not in CACHE_PREFIXES:
            raise ValueError(
                f"PallasConfig.cache_prefix must be one of {CACHE_PREFIXES}; got "
                f"{self.cache_prefix!r}"
            )
        if self.interpret is not None and not isinstance(self.interpret, bool):
            raise ValueError(
                f"PallasConfig.interpret must be a bool or None; got {self.interpret!r}"
            )


@dataclasses.dataclass(frozen=True)
class KernelTiles:
    """Tiles and launch parameters of one kernel."""

    block_q: int
    block_k: int
    block_code: int
    block_v: int
    num_warps: int


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Concrete tiles for one call (after the rule, clipping and padding)."""

    block_len: int  # L
    codes: int  # S_pad (a multiple of every code tile)
    d_k: int  # K_pad
    d_v: int  # V_pad (a multiple of every value tile)
    fwd: KernelTiles
    dq: KernelTiles  # block_v = the dO . V^T value chunk
    kv: KernelTiles  # block_k = key rows (dk, dv) / block_code = code rows (dmean)
    num_stages: int
    float32_dots: str
    vmem_limit_bytes: int | None = None  # TPU only
    dq_stream_v: bool = False  # bwd_dq's value columns on a grid axis (TPU)

    # The forward's tiles under their historical names.
    @property
    def block_q(self) -> int:
        return self.fwd.block_q

    @property
    def block_k(self) -> int:
        return self.fwd.block_k

    @property
    def block_code(self) -> int:
        return self.fwd.block_code

    @property
    def block_v(self) -> int:
        return self.fwd.block_v


def local_arch(default: int = 90) -> int:
    """Compute capability of the first local GPU (e.g. 90), else `default`."""
    import jax

    try:
        if jax.default_backend() == "gpu":
            cc = getattr(jax.devices()[0], "compute_capability", None)
            if cc:
                major, _, minor = str(cc).partition(".")
                return int(major) * 10 + int(minor or 0)
    except (RuntimeError, ValueError):
        pass
    return default


def rule(
    platform: str,
    *,
    float32: bool,
    block_len: int,
    codes: int,
    d_k: int,
    d_v: int,
    arch: int = 90,
    chip: str = DEFAULT_TPU,
) -> dict:
    """Default tiles and launch parameters of a platform (module docstring).

    Returns a dict over BlockSizes' fields; `resolve_tiles` clips every tile
    to the problem afterwards."""
    del codes  # clipping handles small codebooks
    if platform == "tpu":
        mxu = TPU_CHIPS[chip].mxu
        tiles: dict[str, int] = dict.fromkeys(("block_q", "block_k", "block_code"), mxu)
        tiles["block_v"] = 512
        base = dict(num_warps=4, num_stages=2, float32_dots="highest")
    elif platform == "gpu":
        wide_k = d_k > 64  # the [bq, d_k] operands and dq accumulator grow
        if not float32:
            tiles = dict(
                block_q=64,
                # At least two key tiles per block: a single-step window loop
                # is traced straight-line and the compiler then keeps more
                # tiles live (the forward spilled at block_len 64, bk 64).
                block_k=64 if block_len > 64 else 32,
                block_code=64,
                block_v=256,
                dq_block_q=64,
                dq_block_k=32 if wide_k else 64,
                dq_block_code=32 if wide_k else 64,
                dq_block_dv=64,
                kv_block_q=64,
                kv_block_k=64,
                kv_block_v=128,
            )
            base = dict(
                num_warps=4,
                dq_num_warps=8 if wide_k else 4,
                kv_num_warps=4,
                num_stages=2,
                float32_dots="bf16x6",
            )
        else:
            tiles = dict(
                block_q=32,
                block_k=32,
                block_code=32,
                block_v=128,
                dq_block_q=32,
                dq_block_k=16,
                dq_block_code=16,
                dq_block_dv=32,
                kv_block_q=32,
                kv_block_k=64,
                kv_block_v=64,
            )
            base = dict(
                num_warps=4,
                dq_num_warps=4,
                kv_num_warps=4,
                num_stages=2,
                float32_dots="bf16x6",
            )
        if arch < 90:
            # sm_80 and older: mma.sync (no wgmma, so no 64-row minimum) keeps
            # accumulators differently and the sm_90 tiles spill; smaller
            # query / key tiles remove every spill the gate showed.
            if not float32:
                tiles.update(block_v=128, dq_block_q=32, dq_block_k=32)
            else:
                tiles.update(block_k=16, block_code=16, kv_block_q=16)
        del d_v
    else:
        tiles = dict(block_q=64, block_k=64, block_code=64, block_v=256)
        base = dict(num_warps=4, num_stages=2, float32_dots="highest")
    return {**tiles, **base}


def resolve_tiles(
    sizes: BlockSizes,
    *,
    block_len: int,
    codes: int,
    d_k: int,
    d_v: int,
    float32: bool = False,
) -> Tiles:
    """Fill `None` fields by the rule, clip tiles to the problem, and compute
    the padded dimensions."""
    arch, chip = _target(sizes)
    defaults = rule(
        sizes.platform,
        float32=float32,
        block_len=block_len,
        codes=codes,
        d_k=d_k,
        d_v=d_v,
        arch=arch,
        chip=chip,
    )
    if block_len < sizes.min_tile:
        raise ValueError(
            f"block_len={block_len} is below the smallest tile {sizes.min_tile} "
            f"of BlockSizes {sizes} (Triton dots need >= 16 rows)"
        )
    floor = sizes.min_tile
    code_cap = max(_next_pow2(codes), floor)
    v_cap = max(_next_pow2(d_v), floor)
    pick = _Picker(sizes, defaults, block_len=block_len, code_cap=code_cap, v_cap=v_cap)
    fwd = pick.kernel("block_q", "block_k", "block_code", "block_v", "num_warps")
    dq = pick.kernel(
        "dq_block_q", "dq_block_k", "dq_block_code", "dq_block_dv", "dq_num_warps"
    )
    # dmean: kv_block_k code rows per program.
    kv = pick.kernel("kv_block_q", "kv_block_k", "kv_block_k", "kv_block_v",
                     "kv_num_warps")  # fmt: skip
    vmem_limit, stream = None, bool(sizes.dq_stream_v)  # as asked, off TPU
    if sizes.platform == "tpu":
        vmem_limit = sizes.vmem_limit_bytes or _default_vmem_limit(chip)
        dq, stream = _fit_dq_to_vmem(
            dq, sizes, vmem_limit, block_len=block_len, codes=code_cap, d_k=d_k,
            d_v=v_cap, itemsize=4 if float32 else 2,
        )  # fmt: skip
    code_tile = max(fwd.block_code, dq.block_code, kv.block_code)
    v_tile = max(fwd.block_v, dq.block_v, kv.block_v)  # powers of two: the lcm
    return Tiles(
        block_len=block_len,
        codes=_cdiv(codes, code_tile) * code_tile,
        d_k=max(_next_pow2(d_k), floor),
        d_v=_cdiv(d_v, v_tile) * v_tile,
        fwd=fwd,
        dq=dq,
        kv=kv,
        num_stages=pick("num_stages"),
        float32_dots=pick("float32_dots"),
        vmem_limit_bytes=vmem_limit,
        dq_stream_v=bool(stream),
    )


def _target(sizes: BlockSizes) -> tuple[int, str]:
    """The GPU arch and TPU chip whose rule fills `sizes`' None fields."""
    arch = sizes.arch
    if arch is None:
        arch = local_arch() if sizes.platform == "gpu" else 90
    chip = sizes.tpu
    if chip is None and sizes.platform == "tpu":
        chip = target_tpu_chip()
    return arch, chip or DEFAULT_TPU


class _Picker:
    """One field of `BlockSizes` resolved: the caller's value, else the one of
    the field it follows (`_FOLLOWS`), else the rule's."""

    def __init__(self, sizes, defaults, *, block_len: int, code_cap, v_cap):
        self.sizes, self.defaults, self.block_len = sizes, defaults, block_len
        self.code_cap, self.v_cap = code_cap, v_cap

    def __call__(self, field: str):
        sizes, defaults = self.sizes, self.defaults
        value = getattr(sizes, field)
        if value is None and field in _FOLLOWS:
            value = getattr(sizes, _FOLLOWS[field])
        if value is None:
            value = defaults.get(field)
        if value is None and field in _FOLLOWS:
            value = defaults[_FOLLOWS[field]]
        # `rule` covers every field or the field it follows.
        assert value is not None, f"no default for {field} on {sizes.platform}"
        return value

    def rows(self, field: str) -> int:
        """A tile along the block: at most `block_len`, and must divide it."""
        value = min(self(field), self.block_len)
        if self.block_len % value:
            raise ValueError(
                f"block_len={self.block_len} must be a multiple of the query tile "
                f"and the key tile ({field}={value}, BlockSizes {self.sizes}); use "
                "a power-of-two block_len"
            )
        return value

    def capped(self, field: str, cap: int) -> int:
        return max(min(self(field), cap), self.sizes.min_tile)

    def kernel(self, q: str, k: str, code: str, v: str, warps: str) -> KernelTiles:
        """One kernel's tiles from these fields (codes and values capped at
        the problem's, rounded up to powers of two)."""
        return KernelTiles(
            self.rows(q),
            self.rows(k),
            self.capped(code, self.code_cap),
            self.capped(v, self.v_cap),
            self(warps),
        )


def _default_vmem_limit(chip: str) -> int:
    """Scoped VMEM for every kernel: the chip's VMEM less headroom for
    Mosaic's own scratch (an eighth, at least 2 MiB)."""
    vmem = TPU_CHIPS[chip].vmem_bytes
    return vmem - max(vmem // 8, 2 * _MIB)


def dq_vmem_bytes(
    kt: KernelTiles, *, stream: bool, block_len: int, codes: int, d_k: int,
    d_v: int, itemsize: int,
) -> int:  # fmt: skip
    """Estimated VMEM of `bwd_dq` on TPU: two buffers of every block (the
    pipeline copies the next in while the current is used), plus the dP
    scratch when streaming value columns. Rows of a per-row vector occupy
    a whole 128-lane line; float32 side inputs/outputs are 4 bytes."""
    L, bq, S = block_len, kt.block_q, codes
    width = kt.block_v if stream else d_v  # value columns resident
    blocks = (
        bq * d_k * itemsize  # q
        + 2 * L * d_k * itemsize  # previous and current keys
        + 2 * L * width * itemsize  # previous and current values
        + S * d_k * itemsize  # codebook
        + S * width * itemsize  # the block's cache means
        + 8 * S * 4  # cache bias (one row, 8 sublanes)
        + bq * 2 * L * 4  # window bias
        + bq * width * itemsize  # dO
        + 3 * bq * 128 * 4  # lse, delta, document start
        + bq * d_k * itemsize  # dq
        + 2 * bq * 2 * L * itemsize  # P and dS of the window
        + bq * S * itemsize  # P of the codes
        + bq * 2 * L * 4  # float32 d(window bias)
    )
    scratch = bq * (S + 2 * L) * 4 if stream else 0
    return 2 * blocks + scratch + bq * d_k * 4


def _fit_dq_to_vmem(
    dq: KernelTiles, sizes: BlockSizes, limit: int, **dims
) -> tuple[KernelTiles, bool]:
    """`bwd_dq`'s tiles within the VMEM `limit` (with a tenth spare): whole
    value blocks if they fit (or `sizes.dq_stream_v` is False), else value
    columns streamed in the widest chunk that fits, halving the query tile
    if none does. The caller's explicit tiles are kept as given."""

    def fits(kt, stream):
        return dq_vmem_bytes(kt, stream=stream, **dims) <= 0.9 * limit

    if sizes.dq_stream_v is False or (sizes.dq_stream_v is None and fits(dq, False)):
        return dq, False
    if sizes.dq_block_dv is not None:
        return dq, True
    fixed_q = sizes.dq_block_q is not None or sizes.block_q is not None
    kt = dq
    while True:
        for bv in (512, 256, 128):
            cand = dataclasses.replace(kt, block_v=min(bv, dims["d_v"]))
            if fits(cand, True):
                return cand, True
        if fixed_q or kt.block_q <= 8:
            return dataclasses.replace(kt, block_v=min(128, dims["d_v"])), True
        kt = dataclasses.replace(kt, block_q=kt.block_q // 2)
