"""Ahead-of-time compile gate for the Pallas VQ-attention kernels, on CPU.

Interpret mode and jax's cross-lowering prove neither that a kernel compiles
for a GPU nor that it fits one. This tool goes all the way to the SASS
statistics without a GPU:

1. lower the forward and backward of `vq_attention_pallas` for cuda from CPU
   (an abstract H100 device, `lowering_platforms=("cuda",)`);
2. pull every `__gpu$xla.gpu.triton` custom call out of the StableHLO: kernel
   name, the serialized Triton module (MLIR bytecode), num_warps, num_stages;
3. parse that module with jaxlib's MLIR bindings and verify it (what XLA does
   first; an invalid module fails here);
4. compile it with the pip `triton` package's CUDA backend (ttir -> ttgir ->
   llir -> ptx) and ptxas (`-v`) for sm_90a / sm_80, one subprocess per kernel
   with a time limit, and report per kernel: status or the exact compiler
   error, registers, spill bytes, shared memory, CTAs per SM.

XLA compiles the same modules with its own copy of Triton, so the figures are
an estimate of what a GPU will see, not a bit-exact copy (the pass pipeline is
upstream Triton's); errors of the kinds that matter (invalid IR, shared memory
over the limit, ptxas failures, spills) show up the same way.

Needs the `aot` extra (`pip install -e .[aot]`: the `triton` wheel, which
bundles ptxas). Usage:

    python benchmarks/aot_compile.py                      # official shape, bf16+f32
    python benchmarks/aot_compile.py --shapes all --arch 90,80 --markdown out.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# (B, T, H, d_k, d_v, codes, block_len): the official configuration and the
# shapes of the GPU presets in benchmarks/ (registry.py: scaling, decode,
# quality; kernels.py's --d-v default with --d-k 64 as in gpu_check.sh).
SHAPES = {
    "official": (1, 2048, 1, 128, 1536, 512, 512),
    "scaling-gpu": (1, 2048, 1, 64, 256, 256, 512),
    "decode-gpu": (1, 512, 1, 64, 256, 256, 64),
    "quality-gpu": (8, 256, 1, 32, 256, 64, 64),
    "multihead": (2, 1024, 4, 64, 128, 256, 256),
}
DTYPES = ("bfloat16", "float32")

# Per-SM and per-block limits (CUDA occupancy calculator / programming guide).
ARCH_LIMITS = {
    90: dict(
        regs_per_sm=65536,
        smem_per_sm=228 * 1024,
        smem_per_block=227 * 1024,
        threads_per_sm=2048,
        ctas_per_sm=32,
    ),
    80: dict(
        regs_per_sm=65536,
        smem_per_sm=164 * 1024,
        smem_per_block=163 * 1024,
        threads_per_sm=2048,
        ctas_per_sm=32,
    ),
}
SMEM_RESERVED_PER_CTA = 1024  # the driver reserves 1 KiB per CTA (sm_80+)
TRITON_CALL = "__gpu$xla.gpu.triton"


@dataclasses.dataclass
class TritonCall:
    """One Triton custom call of a lowered program."""

    name: str
    module: bytes  # MLIR bytecode of the Triton module
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


@dataclasses.dataclass
class KernelReport:
    name: str
    arch: int
    status: str  # "ok", "verify-failed", "compile-failed", "timeout"
    error: str = ""
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    ctas_per_sm: int | None = None
    num_warps: int = 0
    num_stages: int = 0
    seconds: float = 0.0

    @property
    def spills(self) -> int | None:
        if self.spill_stores is None:
            return None
        return self.spill_stores + self.spill_loads

    def fits(self) -> bool:
        return (
            self.status == "ok"
            and self.shared is not None
            and self.shared <= ARCH_LIMITS[self.arch]["smem_per_block"]
        )


# --------------------------------------------------------------------- lowering
# Abstract devices to lower for, from a CPU-only machine (the shared Pallas
# notes): the Triton lowering asks for a GPU kind.
TPU_DEVICE = ("TPU v5p", 1)


def lower(
    shape,
    dtype,
    *,
    platform: str = "cuda",
    rel: bool = True,
    use_cache: bool = True,
    cache_grad: bool = True,
    window_len: int | None = None,
    documents: bool = False,
    block_sizes=None,
    device_kind: str = "NVIDIA H100 80GB HBM3",
    cache_prefix: str = "xla",
    cache_decay: float = 1.0,
    tpu_device=None,
):
    """Lower value_and_grad of a loss over `vq_attention_pallas` for `platform`
    ("cuda": Triton, or "tpu": Mosaic) from any machine; nothing runs.

    Returns the `jax.stages.Lowered`. Tiles: the platform's rule of
    `pallas_kernels/vq_attention/config.py` (GPU: for sm_90) unless
    `block_sizes` is given. The loss reads the output and the new state's
    cache, so every forward and backward kernel is in the program.
    `documents`: with packed-document masking (`doc_starts`: the forward
    and dq kernels read each query's document start). `cache_prefix`:
    `PallasConfig.cache_prefix` ("kernel": the cache prefix kernel too).
    `cache_decay` < 1: the decayed cache. `tpu_device`: a device of a libtpu
    topology (`benchmarks/_libtpu.py`): the arguments are placed on it so
    `.compile()` runs libtpu's compiler, and the tiles are the rule of its
    generation (resolved by the op for the target; `block_sizes` None)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    from pallas_kernels.vq_attention import BlockSizes, PallasConfig
    from tvq_eqx.ops import vq_attention_pallas

    if platform == "cuda":
        device = AbstractDevice(device_kind, 132, "cuda")
        if block_sizes is None:
            block_sizes = BlockSizes.for_platform("gpu", arch=90)
    elif platform == "tpu":
        kind = TPU_DEVICE[0] if tpu_device is None else tpu_device.device_kind
        device = AbstractDevice(kind, 1, "tpu")
    else:
        raise ValueError(f"platform must be 'cuda' or 'tpu'; got {platform!r}")

    b, t, h, k, v, s, blk = shape
    dtype = jnp.dtype(dtype)
    placed = {}
    if tpu_device is not None:
        placed["sharding"] = jax.sharding.SingleDeviceSharding(tpu_device)

    def sds(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, **placed)

    args = (
        sds((b, t, h, k), dtype),
        sds((b, t, h, k), dtype),
        sds((b, t, h, v), dtype),
        sds((h, s, k), jnp.float32),
        sds((b, t, h, k), dtype),
        sds((blk + 1, h, k), dtype),
        sds((b, t), jnp.bool_) if documents else None,
    )

    def loss(q, key, val, codebook, rq, rt, doc_starts):
        extra = dict(rel_query=rq, rel_table=rt) if rel else {}
        out, state = vq_attention_pallas(
            q,
            key,
            val,
            codebook,
            block_len=blk,
            scale=k**-0.5,
            use_cache=use_cache,
            cache_grad=cache_grad,
            pallas=PallasConfig(block_sizes=block_sizes, cache_prefix=cache_prefix),
            window_len=window_len,
            doc_starts=doc_starts,
            cache_decay=cache_decay,
            **extra,
        )
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(
            state.cache_mean.astype(jnp.float32)
        )

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 4, 5)))
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*Pallas Triton backend is deprecated"
        )
        with use_abstract_mesh(AbstractMesh((), (), abstract_device=device)):
            return fn.trace(*args).lower(lowering_platforms=(platform,))


