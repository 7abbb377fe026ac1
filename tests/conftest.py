"""Shared test setup: strict numerics, four CPU devices, fast compiles (LLVM
-O0; `TVQ_TEST_FAST_COMPILE=off` for -O3), a persistent compilation cache
(`.pytest_cache/jax`; `TVQ_TEST_COMPILATION_CACHE=<dir>` or `off`), seeded
keys, helpers, and an opt-in compile profile (`TVQ_TEST_PROFILE_COMPILES`,
tests/_compile_profile.py).

Random keys come from the `getkey` fixture, whose seed is fixed per test (a
hash of the test's id) unless `TVQ_TEST_SEED` says otherwise:

- `TVQ_TEST_SEED=<int>`: every test uses this seed (replays a failure);
- `TVQ_TEST_SEED=random`: every test draws a fresh seed (explores new ones).

A failing test that used `getkey` prints its seed and the command that
replays it.
"""

import os
import zlib

import _compile_profile
import jax
import numpy as np
import pytest

# Compile fast: the XLA CPU backend's LLVM at -O0 without its expensive passes
# (XLA's own HLO passes run as always; set here, before the backend starts and
# reads XLA_FLAGS -- importing jax does not start it). The suite's programs are
# tiny, so compiling is most of its time and running them is not; this halves
# the CPU time of a compile (a 2-layer gradient: 49 -> 23 CPU s). The flags reach the
# subprocesses the CLI and benchmark tests start through the environment.
# TVQ_TEST_FAST_COMPILE=off compiles as users do (-O3), for a full check.
FAST_COMPILE_ENV = "TVQ_TEST_FAST_COMPILE"
_FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
if os.environ.get(FAST_COMPILE_ENV, "").strip().lower() != "off":
    _xla_flags = os.environ.get("XLA_FLAGS", "")
    if _FAST_COMPILE_FLAGS not in _xla_flags:
        os.environ["XLA_FLAGS"] = f"{_FAST_COMPILE_FLAGS} {_xla_flags}".strip()

CACHE_ENV = "TVQ_TEST_COMPILATION_CACHE"

# Silent rank promotion hides shape bugs (a [n] broadcast against [n, 1]):
# an error in tests.
jax.config.update("jax_numpy_rank_promotion", "raise")
# Silent dtype promotion (float32 * bool, int32 + float, bf16 + f32) hides
# precision bugs: an error in tests too. The library casts explicitly and runs
# optax's updates under a local "standard" context (optax mixes dtypes
# internally). TVQ_TEST_DTYPE_PROMOTION=standard relaxes it for debugging.
jax.config.update(
    "jax_numpy_dtype_promotion",
    os.environ.get("TVQ_TEST_DTYPE_PROMOTION", "strict"),
)

# Four CPU devices, so the data-parallel and sharding tests run in this
# process (the flag must be set before the backend starts; nothing above
# touches it). Everything else runs on the default device, as with one.
jax.config.update("jax_num_cpu_devices", 4)

# Compilation dominates the suite's CPU time (about 85% on test_model.py), and
# the programs rarely change between runs: keep every compiled executable in a
# persistent cache shared by the xdist workers, so a re-run compiles only what
# changed. TVQ_TEST_COMPILATION_CACHE names the folder; "off" disables it.
_cache_dir = os.environ.get(
    CACHE_ENV,
    os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "jax"),
)
if _cache_dir.strip().lower() != "off":
    jax.config.update("jax_compilation_cache_dir", _cache_dir)
    # Cache small programs too: most of the suite's compiles take under the
    # default one-second threshold, and together they are most of its time.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# Every compiled CPU program keeps about six memory mappings (its JIT dylib)
# while jax caches it; a worker that compiles ~10k programs reaches Linux's
# vm.max_map_count (65530), and then XLA's compiler fails: "Failed to
# materialize symbols" (a JaxRuntimeError) or a hard abort in
# backend_compile_and_load -- the "compiler segfault" seen in earlier runs.
# So a worker drops jax's caches once it holds many mappings.
_MAP_LIMIT = 30_000


def _mapping_count() -> int | None:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return None


@pytest.fixture(autouse=True)
def _bounded_jit_mappings():
    yield
    count = _mapping_count()
    if count is not None and count > _MAP_LIMIT:
        import gc

        jax.clear_caches()
        gc.collect()


@pytest.fixture
def no_compilation_cache():
    """Compile for real, bypassing the persistent cache: for tests that read
    what XLA logs while compiling (a cache hit compiles nothing, logs nothing)."""
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX memoises whether the cache is on
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


SEED_ENV = "TVQ_TEST_SEED"
_seed_key = pytest.StashKey[int]()


def _test_seed(nodeid: str) -> int:
    env = os.environ.get(SEED_ENV, "").strip()
    if not env:
        return zlib.crc32(nodeid.encode()) % (2**31)
    if env.lower() == "random":
        return int(np.random.SeedSequence().entropy % (2**31))
    try:
        return int(env)
    except ValueError:
        raise pytest.UsageError(
            f"{SEED_ENV}={env!r}: expected an integer seed or 'random'"
        ) from None


def pytest_configure(config):
    _test_seed("")  # a bad TVQ_TEST_SEED stops the run before any test
    _compile_profile.register(config)  # TVQ_TEST_PROFILE_COMPILES=<path>


@pytest.fixture
def getkey(request):
    """Returns a function giving a fresh PRNG key on each call.

    The keys are `fold_in(key(seed), i)` for call `i`; the seed is reported on
    failure (see the module docstring)."""
    seed = _test_seed(request.node.nodeid)
    request.node.stash[_seed_key] = seed
    counter = iter(range(10**9))
    base = jax.random.key(seed)

    def _getkey():
        return jax.random.fold_in(base, next(counter))

    return _getkey


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = item.stash.get(_seed_key, None)
    if report.failed and seed is not None:
        report.sections.append(
            (
                "getkey seed",
                f"getkey seed {seed}; replay with\n"
                f"  {SEED_ENV}={seed} python -m pytest '{item.nodeid}'",
            )
        )
    return report


def rel_err(ref, out) -> float:
    """||ref - out|| / ||ref|| in float64."""
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    return float(np.linalg.norm(ref - out) / max(np.linalg.norm(ref), 1e-30))


def assert_close(ref, out, rtol, *, name="", atol_rms=1e-6):
    """||ref - out|| <= rtol ||ref|| + atol_rms sqrt(size): relative, with an
    absolute floor so outputs that are zero in exact arithmetic (e.g. dq when
    every key shares one code) compare rounding noise sanely."""
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    assert ref.shape == out.shape, (name, ref.shape, out.shape)
    err = np.linalg.norm(ref - out)
    bound = rtol * np.linalg.norm(ref) + atol_rms * np.sqrt(ref.size)
    assert err <= bound, (
        f"{name}: ||ref-out||={err:.3g} > {bound:.3g} (rel {rel_err(ref, out):.3g})"
    )
