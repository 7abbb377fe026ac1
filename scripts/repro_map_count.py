"""Reproduce the XLA CPU compiler failure seen late in long test runs.

Every compiled XLA:CPU program that jax keeps in its caches holds a few memory
mappings (the JIT-linked code and data of its kernels). Linux allows a process
`vm.max_map_count` mappings (65530 by default); past it, `mmap` fails inside
XLA's JIT linker while compiling (`backend_compile_and_load`, jaxlib's
`Client.compile_and_load`). Two outcomes, both reproduced here:

- the JIT session's error, returned: "LLVM compilation error: Cannot allocate
  memory" logged, then `JaxRuntimeError: INTERNAL: Failed to materialize
  symbols` (`--small`: one-kernel programs);
- a hard abort, when the failed mmap is in XLA's section memory manager
  (`contiguous_section_memory_manager.cc: allocateMappedMemory failed`, then
  "LLVM ERROR: Unable to allocate section memory!" and SIGABRT, exit 134):
  the default, a gradient through a scan, whose kernels are code-generated in
  parallel. Under pytest-xdist this is a crashed worker.

    python scripts/repro_map_count.py           # fast: fill the map table
    python scripts/repro_map_count.py --compile # slow: only compile (minutes)

The fast way takes the mappings with small shared anonymous mmaps (one
mapping each, never merged) until `--headroom` are left, then compiles fresh
programs; it takes seconds. The slow way compiles distinct programs and keeps
them alive, as jax's caches do in a long test worker, until the compiler
fails. Exit 0 (or 134, the abort) once reproduced; 1 if it never came. The
test suite avoids it in tests/conftest.py (`_bounded_jit_mappings`); see
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import mmap
import sys


def mappings() -> int:
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


def max_map_count() -> int:
    with open("/proc/sys/vm/max_map_count") as f:
        return int(f.read())


def _program(i: int, kind: str):
    import jax
    import jax.numpy as jnp

    if kind == "small":  # one fused kernel
        return jax.jit(lambda v: jnp.sin(v) * float(i) + jnp.cos(v)), jnp.ones(8)

    def loss(w):  # a gradient through a scan: several kernels, parallel codegen
        def body(c, _):
            return jnp.tanh(c @ w + float(i)), jnp.sum(c)

        c, ys = jax.lax.scan(body, jnp.ones((4, 16)), None, length=3)
        return jnp.sum(c**2) + jnp.sum(ys)

    return jax.jit(jax.grad(loss)), jnp.ones((16, 16))


def compile_until_failure(limit: int, keep: list, kind: str, errors: int = 1) -> bool:
    """Compiles new programs until `errors` compiles failed (or the process
    aborts) or `limit` compiled."""
    start, failed = mappings(), 0
    for i in range(limit):
        f, x = _program(i, kind)  # a distinct constant: new JIT code each time
        try:
            keep.append(f.lower(x).compile())
        except Exception as e:  # report what XLA raises
            print(f"compile {i}: {type(e).__name__}: {str(e)[:300]}")
            print(f"mappings {mappings()} of {max_map_count()}", flush=True)
            failed += 1
            if failed == errors:
                return True
            continue
        if i % 500 == 0:
            n = mappings()
            per = (n - start) / max(i, 1)
            print(f"compile {i}: mappings {n} ({per:.1f} per program)", flush=True)
    return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compile", action="store_true", help="compile only (slow)")
    p.add_argument("--headroom", type=int, default=20)
    p.add_argument("--errors", type=int, default=20, help="stop after this many")
    p.add_argument(
        "--small",
        action="store_true",
        help="one-kernel programs: the JaxRuntimeError instead of the abort",
    )
    args = p.parse_args(argv)

    import jax

    jax.config.update("jax_platforms", "cpu")
    limit = max_map_count()
    print(f"vm.max_map_count {limit}; mappings at start {mappings()}")
    keep: list = []
    kind = "small" if args.small else "scan"
    if not args.compile:
        # Warm up first (the backend and its first programs), then fill.
        compile_until_failure(3, keep, kind)
        target = limit - args.headroom
        while (left := target - mappings()) > 0:
            keep += [mmap.mmap(-1, mmap.PAGESIZE) for _ in range(min(left, 1000))]
        print(f"filled: mappings {mappings()} (headroom {limit - mappings()})")
    # Keep compiling after an error: the next program may hit the abort.
    failed = compile_until_failure(100_000, keep, kind, errors=args.errors)
    print("reproduced" if failed else "not reproduced")
    return 0 if failed else 1


if __name__ == "__main__":
    sys.exit(main())
