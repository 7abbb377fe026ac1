"""Shared test setup: strict numerics, a fresh-key fixture, helpers."""

import jax
import numpy as np
import pytest

# Silent dtype/rank promotion hides shape bugs; make it an error in tests.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "standard")


@pytest.fixture
def getkey():
    """Returns a function giving a fresh PRNG key on each call (seeded per test)."""
    counter = iter(range(10**9))
    base = jax.random.key(np.random.SeedSequence().entropy % (2**31))

    def _getkey():
        return jax.random.fold_in(base, next(counter))

    return _getkey


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