def triton_calls(lowered) -> list[TritonCall]:
    """Every Triton custom call of a lowered program (first of each name)."""
    from jaxlib.mlir import ir

    module = lowered.compiler_ir("stablehlo")
    with module.context:
        found: dict[str, TritonCall] = {}

        def visit(op):
            op = op.operation if hasattr(op, "operation") else op
            if op.name == "stablehlo.custom_call":
                target = ir.StringAttr(op.attributes["call_target_name"]).value
                if target == TRITON_CALL:
                    cfg = ir.DictAttr(op.attributes["mhlo.backend_config"])
                    name = ir.StringAttr(cfg["name"]).value
                    grid = tuple(ir.IntegerAttr(cfg[f"grid_{a}"]).value for a in "xyz")
                    found.setdefault(
                        name,
                        TritonCall(
                            name=name,
                            module=ir.StringAttr(cfg["ir"]).value_bytes,
                            num_warps=ir.IntegerAttr(cfg["num_warps"]).value,
                            num_stages=ir.IntegerAttr(cfg["num_stages"]).value,
                            grid=grid,
                        ),
                    )
            for region in op.regions:
                for block in region.blocks:
                    for child in block.operations:
                        visit(child)

        visit(module.operation)
    return list(found.values())


def verify_module(call: TritonCall) -> str:
    """Parse and verify a Triton module with jaxlib's MLIR bindings (the
    dialects XLA registers); returns its text. Raises ValueError with the
    verifier's message if it is invalid."""
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, scf  # noqa: F401
    from jaxlib.triton import dialect as tt_dialect

    ctx = ir.Context()
    from jax._src.interpreters.mlir import upstream_dialects

    ctx.append_dialect_registry(upstream_dialects)
    ctx.load_all_available_dialects()
    tt_dialect.register_dialect(ctx)
    with ctx:
        ctx.allow_unregistered_dialects = False
        try:
            # The bytecode is parsed without verification, then verified, so a
            # failure carries the verifier's diagnostic.
            module = ir.Module.parse(call.module)
        except ir.MLIRError as e:
            raise ValueError(f"{call.name}: {_mlir_message(e)}") from None
        try:
            module.operation.verify()
        except ir.MLIRError as e:
            raise ValueError(f"{call.name}: {_mlir_message(e)}") from None
        return module.operation.get_asm(enable_debug_info=False)


