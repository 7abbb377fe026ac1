"""Golden tests: tvq_eqx against the official Transformer-VQ (Flax) code.

The fixtures in `tests/golden/*.npz` hold inputs, parameters and results of the
official modules (written by `tests/golden/generate.py`, which needs flax and
the official source; this file needs only numpy and our own dependencies).
Each case maps the official parameters into tvq_eqx modules and compares, in
float32 at our default settings (nothing neutralised), to <= 1e-5 relative:

- one attention unit run block by block over two update segments: its
  output and carried state after every block, its commit loss per block, and
  the gradients of `sum <output, cotangent>` w.r.t. its input and parameters;
- the language model on two consecutive segments with the carried state:
  log-probabilities, each loss term, the composite loss, gradients of every
  parameter, and the codebook after one update (SGD, learning rate 1).

A failing test lists every quantity of its group with its relative error, so
one run shows where tvq_eqx and the official code disagree and by how much.
`python tests/test_golden.py` prints the whole table.

How the official parameters map (the library's `tvq_eqx/train/_official.py`,
which `tvq_eqx.load_official` uses on official checkpoints: edit its
`UNIT_PARAMS`, `official_param_table` and `codebook_scale` if our
parametrisation changes): reshapes only, except that
our codebook lives in the unscaled key space (keys after the q/k norm) while
the official `LearnableVQ` works in the pre-scaled space `k * d_k^-1/4`, so
`codebook_sum = c_sum * d_k^(1/4)`. Our layers are stacked along a
leading layer axis (`Transformer.layers`, a `LayerStack`): official layer `i`
is index `i` of that axis (`model.layers[i]`). The codebook's gradient is the EMA
surrogate's (its SGD step is the EMA update in either space), so its gradient
and update map like the parameter itself.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tvq_eqx
from tvq_eqx import TransformerConfig, loss_fn
from tvq_eqx.nn import VQAttention
from tvq_eqx.train import _official as official
from tvq_eqx.train import official_model_config

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.npz"))
# Cases whose fixture holds unit-level data (the others' unit is set up as in
# one of these; see NO_UNIT in the generator).
UNIT_CASES = [c for c in CASES if c not in ("tied_escale", "abs_pe")]
RTOL = 1e-5
# Absolute floor (per element, RMS) for quantities that are exactly zero
# officially: far below any real difference, above float32 rounding of 0.
ATOL_RMS = 1e-9


# ----------------------------------------------------------------- mapping --

# The mapping lives in the library (tvq_eqx/train/_official.py), which
# `tvq_eqx.load_official` uses on official checkpoints; these tests check it.
UNIT_PARAMS = official.UNIT_PARAMS
codebook_scale = official.codebook_scale


def lm_params(config: TransformerConfig) -> list:
    """(official path, getter on our Transformer, kind) for the whole model."""
    return official.official_param_table(config)


# Official parameters with no counterpart because the official model never
# reads them in that setting (their official gradient is checked to be 0).
unused_official = official.unused_official


def our_config(meta: dict) -> TransformerConfig:
    """The TransformerConfig for the official settings of a fixture (the
    library's mapping of the official flags, `official_model_config`)."""
    o = meta["official_config"]
    try:
        return official_model_config(o)
    except (TypeError, ValueError) as err:
        raise GoldenSetupError(
            f"TransformerConfig cannot express the official settings {o}: {err}"
        ) from err


class GoldenSetupError(Exception):
    """Our code cannot express a fixture's official setting."""


def to_official(value, shape, kind: str, d_k: int) -> np.ndarray:
    value = np.asarray(value, np.float64).reshape(shape)
    if kind == "codebook":
        value = value / codebook_scale(d_k)
    return value


def build(cls, config, table, params: dict, skip=()):
    """Our module with every parameter set from the official ones (the
    library's `build_from_official`); a mapping gap is a GoldenSetupError."""
    try:
        return official.build_from_official(cls, config, table, params, skip=set(skip))
    except official.OfficialCheckpointError as err:
        raise GoldenSetupError(str(err)) from err


# ---------------------------------------------------------------- fixtures --


def load_fixture(case: str) -> tuple[dict, dict]:
    with np.load(GOLDEN / f"{case}.npz") as f:
        data = {k: f[k] for k in f.files}
    meta = json.loads(str(data.pop("meta")))
    return data, meta


def sub(data: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}


# ------------------------------------------------------------- comparisons --


@dataclasses.dataclass
class Row:
    quantity: str
    rel: float  # ||ref - out|| / ||ref|| (inf when not computable)
    ok: bool
    note: str = ""


def compare(name, ref, out, rtol=RTOL, *, scale=None) -> Row:
    """Relative error of `out` against the official `ref`; `scale` replaces
    ||ref|| as the tolerance's reference (for quantities that are 0)."""
    ref = np.asarray(ref, np.float64)
    if out is None:
        return Row(name, float("inf"), False, "no counterpart in tvq_eqx")
    out = np.asarray(out, np.float64)
    if ref.shape != out.shape:
        return Row(name, float("inf"), False, f"shape {out.shape} != {ref.shape}")
    err = float(np.linalg.norm(ref - out))
    norm = float(np.linalg.norm(ref))
    if scale is not None:
        norm = float(scale)
    rel = err / norm if norm > 0 else (0.0 if err == 0 else float("inf"))
    ok = bool(np.isfinite(out).all()) and err <= rtol * norm + ATOL_RMS * np.sqrt(
        max(ref.size, 1)
    )
    note = "" if np.linalg.norm(ref) > 0 else f"official is 0; |ours|={err:.2g}"
    if scale is not None:
        note += " (relative to the loss)"
    return Row(name, rel, ok, note)


def report(rows: list[Row]) -> str:
    lines = [f"{'quantity':60s} {'rel err':>10s}  status"]
    for r in rows:
        status = "ok" if r.ok else "FAIL"
        lines.append(f"{r.quantity:60s} {r.rel:10.3g}  {status} {r.note}")
    return "\n".join(lines)


def check(rows: list[Row]) -> None:
    assert rows, "nothing compared"
    bad = [r for r in rows if not r.ok]
    assert not bad, (
        f"{len(bad)} of {len(rows)} quantities disagree with the official code "
        f"(rtol {RTOL}):\n" + report(rows)
    )


# ------------------------------------------------------------ computations --


def fast_jit(fn):
    """`eqx.filter_jit`, compiled at XLA backend optimisation level 0.

    Each case compiles two small functions that run a few times, so compile
    time is nearly all of this file's run time; level 0 cuts it by about a
    third. It changes no semantics (float32 IEEE arithmetic either way; only
    instruction scheduling and fusion differ, far below the tolerance).
    """
    cache = {}

    def wrapped(*args):
        dynamic, static = eqx.partition(args, eqx.is_array)
        key = (
            jax.tree.structure(dynamic),
            static_key(static),
            tuple((x.shape, x.dtype) for x in jax.tree.leaves(dynamic)),
        )
        if key not in cache:
            lowered = jax.jit(lambda d: fn(*eqx.combine(d, static))).lower(dynamic)
            cache[key] = lowered.compile({"xla_backend_optimization_level": 0})
        return cache[key](dynamic)

    return wrapped


def static_key(static):
    leaves, treedef = jax.tree.flatten(static)
    return treedef, tuple(id(x) for x in leaves)


def _state_as_official(state, d_k: int, n_code: int) -> dict:
    """Our VQAttentionState in the official layout ([B, H, ...]); window slots
    that hold no token get code n_code and zero codeword/value, as officially."""
    if not hasattr(state, "window_code"):
        raise GoldenSetupError(
            f"our state {type(state).__name__} has no window_code/window_key/"
            "window_value (the official xlcache layout); fields: "
            f"{[f.name for f in dataclasses.fields(state)]}"
        )
    m = state.window_code.shape[1]
    slot = np.arange(m)[None, :]
    valid = slot >= m - np.minimum(np.asarray(state.length), m)[:, None]  # [B, M]
    valid_h = valid[:, None, :]
    z = np.where(valid_h, np.asarray(state.window_code).transpose(0, 2, 1), n_code)
    k_hat = np.asarray(state.window_key, np.float64).transpose(0, 2, 1, 3)
    k_hat = np.where(valid_h[..., None], k_hat / codebook_scale(d_k), 0.0)
    v = np.asarray(state.window_value, np.float64).transpose(0, 2, 1, 3)
    v = np.where(valid_h[..., None], v, 0.0)
    return {
        "xlcache/z": z,
        "xlcache/k_hat": k_hat,
        "xlcache/v": v,
        "aggcache/lower": np.asarray(state.cache_count),
        "aggcache/upper_div_lower": np.asarray(state.cache_mean),
    }


@functools.cache
def unit_results(case: str) -> dict:
    """Run our attention unit on the fixture's unit inputs; rows per group."""
    data, meta = load_fixture(case)
    config = our_config(meta)
    d_k, n_code, L = config.d_k, config.n_code, config.block_len
    params = sub(data, "unit/params/")
    unit = build(VQAttention, config, UNIT_PARAMS, params)
    x, ct = data["unit/x"], data["unit/cotangent"]
    mask = data["unit/loss_mask"].astype(np.float32)
    n_seg, B, T, _ = x.shape
    n_block = T // L

    # One compiled function for the whole unit check: a block's forward and
    # its VJP w.r.t. the unit, the block input and the incoming state (run
    # forward with zero cotangents, then backward through the blocks).
    @fast_jit
    def block(u, xb, st, mb, ct_out, ct_state):
        diff, static = eqx.partition((u, xb, st), eqx.is_inexact_array)

        def f(d):
            u_, xb_, st_ = eqx.combine(d, static)
            out, new, stats = u_(xb_, st_, mask=mb)
            return (out, eqx.filter(new, eqx.is_inexact_array)), (new, stats)

        (out, _), vjp, (new, stats) = jax.vjp(f, diff, has_aux=True)
        (g,) = vjp((ct_out, ct_state))
        return out, new, stats["commit_sum"], g

    def blk(a, s, n):
        return jnp.asarray(a[s][:, n * L : (n + 1) * L])

    state0 = unit.init_state(B)
    zero_state = jax.tree.map(jnp.zeros_like, eqx.filter(state0, eqx.is_inexact_array))
    zero_out = jnp.zeros((B, L, config.d_model), jnp.float32)
    state = state0
    res, states, commits, inputs = [], [], [], []
    for s in range(n_seg):
        for n in range(n_block):
            inputs.append(state)
            out, state, commit, _ = block(
                unit, blk(x, s, n), state, blk(mask, s, n), zero_out, zero_state
            )
            res.append(np.asarray(out))
            states.append(state)
            # Official per-block commit: mean over batch and block positions
            # of the head-summed masked squared distance (pre-scaled space);
            # ours is the sum over tokens (see VectorQuantizer.statistics).
            commits.append(float(commit) / (B * L))
        # between update segments the official train_op stops the gradient
        state = jax.lax.stop_gradient(state)

    forward = [compare("unit output, all blocks", data["unit/res"], np.stack(res))]
    for n, r in enumerate(res):
        forward.append(compare(f"unit output, block {n}", data["unit/res"][n], r))
    forward.append(
        compare("unit commit loss per block", data["unit/l_commit"], commits)
    )

    ref_state = sub(data, "unit/state/")
    check_cache = meta["official_config"]["agg_cache"] == 1
    state_rows = []
    for n, st in enumerate(states):
        ours = _state_as_official(st, d_k, n_code)
        for field, value in ours.items():
            if field.startswith("aggcache") and not check_cache:
                continue  # agg_cache=0: the official cache is never read
            state_rows.append(
                compare(f"state after block {n}: {field}", ref_state[field][n], value)
            )

    # Backward: objective sum_seg <output_seg, cotangent_seg>; within a
    # segment the gradient flows back through the carried state.
    g_x = np.zeros(x.shape, np.float64)
    g_unit = None
    for s in reversed(range(n_seg)):
        ct_state = zero_state
        for n in reversed(range(n_block)):
            i = s * n_block + n
            _, _, _, (gu, gx, gst) = block(
                unit, blk(x, s, n), inputs[i], blk(mask, s, n), blk(ct, s, n), ct_state
            )
            g_x[s][:, n * L : (n + 1) * L] = np.asarray(gx)
            g_unit = gu if g_unit is None else jax.tree.map(jnp.add, g_unit, gu)
            ct_state = gst
    ref_g = sub(data, "unit/grad_params/")
    grads = [compare("unit d/dx", data["unit/grad_x"], g_x)]
    for name, get, kind in UNIT_PARAMS:
        ours = get(g_unit)
        ref = ref_g[name]
        grads.append(
            compare(
                f"unit d/d{name}",
                ref,
                None if ours is None else to_official(ours, ref.shape, kind, d_k),
            )
        )
    return dict(forward=forward, state=state_rows, grads=grads)


@functools.cache
def lm_results(case: str) -> dict:
    data, meta = load_fixture(case)
    config = our_config(meta)
    d_k = config.d_k
    params = sub(data, "lm/params/")
    table = lm_params(config)
    model = build(
        tvq_eqx.Transformer, config, table, params, skip=unused_official(config)
    )
    inputs, targets, mask = (
        data["lm/inputs"],
        data["lm/targets"],
        data["lm/loss_mask"],
    )
    n_seg, B, T = inputs.shape

    @fast_jit
    def segment(m, batch, state):
        (loss, aux), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            m, batch, state
        )
        logprobs, _, _ = m(batch["inputs"], state, mask=batch["loss_mask"])
        return loss, aux, grads, logprobs

    rows = dict(logprobs=[], losses=[], grads=[], codebook=[])
    state = model.init_state(B)
    for s in range(n_seg):
        batch = dict(
            inputs=jnp.asarray(inputs[s]),
            targets=jnp.asarray(targets[s]),
            loss_mask=jnp.asarray(mask[s]),
        )
        loss, aux, grads, logprobs = segment(model, batch, state)
        state = jax.lax.stop_gradient(aux["state"])
        pre = f"lm/seg{s}/"
        metrics = aux["metrics"]
        rows["logprobs"].append(
            compare(f"segment {s}: log-probs", data[pre + "logprobs"], logprobs)
        )
        n_pos = float(B * T)
        rows["losses"] += [
            compare(f"segment {s}: loss (composite)", data[pre + "loss"], loss),
            compare(
                f"segment {s}: l_lm_unscaled (sum over positions / B*T)",
                data[pre + "l_lm_unscaled"],
                float(metrics["lm_loss_sum"]) / n_pos,
            ),
            compare(
                f"segment {s}: l_commit", data[pre + "l_commit"], metrics["commit_loss"]
            ),
        ]
        # The official l_codebook's value is exactly 0 (sg(.) * (x - sg(x)));
        # ours enters `loss` with value 0 too: loss = lm + c_beta * commit.
        assert float(data[pre + "l_codebook"]) == 0.0
        lm_term = (
            float(metrics["lm_loss_sum"]) / n_pos
            if getattr(config, "lm_loss_average", "positions") == "positions"
            else float(metrics["lm_loss"])
        )
        rows["losses"].append(
            compare(
                f"segment {s}: l_codebook (value inside loss)",
                0.0,
                float(loss) - lm_term - config.c_beta * float(metrics["commit_loss"]),
                scale=abs(float(data[pre + "loss"])),
            )
        )
        ref_g = sub(data, pre + "grads/")
        flat_ref, flat_out = [], []
        for name, get, kind in table:
            ours = get(grads)
            ref = ref_g[name]
            mapped = None if ours is None else to_official(ours, ref.shape, kind, d_k)
            rows["grads"].append(compare(f"segment {s}: d/d{name}", ref, mapped))
            if mapped is not None:
                flat_ref.append(ref.ravel())
                flat_out.append(mapped.ravel())
            if kind == "codebook" or name.endswith("c_count"):
                updated = None
                if ours is not None:
                    updated = to_official(get(model), ref.shape, kind, d_k) - mapped
                rows["codebook"].append(
                    compare(
                        f"segment {s}: after update {name}",
                        data[pre + "updated/" + name],
                        updated,
                    )
                )
                # the update itself (c_gamma near 1 makes it small)
                rows["codebook"].append(
                    compare(
                        f"segment {s}: update step {name}",
                        data[pre + "updated/" + name] - params[name],
                        None if updated is None else updated - params[name],
                    )
                )
        for name in unused_official(config):
            rows["grads"].append(
                compare(
                    f"segment {s}: d/d{name} (unused officially)",
                    ref_g[name],
                    0 * ref_g[name],
                )
            )
        rows["grads"].insert(
            0,
            compare(
                f"segment {s}: all gradients",
                np.concatenate(flat_ref),
                np.concatenate(flat_out),
            ),
        )
    return rows


