#!/usr/bin/env bash
# GPU check for the Pallas VQ-attention kernels, in one go (< 8 minutes):
#   1. correctness of pallas vs the xla form ON THE GPU at a few shapes, the
#      official one included (forward, dq, dk, dv, rel grads, returned state);
#   2. the kernel benchmark (benchmarks/kernels.py) -> benchmarks/results/kernels-gpu.md;
#   3. a short tile sweep at the official shape (benchmarks/tile_sweep.py)
#      -> benchmarks/results/tiles-gpu.md.
# Needs a python with jax[cuda] preinstalled (no network); run from anywhere:
#   bash benchmarks/gpu_check.sh            (PYTHON=... to pick the interpreter)
# Output: benchmarks/results/kernels-gpu.md, kernels-gpu-check.md, tiles-gpu.md
# Time limits: 180 + 250 + 45 s of steps (each cut by `timeout`).
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
timeout 180 "$PYTHON" - <<'EOF'
import sys, time, warnings
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
import jax, jax.numpy as jnp, numpy as np
from tvq_eqx.ops import vq_attention_xla
from tvq_eqx.ops._pallas import vq_attention_pallas

assert jax.default_backend() == "gpu", jax.default_backend()

def rel(ref, out):
    ref = np.asarray(ref, np.float64); out = np.asarray(out, np.float64)
    return float(np.linalg.norm(ref - out) / max(np.linalg.norm(ref), 1e-30))

# (B, T, H, K, V, S, L, rel bias, dtype)
CASES = [
    (1, 2048, 1, 128, 1536, 512, 512, True, "bfloat16"),   # official config
    (1, 2048, 1, 128, 1536, 512, 512, False, "float32"),
    (2, 1024, 4, 64, 128, 256, 256, True, "bfloat16"),
    (2, 256, 2, 32, 64, 64, 64, True, "float32"),
    (2, 64, 2, 8, 12, 5, 16, True, "float32"),             # padded d_v, codes
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
for b, t, h, k, v, s, l, use_rel, dt in CASES:
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
            out, st = fn(q, kk, vv, cb, block_len=l, scale=k ** -0.5, **extra, **opts)
            return out, st.cache_mean
        (out, mean), vjp = jax.vjp(f, *args)
        return (out, mean) + vjp((cot, jnp.zeros_like(mean)))

    args = (q, kk, vv, rq, rt)
    t0 = time.time()
    got = jax.block_until_ready(jax.jit(lambda *a: run(vq_attention_pallas, a[:5], a[5], {}))(*args, cot))
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
    shape = f"B{b}-T{t}-H{h}-K{k}-V{v}-S{s}-L{l}" + ("-rel" if use_rel else "")
    print(shape, dt, ["%.1e" % e for e in errs], "PASS" if ok else "FAIL", f"{sec:.1f}s", flush=True)
    lines.append(f"| {shape} | {dt} | " + " | ".join("%.1e" % e for e in errs)
                 + f" | {sec:.1f} | {'pass' if ok else 'FAIL'} |")
open("benchmarks/results/kernels-gpu-check.md", "w").write("\n".join(lines) + "\n")
sys.exit(0 if ok_all else 1)
EOF
check=$?
echo "correctness exit code: $check"

echo "== 2. benchmark"
timeout 250 "$PYTHON" -W "ignore:The Pallas Triton backend is deprecated:DeprecationWarning" \
  benchmarks/kernels.py --device-tag gpu \
  --seq-lens 1024,4096,16384,32768,65536,131072 --extra-seq-len 1048576 \
  --reps 3 --min-time 0.2
bench=$?
echo "benchmark exit code: $bench (124 = timed out; the table holds the shapes finished)"

echo "== 3. tile sweep (official shape, T 16384, bf16)"
timeout 45 "$PYTHON" -W "ignore:The Pallas Triton backend is deprecated:DeprecationWarning" \
  benchmarks/tile_sweep.py --seq-len 16384 --out benchmarks/results/tiles-gpu.md
echo "tile sweep exit code: $? (informational)"
exit $(( check != 0 ? check : bench ))