def _mlir_message(e) -> str:
    diags = getattr(e, "error_diagnostics", None) or []
    if diags:
        return "; ".join(str(d.message) for d in diags)
    return str(e).splitlines()[0]


# -------------------------------------------------------------------- compiling
def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> int:
    """CTAs per SM from registers, shared memory and threads."""
    lim = ARCH_LIMITS[arch]
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = lim["regs_per_sm"] // (regs_per_warp * num_warps)
    by_smem = (
        lim["smem_per_sm"] // (shared + SMEM_RESERVED_PER_CTA)
        if shared <= lim["smem_per_block"]
        else 0
    )
    by_threads = lim["threads_per_sm"] // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, lim["ctas_per_sm"]))


_PTXAS_STATS = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, "
    r"(?P<ld>\d+) bytes spill loads"
)
_PTXAS_REGS = re.compile(r"Used (?P<regs>\d+) registers")


def _compile_worker(ttir_path: str, arch: int, num_warps: int, num_stages: int):
    """Runs in a subprocess: ttir -> ptx with triton, then ptxas -v. Prints
    one JSON line."""
    import triton
    from triton._C.libtriton import ir as tir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    options = backend.parse_options(dict(num_warps=num_warps, num_stages=num_stages))
    ctx = tir.context()
    tir.load_dialects(ctx)
    backend.load_dialects(ctx)
    module = tir.parse_mlir_module(ttir_path, ctx)
    module.context = ctx
    stages: dict = {}
    backend.add_stages(stages, options, triton.compiler.compiler.Language.TRITON)
    metadata = {"target": target, **options.__dict__}
    for ext in ("ttir", "ttgir", "llir", "ptx"):
        module = stages[ext](module, metadata)
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(module)
        proc = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={sm}", ptx, "-o", ptx + ".o"],
            capture_output=True,
            text=True,
        )
    if proc.returncode:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {proc.stderr.strip()}")
    log = proc.stderr
    regs = _PTXAS_REGS.search(log)
    stats = _PTXAS_STATS.search(log)
    print(
        json.dumps(
            dict(
                registers=int(regs["regs"]) if regs else None,
                spill_stores=int(stats["st"]) if stats else 0,
                spill_loads=int(stats["ld"]) if stats else 0,
                shared=int(metadata.get("shared", 0)),
            )
        )
    )


