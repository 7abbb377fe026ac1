#!/usr/bin/env bash
# GPU check for the Pallas VQ-attention kernels, in one go (< 8 minutes):
#   1. correctness of pallas vs the xla form ON THE GPU at a few shapes, the
#      official one included (forward, dq, dk, dv, rel grads, returned state);
#      packed documents (doc_starts), a decayed cache and the sliding window
#      included;
#   2. every part timed alone at the official shape, 8k / 32k / 128k, bf16
#      (benchmarks/kernel_parts.py: prologue, each kernel, epilogue, fwd+bwd;
#      TFLOP/s and GB/s; beside the xla form, cuDNN in 12 calls and its
#      FLOP-normalised line, one dense call, tokamax if installed; device ops
#      from jax.profiler) -> benchmarks/results/kernel-parts-gpu.md;
#   3. with FULL=1 (beyond the 8 minutes): what packed documents cost
#      (benchmarks/documents.py) -> documents-gpu.md, and the kernel benchmark
#      (benchmarks/kernels.py) -> kernels-gpu-recheck.md;
#   4. with TILE_SWEEP=1: a short tile sweep at the official shape
#      (benchmarks/tile_sweep.py) -> benchmarks/results/tiles-gpu.md.
# Needs a python with jax[cuda] preinstalled (no network); run from anywhere:
#   bash benchmarks/gpu_check.sh            (PYTHON=... to pick the interpreter)
# Output: benchmarks/results/kernels-gpu-check.md, kernel-parts-gpu.md
# (documents-gpu.md, kernels-gpu-recheck.md, tiles-gpu.md), also copied to
# $OUT when set (the device tool).
# Time limits: 150 + 290 s of steps (FULL=1: + 90 + 150; TILE_SWEEP=1: + 45),
# each cut by `timeout`.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import jax; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python3
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p benchmarks/results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"

echo "== 1. correctness on GPU (pallas vs xla)"
timeout 150 "$PYTHON" - <<'EOF'
import sys, time, warnings
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
import jax, jax.numpy as jnp, numpy as np
from tvq_eqx.ops import vq_attention_xla
from tvq_eqx.ops._pallas import vq_attention_pallas

assert jax.default_backend() == "gpu", jax.default_backend()

def rel(ref, out):
    ref = np.asarray(ref, np.float64); out = np.asarray(out, np.float64)
    return float(np.linalg.norm(ref - out) / max(np.linalg.norm(ref), 1e-30))