def _rows(fn, case, group):
    try:
        return fn(case)[group]
    except GoldenSetupError as err:
        pytest.fail(f"{case}: {err}")


# ------------------------------------------------------------------- tests --


def test_fixtures_present():
    assert len(CASES) >= 7, f"golden fixtures missing in {GOLDEN}: {CASES}"
    total = sum((GOLDEN / f"{c}.npz").stat().st_size for c in CASES)
    assert total < 1_000_000, f"golden fixtures take {total} bytes"
    for case in CASES:
        data, meta = load_fixture(case)
        assert ("unit/x" in data) == (case in UNIT_CASES), case
        # provenance: written by the official code, float32 on CPU
        assert len(meta["official_commit"]) == 40, meta["official_commit"]
        assert {"jax", "jaxlib", "flax"} <= set(meta["versions"]), meta["versions"]
        assert meta["dtype"] == "float32" and meta["backend"] == "cpu", meta
        # no key's nearest codeword is nearly tied (a flip would be a false alarm)
        assert meta["min_rel_argmin_gap"] >= 1e-4, meta["min_rel_argmin_gap"]


@pytest.mark.parametrize("case", UNIT_CASES)
def test_unit_forward(case):
    """Unit output and commit loss after every block, 2 segments."""
    check(_rows(unit_results, case, "forward"))