def compile_call(call: TritonCall, arch: int, *, timeout: float = 600) -> KernelReport:
    """Verify, then compile one kernel in a subprocess (bounded time)."""
    rep = KernelReport(
        call.name, arch, "ok", num_warps=call.num_warps, num_stages=call.num_stages
    )
    t0 = time.time()
    try:
        text = verify_module(call)
    except ValueError as e:
        rep.status, rep.error = "verify-failed", str(e)
        return rep
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{call.name}.ttir")
        with open(path, "w") as f:
            f.write(text)
        env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(tmp, "cache"))
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--compile-one",
                    path,
                    str(arch),
                    str(call.num_warps),
                    str(call.num_stages),
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
            )
        except subprocess.TimeoutExpired:
            rep.status, rep.error = "timeout", f"no result within {timeout:.0f} s"
            rep.seconds = time.time() - t0
            return rep
    rep.seconds = time.time() - t0
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        rep.status = "compile-failed"
        rep.error = _last_error(proc.stderr)
        return rep
    stats = json.loads(lines[-1])
    rep.registers = stats["registers"]
    rep.spill_stores, rep.spill_loads = stats["spill_stores"], stats["spill_loads"]
    rep.shared = stats["shared"]
    rep.ctas_per_sm = occupancy(arch, rep.registers or 0, rep.shared, call.num_warps)
    if rep.shared > ARCH_LIMITS[arch]["smem_per_block"]:
        rep.status = "over-smem"
        rep.error = (
            f"shared memory {rep.shared} B > {ARCH_LIMITS[arch]['smem_per_block']} B"
        )
    return rep


def _last_error(stderr: str) -> str:
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if re.search(r"error|Error|failed|out of resource", lines[i]):
            return " ".join(lines[i : i + 3])[:500]
    return " ".join(lines[-3:])[:500]


# -------------------------------------------------------------------- roofline
H100 = dict(bf16_flops=989e12, hbm_bytes=3.35e12)
CUDNN_FWD_FLOPS = 550e12  # cuDNN flash attention forward, head dim 128, H100