def doc_starts(b, t, every):
    # Documents of random lengths about `every`, different per row (some
    # starts in a block's last positions: windows cut short).
    rng = np.random.default_rng(t + every)
    d = np.zeros((b, t), bool)
    for row in range(b):
        d[row, rng.integers(0, t, size=max(1, t // every))] = True
    return jnp.asarray(d)

# (B, T, H, K, V, S, L, rel bias, dtype, options); "docs": mean document length
CASES = [
    (1, 2048, 1, 128, 1536, 512, 512, True, "bfloat16", {}),   # official config
    (1, 2048, 1, 128, 1536, 512, 512, False, "float32", {}),
    (2, 1024, 4, 64, 128, 256, 256, True, "bfloat16", {}),
    (2, 256, 2, 32, 64, 64, 64, True, "float32", {}),
    (2, 64, 2, 8, 12, 5, 16, True, "float32", {}),             # padded d_v, codes
    (1, 2048, 1, 128, 1536, 512, 512, True, "bfloat16", {"docs": 700}),
    (2, 1024, 4, 64, 128, 256, 256, True, "float32", {"docs": 300}),
    (2, 1024, 4, 64, 128, 256, 256, True, "bfloat16", {"cache_decay": 0.9}),
    (2, 1024, 4, 64, 128, 256, 256, True, "bfloat16",
     {"use_cache": False, "cache_grad": False}),               # sliding window
    # The cache prefix kernel (PallasConfig(cache_prefix="kernel")): never run
    # on a GPU before 2026-12-07; official shape, multi-head with documents
    # and with a decayed cache, float32.
    (1, 2048, 1, 128, 1536, 512, 512, True, "bfloat16", {"prefix": True}),
    (2, 1024, 4, 64, 128, 256, 256, True, "bfloat16", {"prefix": True, "docs": 300}),
    (2, 1024, 4, 64, 128, 256, 256, True, "float32",
     {"prefix": True, "cache_decay": 0.9}),
]
TOL = {"float32": (1e-4, 1e-4), "bfloat16": (2e-2, 5e-2)}  # (forward, grads)
lines = ["# GPU correctness check: pallas vs xla (on " + jax.devices()[0].device_kind + ")", "",
         "Reference: the xla form in float32 at Precision.HIGHEST on the same "
         "(dtype-rounded) inputs. Tolerances: float32 1e-4 (kernels use bf16x6 "
         "tensor-core dots, ~float32 accuracy: 2-7e-7 emulated on CPU), "
         "bfloat16 2e-2 forward / 5e-2 gradients.", "",
         "| shape | dtype | out | state.cache_mean | dq | dk | dv | d rel_query | d rel_table | time fwd+bwd (s, incl. compile) | pass |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
ok_all = True
for b, t, h, k, v, s, l, use_rel, dt, options in CASES:
    tag = "".join(f"-{n}" for n in options if n != "cache_grad")
    options = dict(options)
    pallas_opts = {}
    if options.pop("prefix", False):
        from pallas_kernels.vq_attention import PallasConfig
        pallas_opts = {"pallas": PallasConfig(cache_prefix="kernel")}
    if "docs" in options:
        options["doc_starts"] = doc_starts(b, t, options.pop("docs"))
    dtype = jnp.dtype(dt)
    ks = jax.random.split(jax.random.key(t + k), 7)
    q = jax.random.normal(ks[0], (b, t, h, k), dtype)
    kk = jax.random.normal(ks[1], (b, t, h, k), dtype)
    vv = jax.random.normal(ks[2], (b, t, h, v), dtype)
    cb = jax.random.normal(ks[3], (h, s, k), jnp.float32)
    rq = (0.3 * jax.random.normal(ks[4], (b, t, h, k))).astype(dtype)
    rt = jax.random.normal(ks[5], (l + 1, h, k), dtype)
    cot = jax.random.normal(ks[6], (b, t, h, v), dtype)

    def run(fn, args, cot, opts):
        def f(q, kk, vv, rq, rt):
            extra = dict(rel_query=rq, rel_table=rt) if use_rel else {}
            out, st = fn(q, kk, vv, cb, block_len=l, scale=k ** -0.5, **extra,
                         **options, **opts)
            return out, st.cache_mean
        (out, mean), vjp = jax.vjp(f, *args)
        return (out, mean) + vjp((cot, jnp.zeros_like(mean)))

    args = (q, kk, vv, rq, rt)
    t0 = time.time()
    got = jax.block_until_ready(jax.jit(lambda *a: run(vq_attention_pallas, a[:5], a[5], pallas_opts))(*args, cot))
    sec = time.time() - t0
    f32 = tuple(x.astype(jnp.float32) for x in args)
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(lambda *a: run(vq_attention_xla, a[:5], a[5], {}))(*f32, cot.astype(jnp.float32))
    errs = [rel(r, g) for r, g in zip(ref, got)]
    if not use_rel:
        errs[-2:] = [0.0, 0.0]
    tf, tg = TOL[dt]
    ok = all(e <= tf for e in errs[:2]) and all(e <= tg for e in errs[2:])
    ok_all &= ok
    shape = f"B{b}-T{t}-H{h}-K{k}-V{v}-S{s}-L{l}" + ("-rel" if use_rel else "") + tag
    print(shape, dt, ["%.1e" % e for e in errs], "PASS" if ok else "FAIL", f"{sec:.1f}s", flush=True)
    lines.append(f"| {shape} | {dt} | " + " | ".join("%.1e" % e for e in errs)
                 + f" | {sec:.1f} | {'pass' if ok else 'FAIL'} |")
open("benchmarks/results/kernels-gpu-check.md", "w").write("\n".join(lines) + "\n")
sys.exit(0 if ok_all else 1)
EOF
check=$?
echo "correctness exit code: $check"

echo "== 2. every part alone, beside the baselines"
timeout 290 "$PYTHON" benchmarks/kernel_parts.py --seq-lens 8192,32768,131072 \
  --profile --profile-seq-lens 8192,32768,131072 --budget-s 200
bench=$?
echo "kernel parts exit code: $bench (124 = timed out; the file holds the lengths finished)"

if [[ "${FULL:-0}" == 1 ]]; then
  echo "== 3a. packed documents: cost"
  timeout 90 "$PYTHON" benchmarks/documents.py --device-tag gpu
  echo "documents exit code: $?"
  echo "== 3b. kernel benchmark"
  timeout 150 "$PYTHON" -W "ignore:The Pallas Triton backend is deprecated:DeprecationWarning" \
    benchmarks/kernels.py --device-tag gpu \
    --seq-lens 1024,4096,16384,65536 --quadratic-max 16384 --out benchmarks/results/kernels-gpu-recheck.md \
    --reps 3 --min-time 0.2
  echo "kernel benchmark exit code: $?"
fi

if [[ "${TILE_SWEEP:-0}" == 1 ]]; then
  echo "== 4. tile sweep (official shape, T 16384, bf16)"
  timeout 45 "$PYTHON" -W "ignore:The Pallas Triton backend is deprecated:DeprecationWarning" \
    benchmarks/tile_sweep.py --seq-len 16384 --out benchmarks/results/tiles-gpu.md
  echo "tile sweep exit code: $? (informational)"
fi
if [[ -n "${OUT:-}" ]]; then
  cp benchmarks/results/kernels-gpu*.md benchmarks/results/kernel-parts-gpu.md "$OUT"/ 2>/dev/null
  cp benchmarks/results/documents-gpu.md "$OUT"/ 2>/dev/null || true
  cp benchmarks/results/tiles-gpu.md "$OUT"/ 2>/dev/null || true
fi
exit $(( check != 0 ? check : bench ))
