"""The Pallas path under data and head parallelism, and its eager compile cache.

Sharded checks run on the 4 CPU devices the test session starts with
(`jax_num_cpu_devices=4` in conftest.py): a module fixture runs every sharded
check once and the tests below assert on its figures. Interpret mode
throughout (CPU).

- `jit` with batch-sharded (and head-sharded) operands: the compiled HLO of the
  forward and of `value_and_grad` has no all-gather, and the results equal the
  unsharded call (float32; the only difference is the order of the cross-device
  sum in the `rel_table` gradient, measured <= 1.05e-6 relative).
- `jax.shard_map` with its default checks (`check_vma=True`) around the op.
- The library's 4-device train step: no more all-gathers with
  implementation="pallas" than with "xla".

In this process: the same `shard_map` program lowers for GPU (Triton) and TPU
(Mosaic) on abstract 4-device meshes; vmap equals per-example calls; a second
eager call with the same shapes does not trace again.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inputs import attention_inputs

# (B, T, H, K, V, S, L): batch and heads divisible by the 4 devices / a 2x2 mesh;
# the relative-position bias and the cache are both on, so every kernel runs.
SHAPE = (4, 16, 2, 8, 16, 8, 8)
# float32, same kernels on the same rows: only the order of the cross-device sums
# differs (the rel_table gradient). Measured worst: 9.9e-7 at -O3, 1.05e-6 with
# the suite's -O0 compiles (shard_map), about 9 float32 ulps; 4e-6 leaves room
# for other summation orders.
TOL = 4e-6


def _all_gathers(hlo: str) -> int:
    return len(_gathered_shapes(hlo))


def _gathered_shapes(hlo: str) -> list[list[int]]:
    """Result shapes of the all-gathers in a compiled HLO module."""
    found = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)
    return [[int(d) for d in dims.split(",") if d] for dims in found]


def _rel(ref, out) -> float:
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    return float(np.linalg.norm(ref - out) / max(np.linalg.norm(ref), 1e-30))


def _inputs(shape):
    return attention_inputs(jax.random.key(0), shape)


def _attend(query, key, value, codebook, rel_query, rel_table):
    import tvq_eqx

    out, state = tvq_eqx.ops.vq_attention_with_state(
        query,
        key,
        value,
        codebook,
        None,
        block_len=SHAPE[-1],
        rel_query=rel_query,
        rel_table=rel_table,
        implementation="pallas",
    )
    return out, state.cache_mean


def _loss(*args):
    out, cache_mean = _attend(*args)
    return jnp.sum(out * jnp.cos(out)) + jnp.sum(cache_mean**2)


# Gradients in every differentiable input (the codebook gets none).
_GRAD = jax.value_and_grad(_loss, argnums=(0, 1, 2, 4, 5))


def _sharded_checks() -> dict:
    """Every sharded check; runs in a process with 4 CPU devices."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import tvq_eqx
    from tvq_eqx import train
    from tvq_eqx.train._steps import _train_keeping

    assert jax.device_count() == 4, jax.devices()
    res = {}
    args = tuple(_inputs(SHAPE).values())
    ref_fwd = jax.jit(_attend)(*args)
    ref_grad = jax.jit(_GRAD)(*args)

    def compare(name, ref, out):
        res[name] = max(
            _rel(a, b)
            for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out), strict=True)
        )

    # Batch-sharded (1-D mesh) and batch x head sharded (2x2 mesh) operands.
    meshes = {
        "batch": (Mesh(np.array(jax.devices()), ("data",)), P("data"), P()),
        "batch_head": (
            Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model")),
            P("data", None, "model"),
            P("model"),
        ),
    }
    for name, (mesh, act, head) in meshes.items():
        # Activations [B, T, H, .] split by `act`; codebook [H, S, K] and
        # rel_table [dist, H, K] split over heads by `head` / on axis 1.
        table = P(None, *head) if head else P()
        specs = (act, act, act, head, act, table)
        placed = tuple(
            jax.device_put(a, NamedSharding(mesh, s))
            for a, s in zip(args, specs, strict=True)
        )
        for what, fn, ref in (
            ("fwd", _attend, ref_fwd),
            ("grad", _GRAD, ref_grad),
        ):
            compiled = jax.jit(fn).lower(*placed).compile()
            res[f"{name}_{what}_gathered"] = _gathered_shapes(compiled.as_text())
            compare(f"{name}_{what}_err", ref, compiled(*placed))

    # shard_map with the default checks: the loss summed over devices, each
    # device's gradients its own rows'; rel_table is replicated, so its
    # gradient comes back summed (invariant).
    mesh = meshes["batch"][0]

    def local(*a):
        value, grads = _GRAD(*a)
        return jax.lax.psum(value, "data"), grads

    specs = (P("data"),) * 3 + (P(), P("data"), P())
    grad_specs = (P("data"),) * 4 + (P(),)
    mapped = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), grad_specs))
    )
    compare("shard_map_err", ref_grad, mapped(*args))

    # The library's train step on 4 devices, xla against pallas.
    toks = np.asarray(jax.random.randint(jax.random.key(1), (8, 33), 0, 64), np.int32)
    batch = dict(
        inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=np.ones((8, 32), np.float32)
    )
    opt = train.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=4)
    mesh = train.make_mesh()
    placed = train.shard_batch(batch, mesh)
    placed["reset"] = jnp.asarray(True)
    for impl in ("xla", "pallas"):
        cfg = tvq_eqx.TransformerConfig(
            n_vocab=64,
            d_model=32,
            d_k=8,
            d_v=16,
            n_head=2,
            n_code=8,
            n_layer=1,
            block_len=8,
            implementation=impl,
        )
        model = tvq_eqx.Transformer(cfg, key=jax.random.key(0))
        ts = train.init_train_state(model, opt, 8, key=jax.random.key(2))
        ts = train.shard_train_state(ts, mesh)
        lowered = _train_keeping.lower(placed, ts, opt, 16, mesh, False, False, 1)
        hlo = lowered.lowered.compile().as_text()
        res[f"train_step_{impl}_all_gathers"] = _all_gathers(hlo)
    return res