def avg_current_keys(L: int, bq: int, bk: int) -> float:
    """Current-block keys a query row computes on average: the key tiles at
    or below the diagonal of its query tile."""
    if L // bk == 1:
        return float(L)
    tiles = [-(-(r0 + bq) // bk) for r0 in range(0, L, bq)]
    return sum(tiles) * bk / len(tiles)


def kernel_costs(shape, dtype: str, *, rel: bool = True) -> list[dict]:
    """FLOPs executed and compulsory HBM bytes per query token of each kernel
    (multiply-add = 2 FLOPs; every array read or written once per kernel,
    re-reads of shared tiles assumed to hit L2), with the tiles of the GPU
    rule. Returns rows with name, flops, useful_flops, bytes."""
    import jax.numpy as jnp

    from pallas_kernels.vq_attention import BlockSizes
    from pallas_kernels.vq_attention.config import resolve_tiles

    _, _, _, k, v, s, L = shape
    f32 = dtype == "float32"
    t = resolve_tiles(
        BlockSizes.for_platform("gpu"), block_len=L, codes=s, d_k=k, d_v=v, float32=f32
    )
    K, V, S = t.d_k, t.d_v, t.codes
    e = jnp.dtype(dtype).itemsize
    wb = 2 * L * 4 if rel else 0  # float32 window bias row
    useful_keys = s + 1.5 * L
    rows = []
    # forward: Q K^T is recomputed for every value tile of the grid
    fwd_keys = S + L + avg_current_keys(L, t.fwd.block_q, t.fwd.block_k)
    n_v = V // t.fwd.block_v
    rows.append(
        dict(
            name="vq_attention_fwd",
            flops=2 * fwd_keys * (n_v * K + V),
            useful_flops=2 * useful_keys * (k + v),
            bytes=e * (2 * K + 2 * V + S * V / L) + S * 4 / L + wb + 4,
        )
    )
    dq_keys = S + L + avg_current_keys(L, t.dq.block_q, t.dq.block_k)
    stored = 2 * (2 * L) * e + S * e  # P_win, dS_win, P_code written
    rows.append(
        dict(
            name="vq_attention_bwd_dq",
            flops=2 * dq_keys * (2 * K + V),
            useful_flops=2 * useful_keys * (2 * k + v),
            bytes=e * (3 * K + 2 * V + S * V / L)
            + S * 4 / L
            + wb
            + 8
            + stored
            + (wb if rel and not f32 else 0),
        )
    )
    rows.append(
        dict(
            name="vq_attention_bwd_dk",
            flops=2 * 1.5 * L * K,
            useful_flops=2 * 1.5 * L * k,
            bytes=e * (2 * L + 2 * K),
        )
    )
    rows.append(
        dict(
            name="vq_attention_bwd_dv",
            flops=2 * 1.5 * L * V,
            useful_flops=2 * 1.5 * L * v,
            bytes=e * (2 * L + 2 * V),
        )
    )
    rows.append(
        dict(
            name="vq_attention_bwd_dmean",
            flops=2 * S * V,
            useful_flops=2 * s * v,
            bytes=e * (S + V + S * V / L),
        )
    )
    return rows


def roofline_table(shape_names, dtypes) -> str:
    """Markdown: per kernel and token, FLOPs, bytes, intensity and the H100
    roofline time; per shape the forward's roofline against cuDNN's dense
    causal forward at T = 2k and 32k."""
    lines = [
        "| shape | dtype | kernel | FLOPs/token (executed) | useful | bytes/token "
        "| FLOP/B | roofline ns/token | bound |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    summary = [
        "| shape | dtype | fwd ns/token (roofline) | fwd+bwd ns/token | dense causal "
        "fwd at 550 TFLOP/s, T=2k / 32k (ns/token) | target fwd speed-up vs cuDNN, "
        "T=2k / 32k |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for shape_name in shape_names:
        shape = SHAPES[shape_name]
        _, _, _, k, v, _, _ = shape
        for dtype in dtypes:
            # float32 runs as six bf16 tensor-core products (bf16x6)
            peak = H100["bf16_flops"] / (6 if dtype == "float32" else 1)
            total = fwd = 0.0
            for row in kernel_costs(shape, dtype):
                t_c = row["flops"] / peak
                t_m = row["bytes"] / H100["hbm_bytes"]
                ns = max(t_c, t_m) * 1e9
                total += ns
                if row["name"] == "vq_attention_fwd":
                    fwd = ns
                lines.append(
                    f"| {shape_name} | {dtype} | {row['name']} "
                    f"| {row['flops'] / 1e6:.2f} M | {row['useful_flops'] / 1e6:.2f} M "
                    f"| {row['bytes'] / 1e3:.1f} k | {row['flops'] / row['bytes']:.0f} "
                    f"| {ns:.2f} | {'compute' if t_c >= t_m else 'memory'} |"
                )
            # dense causal attention forward per token: T/2 keys, d_v/d_k calls
            # of width d_k as in benchmarks/kernels.py (T * 2 * d_v per token)
            dense = [T * 2 * v / CUDNN_FWD_FLOPS * 1e9 for T in (2048, 32768)]
            summary.append(
                f"| {shape_name} | {dtype} | {fwd:.2f} | {total:.2f} "
                f"| {dense[0]:.1f} / {dense[1]:.1f} "
                f"| {dense[0] / fwd:.1f}x / {dense[1] / fwd:.1f}x |"
            )
    return "\n".join(lines) + "\n\n" + "\n".join(summary)


# ------------------------------------------------------------------------ gate
def run_gate(
    shape_names,
    dtypes,
    archs,
    *,
    timeout=600,
    block_sizes=None,
    jobs=None,
    documents=False,
    log=print,
):
    """Reports for every (shape, dtype, arch, kernel), in that order.

    `archs` is a list of compute capabilities, or a function of the shape name
    giving it. `documents`: also the packed-document variant of each
    (shape name suffixed "+docs"). Lowering and verification run here; the compiles run as
    subprocesses, `jobs` at a time (default: the CPU count)."""
    from concurrent.futures import ThreadPoolExecutor

    import jax.numpy as jnp

    from pallas_kernels.vq_attention import BlockSizes

    work = []
    for shape_name in shape_names:
        for dtype in dtypes:
            for arch in archs(shape_name) if callable(archs) else archs:
                # the rule tunes per architecture: lower once per arch
                sizes = block_sizes or BlockSizes.for_platform("gpu", arch=arch)
                for docs in (False, True) if documents else (False,):
                    # With the cache prefix kernel, so all six kernels compile.
                    lowered = lower(
                        SHAPES[shape_name],
                        jnp.dtype(dtype),
                        block_sizes=sizes,
                        documents=docs,
                        cache_prefix="kernel",
                    )
                    name = shape_name + ("+docs" if docs else "")
                    work += [(name, dtype, arch, c) for c in triton_calls(lowered)]
    jobs = jobs or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [
            pool.submit(compile_call, call, arch, timeout=timeout)
            for _, _, arch, call in work
        ]
        rows = []
        for (shape_name, dtype, _, _), fut in zip(work, futures, strict=True):
            rep = fut.result()
            rows.append((shape_name, dtype, rep))
            log(format_row(shape_name, dtype, rep))
    return rows


def format_row(shape_name, dtype, r: KernelReport) -> str:
    def val(x, unit=""):
        return "-" if x is None else f"{x}{unit}"

    shared = "-" if r.shared is None else f"{r.shared / 1024:.0f} KiB"
    spills = "-" if r.spills is None else f"{r.spill_stores}/{r.spill_loads} B"
    status = r.status if not r.error else f"{r.status}: {r.error}"
    return (
        f"| {shape_name} | {dtype} | sm_{r.arch} | {r.name} | {r.num_warps}/{r.num_stages} "
        f"| {val(r.registers)} | {spills} | {shared} | {val(r.ctas_per_sm)} "
        f"| {r.seconds:.0f} s | {status} |"
    )


TABLE_HEADER = (
    "| shape | dtype | arch | kernel | warps/stages | registers | spills (st/ld) "
    "| shared | CTAs/SM | compile | status |\n"
    "|---|---|---|---|---|---:|---:|---:|---:|---:|---|"
)


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--compile-one":
        path, arch, warps, stages = argv[1:5]
        _compile_worker(path, int(arch), int(warps), int(stages))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--shapes", default="official", help=f"comma list of {list(SHAPES)} or 'all'"
    )
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--arch", default="90", help="comma list of 90, 80")
    p.add_argument("--timeout", type=float, default=600, help="seconds per kernel")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles")
    p.add_argument("--markdown", default=None, help="also write the table here")
    p.add_argument(
        "--documents",
        action="store_true",
        help="also the packed-document (doc_starts) variant of every kernel",
    )
    p.add_argument(
        "--roofline", action="store_true", help="print FLOPs/bytes/roofline only"
    )
    args = p.parse_args(argv)
    if args.roofline:
        shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
        print(roofline_table(shapes, args.dtypes.split(",")))
        return 0
    shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    archs = [int(a) for a in args.arch.split(",")]
    print(TABLE_HEADER, flush=True)
    rows = run_gate(
        shapes,
        args.dtypes.split(","),
        archs,
        timeout=args.timeout,
        jobs=args.jobs,
        documents=args.documents,
        log=lambda s: print(s, flush=True),
    )
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(TABLE_HEADER + "\n")
            for shape_name, dtype, rep in rows:
                f.write(format_row(shape_name, dtype, rep) + "\n")
    bad = [r for _, _, r in rows if not r.fits()]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