@pytest.mark.parametrize("case", UNIT_CASES)
def test_unit_state(case):
    """Carried state (window codes, codewords, values; cache) after every block."""
    check(_rows(unit_results, case, "state"))


@pytest.mark.parametrize("case", UNIT_CASES)
def test_unit_grads(case):
    """Gradients of <output, cotangent> w.r.t. the unit's input and parameters."""
    check(_rows(unit_results, case, "grads"))


@pytest.mark.parametrize("case", CASES)
def test_lm_logprobs(case):
    check(_rows(lm_results, case, "logprobs"))


@pytest.mark.parametrize("case", CASES)
def test_lm_losses(case):
    check(_rows(lm_results, case, "losses"))


@pytest.mark.parametrize("case", CASES)
def test_lm_grads(case):
    check(_rows(lm_results, case, "grads"))


@pytest.mark.parametrize("case", CASES)
def test_codebook_update(case):
    check(_rows(lm_results, case, "codebook"))


if __name__ == "__main__":
    # The full table of relative errors, every case (for docs/parity.md).
    for case in CASES:
        print(f"\n=== {case}")
        for fn in (unit_results, lm_results):
            if fn is unit_results and case not in UNIT_CASES:
                continue
            try:
                groups = fn(case)
            except GoldenSetupError as err:
                print(f"  {fn.__name__}: cannot run: {err}")
                continue
            for group, rows in groups.items():
                worst = max(rows, key=lambda r: r.rel)
                n_bad = sum(not r.ok for r in rows)
                print(
                    f"  {fn.__name__[:-8]:5s} {group:9s} worst rel {worst.rel:9.3g} "
                    f"({worst.quantity}); {n_bad}/{len(rows)} fail"
                )
