"""Data parallelism: a 4-device step equals the 1-device step on the same
global batch (loss, gradients, new codebook), every device holding the same
codebook.

jax reads `XLA_FLAGS` once, at import, so the comparison runs in a fresh
interpreter with `--xla_force_host_platform_device_count=4`; it prints the
largest differences as JSON, which this test checks.
"""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    import tvq_eqx
    from tvq_eqx import train

    assert jax.device_count() == 4, jax.devices()
    cfg = tvq_eqx.TransformerConfig(n_vocab=64, d_model=32, d_k=8, d_v=16, n_head=2,
                                    n_code=8, n_layer=1, block_len=8)
    model = tvq_eqx.Transformer(cfg, key=jax.random.key(0))
    toks = np.asarray(jax.random.randint(jax.random.key(1), (8, 33), 0, 64), np.int32)
    mask = np.ones((8, 32), np.float32)
    mask[5, 20:] = 0.0  # padding on one device's rows only
    batch = dict(inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=mask)
    opt = train.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=4)

    def grads(model, b):
        f = lambda m: tvq_eqx.loss_fn(m, b, m.init_state(8))
        (loss, aux), g = eqx.filter_value_and_grad(f, has_aux=True)(model)
        return loss, g

    mesh = train.make_mesh()
    out = {}
    loss1, g1 = eqx.filter_jit(grads)(model, {k: jnp.asarray(v) for k, v in batch.items()})
    loss4, g4 = eqx.filter_jit(grads)(model, train.shard_batch(batch, mesh))
    out["loss"] = abs(float(loss1) - float(loss4))
    out["grads"] = max(float(jnp.max(jnp.abs(a - b)))
                       for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)))

    def run(mesh):
        ts = train.init_train_state(model, opt, 8, key=jax.random.key(2))
        if mesh is not None:
            ts = train.shard_train_state(ts, mesh)
        step = train.make_train_step(opt, update_len=16, mesh=mesh)
        ts, m = step(ts, batch, reset=True)
        ts, m2 = step(ts, batch)
        return ts, m2

    ts1, m1 = run(None)
    ts4, m4 = run(mesh)
    out["params"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(eqx.filter(ts1.model, eqx.is_inexact_array)),
        jax.tree.leaves(eqx.filter(ts4.model, eqx.is_inexact_array))))
    out["metrics_loss"] = abs(float(m1["loss"]) - float(m4["loss"]))
    cb = 0.0
    same_on_devices = True
    for u1, u4 in zip(ts1.model.attention_units(), ts4.model.attention_units()):
        for a, b in ((u1.quantizer.codebook_sum, u4.quantizer.codebook_sum),
                     (u1.quantizer.codebook_count, u4.quantizer.codebook_count)):
            cb = max(cb, float(jnp.max(jnp.abs(a - b))))
            shards = [np.asarray(s.data) for s in b.addressable_shards]
            same_on_devices &= len(shards) == 4 and b.sharding.is_fully_replicated
            same_on_devices &= all(np.array_equal(shards[0], s) for s in shards)
    out["codebook"] = cb
    out["codebook_same_on_all_devices"] = bool(same_on_devices)
    out["attn_state_sharded"] = not ts4.attn_state.units[0].cache_mean.sharding.is_fully_replicated
    print("RESULT " + json.dumps(out))
    """
)


def test_four_devices_equal_one_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    print(res)  # the report quotes these numbers
    assert res["loss"] < 1e-6
    assert res["grads"] < 1e-6
    assert res["params"] < 1e-5
    assert res["metrics_loss"] < 1e-5
    assert res["codebook"] < 1e-5
    assert res["codebook_same_on_all_devices"]
    assert res["attn_state_sharded"]