@pytest.fixture(scope="module")
def sharded():
    res = _sharded_checks()
    print(res)  # the report quotes these figures
    return res


@pytest.mark.parametrize("what", ["fwd", "grad"])
def test_batch_sharded_jit_has_no_all_gather(sharded, what):
    assert sharded[f"batch_{what}_gathered"] == []
    assert sharded[f"batch_{what}_err"] <= TOL


@pytest.mark.parametrize("what", ["fwd", "grad"])
def test_head_sharded_jit_gathers_only_the_codebook(sharded, what):
    """Batch and heads both split (2x2 mesh): no activation is gathered. The
    head-split codebook (a parameter) is gathered once by the XLA glue before
    the kernels; implementation="xla" does the same."""
    _, _, h, k, _, s, _ = SHAPE
    assert all(shape == [h, s, k] for shape in sharded[f"batch_head_{what}_gathered"])
    assert len(sharded[f"batch_head_{what}_gathered"]) <= 1
    assert sharded[f"batch_head_{what}_err"] <= TOL


def test_inside_shard_map_with_default_checks(sharded):
    assert sharded["shard_map_err"] <= TOL


def test_train_step_gathers_no_more_than_xla(sharded):
    pallas = sharded["train_step_pallas_all_gathers"]
    xla = sharded["train_step_xla_all_gathers"]
    assert pallas <= xla, (pallas, xla)


@pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"
)
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_shard_map_lowers_for_gpu_and_tpu(platform):
    """Inside `jax.shard_map` (default checks) on a 4-device GPU / TPU mesh,
    forward and backward lower to Triton / Mosaic kernels: the kernel outputs
    carry the varying type there too, and no interpreter is involved. Lowering
    only (abstract devices), so it runs on CPU."""
    from jax.sharding import (
        AbstractDevice,
        AbstractMesh,
        NamedSharding,
        use_abstract_mesh,
    )
    from jax.sharding import PartitionSpec as P

    device = {
        "cuda": AbstractDevice("NVIDIA H100 80GB HBM3", 132, "cuda"),
        "tpu": AbstractDevice("TPU v5p", 1, "tpu"),
    }[platform]
    mesh = AbstractMesh((4,), ("data",), abstract_device=device)
    b, t, h, k, v, s, blk = 8, 64, 2, 64, 64, 32, 32
    shapes = ((b, t, h, k),) * 2 + ((b, t, h, v), (h, s, k), (b, t, h, k))
    shapes += ((blk + 1, h, k),)
    specs = (P("data"),) * 3 + (P(), P("data"), P())
    args = tuple(
        jax.ShapeDtypeStruct(
            shape,
            jnp.float32 if i == 3 else jnp.bfloat16,
            sharding=NamedSharding(mesh, spec),
        )
        for i, (shape, spec) in enumerate(zip(shapes, specs, strict=True))
    )

    def loss(*a):
        import tvq_eqx

        out, state = tvq_eqx.ops.vq_attention_with_state(
            *a[:4],
            None,
            block_len=blk,
            rel_query=a[4],
            rel_table=a[5],
            implementation="pallas",
        )
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(
            state.cache_mean.astype(jnp.float32)
        )

    def local(*a):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 4, 5))(*a)
        return jax.lax.psum(value, "data"), grads

    mapped = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=specs,
            out_specs=(P(), (P("data"),) * 4 + (P(),)),
        )
    )
    with use_abstract_mesh(mesh):
        hlo = mapped.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    marker = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[platform]
    assert "vq_attention_fwd" in hlo
    assert hlo.count(marker) >= 4, hlo.count(marker)  # forward + backward kernels


def test_eager_calls_trace_once_per_shape():
    """A second eager call with the same shapes reuses the compiled program."""
    import tvq_eqx

    traces = []

    def listener(event, duration, **kwargs):
        del duration
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(kwargs.get("fun_name"))

    shape = (1, 16, 2, 4, 8, 5, 8)
    args = _inputs(shape)
    base = (args["query"], args["key"], args["value"], args["codebook"])
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first = tvq_eqx.vq_attention(*base, block_len=8, implementation="pallas")
        n_first = traces.count("vq_attention_pallas")
        second = tvq_eqx.vq_attention(*base, block_len=8, implementation="pallas")
        n_second = traces.count("vq_attention_pallas") - n_first
        shorter = tvq_eqx.vq_attention(
            *(x[:, :8] for x in base[:3]), base[3], block_len=8, implementation="pallas"
        )
        n_new_shape = traces.count("vq_attention_pallas") - n_first - n_second
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert n_first == 1, traces
    assert n_second == 0, traces
    assert n_new_shape == 1, traces  # the counter does see a new trace
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    assert shorter.shape == (1, 8, 2, 8)


def test_vmap_equals_per_example_calls():
    """custom_partitioning has no batching rule: under vmap the mapped axis is
    folded into the batch (or, for a per-example codebook, the plain kernels
    are vmapped). Forward and gradients equal the per-example calls."""
    from tvq_eqx.ops._pallas import vq_attention_pallas

    shape = (2, 16, 2, 4, 8, 5, 8)
    ex = [_inputs(shape), _inputs(shape)]
    ex[1] = {k: 0.5 * x[..., ::-1] for k, x in ex[1].items()}  # a different example
    stacked = {k: jnp.stack([e[k] for e in ex]) for k in ex[0]}

    def loss(q, k, v, codebook):
        out, _ = vq_attention_pallas(q, k, v, codebook, block_len=8, scale=0.5)
        return jnp.sum(out * jnp.cos(out)), out

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    names = ("query", "key", "value", "codebook")
    for codebook_axis in (None, 0):  # shared codebook, codebook per example
        axes = (0, 0, 0, codebook_axis)
        args = [
            stacked[n] if a == 0 else ex[0][n] for n, a in zip(names, axes, strict=True)
        ]
        got_grads, got_out = jax.jit(jax.vmap(grad, in_axes=axes))(*args)
        for i, e in enumerate(ex):
            codebook = e["codebook"] if codebook_axis == 0 else ex[0]["codebook"]
            want_grads, want_out = grad(e["query"], e["key"], e["value"], codebook)
            assert _rel(want_out, got_out[i]) <= TOL
            for w, g in zip(want_grads, got_grads, strict=True):
                assert _rel(w, g[i]) <= TOL
