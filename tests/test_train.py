"""Optimizer routing, train/eval steps (tvq_eqx.train)."""

import dataclasses
import itertools
import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _runs import TINY_RUN

import tvq_eqx
from tvq_eqx import data, train
from tvq_eqx._config import check_literals

CFG = tvq_eqx.TransformerConfig(
    n_vocab=32, d_model=32, d_k=8, d_v=16, n_head=2, n_code=8, n_layer=1, block_len=8
)


# Shared by several tests so that their compiled steps are reused.
AGGRESSIVE = train.make_optimizer(
    learning_rate=0.5, warmup_steps=0, total_steps=10, weight_decay=0.3, grad_clip=1e-3
)


def _batch(key, b=2, t=32, vocab=32):
    toks = jax.random.randint(key, (b, t + 1), 0, vocab)
    return dict(
        inputs=toks[:, :-1],
        targets=toks[:, 1:],
        loss_mask=jnp.ones((b, t), jnp.float32),
    )


def _codebooks(model):
    units = model.attention_units()
    return [(u.quantizer.codebook_sum, u.quantizer.codebook_count) for u in units]


def test_one_step_moves_codebook_exactly_to_ema_target(getkey):
    model = tvq_eqx.Transformer(CFG, key=getkey())
    batch = _batch(getkey())
    # Aggressive clipping, decay and lr: none of them may touch the codebook.
    ts = train.init_train_state(model, AGGRESSIVE, 2, key=getkey())
    new, _ = train.make_train_step(AGGRESSIVE, update_len=32, donate=False)(ts, batch)

    _, _, aux = model(batch["inputs"], model.init_state(2), mask=batch["loss_mask"])
    vq = aux["vq"]
    for i, (unit, (s, c)) in enumerate(
        zip(model.attention_units(), _codebooks(new.model), strict=True)
    ):
        target = unit.quantizer.ema_update(vq["code_count"][i], vq["code_key_sum"][i])
        np.testing.assert_allclose(s, target.codebook_sum, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(c, target.codebook_count, rtol=1e-6, atol=1e-6)
    # ... while the other parameters did move.
    assert not np.allclose(new.model.embedding.weight, model.embedding.weight)


def test_codebook_reaching_main_optimizer_is_an_error(getkey):
    model = tvq_eqx.Transformer(CFG, key=getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    bad = optax.chain(train.guard_no_codebook(), optax.adam(1e-3))
    with pytest.raises(train.CodebookRoutingError, match="codebook"):
        bad.init(params)
    # The real optimizer routes them away from the guard.
    opt = train.make_optimizer()
    opt.init(params)
    labels = train.param_labels(params)
    cb = [
        lab
        for u in labels.attention_units()
        for lab in (
            u.quantizer.codebook_sum,
            u.quantizer.codebook_count,
            u.quantizer.ema_tally,
        )
    ]
    assert cb and set(cb) == {"codebook"}
    assert jax.tree.leaves(labels).count("codebook") == len(cb)


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_weight_decay_as_official(name, getkey):
    # Official mask: every array that is not 1-D (here also the 0-d abs-PE
    # scale), except u and v (1-D [heads * d_k] officially). Every array is
    # made non-zero, so a wrongly decayed one shows.
    model = tvq_eqx.Transformer(CFG.replace(abs_pe=True), key=getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    params = jax.tree.map(lambda x: x + 0.5, params)
    opt = train.make_optimizer(name, weight_decay=0.1, warmup_steps=0, total_steps=10)
    state = opt.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(opt.update)(zeros, state, params)
    labels = jax.tree.leaves(train.param_labels(params))
    decayed = set()
    for (path, u), p, lab in zip(
        jax.tree_util.tree_leaves_with_path(updates),
        jax.tree.leaves(params),
        labels,
        strict=True,
    ):
        name = jax.tree_util.keystr(path)
        # Rank per layer: stacked layer arrays carry a leading layer axis.
        ndim = p.ndim - (".layers." in name)
        if np.any(np.asarray(u) != 0):
            # decoupled: -wd * theta, not scaled by the learning rate
            np.testing.assert_allclose(u, -0.1 * p, rtol=1e-6, atol=1e-8)
            decayed.add(name.split(".")[-1])
            assert lab == "main" and ndim != 1, name
        else:
            assert lab == "codebook" or ndim == 1 or name.endswith((".u", ".v")), name
    assert decayed == {"weight", "scale", "w_q", "w_kvg", "w_o", "w_r"}


def test_lion_momentum_is_bfloat16_as_official(getkey):
    model = tvq_eqx.Transformer(CFG, key=getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    state = train.make_optimizer("lion").init(params)
    mus = [
        x.mu
        for x in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(x, "mu")
    ]
    dtypes = {x.dtype for mu in mus for x in jax.tree.leaves(mu)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_schedule_warmup_then_cosine_to_a_tenth():
    s = train.lr_schedule(2.0, 10, 110)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(1.0)
    assert float(s(10)) == pytest.approx(2.0)
    assert float(s(60)) == pytest.approx(1.1, rel=1e-5)  # cosine midpoint
    assert float(s(110)) == pytest.approx(0.2)
    assert float(s(500)) == pytest.approx(0.2)
    vals = [float(s(i)) for i in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(vals))


def test_bad_optimizer_arguments():
    # The runtime type checker the tests enable answers first (a TypeError
    # naming the parameter); users get OptimizerConfig's ValueError.
    with pytest.raises((ValueError, TypeError), match="name"):
        train.make_optimizer("sgd")
    with pytest.raises(ValueError, match="learning_rate"):
        train.make_optimizer(learning_rate=0.0)


def test_scan_over_update_segments_equals_sequential_updates(getkey):
    """One train_step over 4 segments == 4 loss_fn/optimizer updates by hand,
    carrying the attention state."""
    model = tvq_eqx.Transformer(
        CFG.replace(p_dropres=0.1, p_droplyr=0.3, p_dropsin=0.2), key=getkey()
    )
    opt = train.make_optimizer(learning_rate=1e-2, warmup_steps=2, total_steps=8)
    ts = train.init_train_state(model, opt, 2, key=getkey())
    batch = _batch(getkey(), t=64)
    new, metrics = jax.jit(
        lambda ts, b: train.train_step(ts, b, optimizer=opt, update_len=16)
    )(ts, batch)

    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state, attn = ts.opt_state, ts.attn_state
    # One sequence key for the whole batch (LayerDrop / sinusoid-dropout
    # masks), then a fresh key per segment.
    rng, seq_key = jax.random.split(jax.random.wrap_key_data(ts.rng))
    total = 0.0

    @jax.jit
    def manual(params, opt_state, attn, seg, sub):
        def f(p):
            return tvq_eqx.loss_fn(
                eqx.combine(p, static), seg, attn, key=sub, sequence_key=seq_key
            )

        (_, aux), g = jax.value_and_grad(f, has_aux=True)(params)
        u, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, u), opt_state, aux

    for i in range(4):
        rng, sub = jax.random.split(rng)
        seg = {k: v[:, 16 * i : 16 * (i + 1)] for k, v in batch.items()}
        params, opt_state, aux = manual(params, opt_state, attn, seg, sub)
        attn = aux["state"]
        total += float(aux["metrics"]["lm_loss_sum"])

    assert int(new.step) == 4
    for a, b in zip(
        jax.tree.leaves(eqx.filter(new.model, eqx.is_inexact_array)),
        jax.tree.leaves(params),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for a, b in zip(
        jax.tree.leaves(new.attn_state), jax.tree.leaves(attn), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    assert float(metrics["lm_loss_sum"]) == pytest.approx(total, rel=1e-5)
    assert float(metrics["token_count"]) == 2 * 64
    assert float(metrics["bits_per_token"]) == pytest.approx(
        total / 128 / math.log(2), rel=1e-5
    )


def test_jitted_donating_step_trains(getkey):
    text = data.load_bytes()[:20_000]
    cfg = CFG.replace(n_vocab=256)
    model = tvq_eqx.Transformer(cfg, key=getkey())
    opt = train.make_optimizer(
        learning_rate=1e-2, warmup_steps=2, total_steps=30, grad_clip=1.0
    )
    ts = train.init_train_state(model, opt, 4, key=getkey())
    stream = data.TokenStream(text, batch_size=4, seq_len=32, seed=0)
    step = train.make_train_step(opt, update_len=16)
    first = None
    for i in range(15):
        ts, m = step(ts, stream.batch(i), reset=(i == 0))
        first = float(m["lm_loss"]) if first is None else first
    assert int(ts.step) == 30
    assert float(m["lm_loss"]) < first - 0.5
    for k in ("code_entropy", "dead_code_fraction", "grad_norm"):
        assert np.isfinite(float(m[k]))


def test_reset_restarts_the_attention_state(getkey):
    model = tvq_eqx.Transformer(CFG, key=getkey())
    ts = train.init_train_state(model, AGGRESSIVE, 2, key=getkey())
    batch = _batch(getkey())
    step = train.make_train_step(AGGRESSIVE, update_len=32, donate=False)
    ts1, _ = step(ts, batch)
    carried = eqx.tree_at(lambda t: t.model, ts1, ts.model)
    _, m_reset = step(carried, batch, reset=True)
    _, m_fresh = step(ts, batch)
    _, m_carry = step(carried, batch)
    assert float(m_reset["lm_loss_sum"]) == pytest.approx(
        float(m_fresh["lm_loss_sum"]), rel=1e-6
    )
    assert float(m_carry["lm_loss_sum"]) != pytest.approx(
        float(m_fresh["lm_loss_sum"]), rel=1e-6
    )


def test_sequence_not_multiple_of_update_segments_is_an_error(getkey):
    model = tvq_eqx.Transformer(CFG, key=getkey())
    opt = train.make_optimizer()
    ts = train.init_train_state(model, opt, 2, key=getkey())
    with pytest.raises(ValueError, match="multiple of the segment length"):
        train.train_step(ts, _batch(getkey(), t=40), optimizer=opt, update_len=16)
    # Segments need not be whole blocks (tests/test_any_length.py), except
    # with a decayed cache.
    decayed = tvq_eqx.Transformer(CFG.replace(cache_decay=0.5), key=getkey())
    ts = train.init_train_state(decayed, opt, 2, key=getkey())
    with pytest.raises(ValueError, match="multiple of block_len"):
        train.train_step(ts, _batch(getkey(), t=36), optimizer=opt, update_len=12)


def test_bf16_activations_keep_float32_params(getkey):
    model = tvq_eqx.Transformer(CFG.replace(dtype="bfloat16"), key=getkey())
    opt = train.make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=4)
    ts = train.init_train_state(model, opt, 2, key=getkey())
    new, m = train.make_train_step(opt, update_len=16)(ts, _batch(getkey()))
    assert np.isfinite(float(m["loss"]))
    for x in jax.tree.leaves(eqx.filter(new.model, eqx.is_inexact_array)):
        assert x.dtype == jnp.float32


def test_evaluate_over_batches_equals_one_long_forward(getkey):
    """Carrying the state across batches and segments == one pass over each
    whole row; bits = nats / (tokens ln 2)."""
    cfg = CFG.replace(n_vocab=256)
    model = tvq_eqx.Transformer(cfg, key=getkey())
    text = data.load_bytes()[: 2 * 96 + 2]
    stream = data.TokenStream(
        text, batch_size=2, seq_len=32, shuffle=False, repeat=False
    )
    assert stream.num_batches == 3
    res = train.evaluate(model, list(stream), segment_len=16)

    rows = np.asarray(text[: 2 * 97]).reshape(2, 97).astype(np.int32)
    logp, _, _ = model(jnp.asarray(rows[:, :96]), model.init_state(2))
    nll = -jnp.take_along_axis(logp, jnp.asarray(rows[:, 1:, None]), axis=-1)
    assert res["token_count"] == 2 * 96
    assert res["lm_loss_sum"] == pytest.approx(float(jnp.sum(nll)), rel=1e-5)
    assert res["bits_per_token"] == pytest.approx(
        res["lm_loss_sum"] / (res["token_count"] * math.log(2)), rel=1e-12
    )
    assert res["perplexity"] == pytest.approx(math.exp(res["nats_per_token"]))
    with pytest.raises(ValueError, match="no batches"):
        train.evaluate(model, [], segment_len=16)


def test_context_len_bounds_the_carried_history():
    from tvq_eqx.train import PRESETS

    tiny = PRESETS["tiny"]
    run = tiny.replace(context_len=4 * tiny.data.seq_len)
    assert [run.resets_state(w) for w in range(9)] == [
        True,
        False,
        False,
        False,
        True,
        False,
        False,
        False,
        True,
    ]
    unbounded = tiny.replace(context_len=0)
    assert [unbounded.resets_state(w) for w in range(3)] == [True, False, False]
    with pytest.raises(
        ValueError, match="context_len=300 must be a multiple of seq_len=256"
    ):
        tiny.replace(context_len=300)
    for name in ("enwik8", "pg19", "imagenet64"):
        assert PRESETS[name].context_len == PRESETS[name].data.seq_len


# The official launch flags, transcribed from scripts/lm_{enwik8,pg19,
# imagenet64}.sh and the scripts/launch.py defaults (pe_lam 100000,
# n_print_step 200, n_save_keep 5, grad_clip None); the flags the scripts take
# from their command line (-t -l -m -s -a -g -p -r -e) at the paper's values.
_SCRIPT_ARGS = dict(
    sequence_len=8192, block_len=512, mem_len=512, n_code=512, agg_cache=1,
    grad_thru_cache=1, dtype="bfloat16", prng_seed=0, n_extra_step=0,
)  # fmt: skip
_SHARED = dict(
    global_batch_size=128, param_dtype="float32", d_k=128, d_ff=0, n_head=1,
    n_layer=24, pe_lam=100000, p_dropemb=0.0, c_beta=0.0001, c_gamma=0.99,
    lr_schedule="cosine", n_warmup_step=10000, n_print_step=200,
    n_save_step=1000, n_eval_step=100, n_save_keep=5,
)  # fmt: skip
OFFICIAL = {
    "enwik8": dict(
        _SCRIPT_ARGS, **_SHARED, dataset="enwik8", update_len=2048, d_model=768,
        d_v=1536, pe_abs=0, p_dropsin=0.2, p_dropres=0.5, p_droplyr=0.3, e_tie=0,
        e_preln=0, e_scale=1.0, grad_clip=0.1, optimizer="adamw", lr_max=0.0004,
        wd_lam=0.0002, p_nucleus=0.9, n_max_step=125000,
    ),
    "pg19": dict(
        _SCRIPT_ARGS, **_SHARED, dataset="pg19", update_len=2048, d_model=2048,
        d_v=4096, pe_abs=0, p_dropsin=0.1, p_dropres=0.1, p_droplyr=0.1, e_tie=1,
        e_preln=1, e_scale=0.005, grad_clip=None, optimizer="adafactor",
        lr_max=0.01, wd_lam=0.0, p_nucleus=0.8, n_max_step=500000,
    ),
    "imagenet64": dict(
        _SCRIPT_ARGS | dict(sequence_len=12288), **_SHARED, dataset="imagenet64",
        update_len=1536, d_model=2048, d_v=4096, pe_abs=1, p_dropsin=0.1,
        p_dropres=0.0, p_droplyr=0.0, e_tie=1, e_preln=1, e_scale=0.005,
        grad_clip=None, optimizer="adafactor", lr_max=0.01, wd_lam=0.0,
        p_nucleus=0.999, n_max_step=500000,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", ["enwik8", "pg19", "imagenet64"])
def test_presets_equal_the_official_launch_scripts(name):
    from tvq_eqx.train import OFFICIAL_LAUNCH, PRESETS, from_official

    assert OFFICIAL_LAUNCH[name] == OFFICIAL[name]
    run = PRESETS[name]
    assert run == from_official(OFFICIAL[name])  # every field of both configs
    # The mapping, flag by flag.
    o, m = OFFICIAL[name], run.model
    pairs = [
        (m.d_model, o["d_model"]), (m.d_k, o["d_k"]), (m.d_v, o["d_v"]),
        (m.n_head, o["n_head"]), (m.n_layer, o["n_layer"]), (m.n_code, o["n_code"]),
        (m.block_len, o["block_len"]), (m.mem_len, o["mem_len"]),
        (m.p_dropemb, o["p_dropemb"]), (m.p_dropsin, o["p_dropsin"]),
        (m.p_dropres, o["p_dropres"]), (m.p_droplyr, o["p_droplyr"]),
        (m.c_beta, o["c_beta"]), (m.c_gamma, o["c_gamma"]),
        (m.tie_embeddings, bool(o["e_tie"])), (m.output_norm, bool(o["e_preln"])),
        (m.e_scale, o["e_scale"]), (m.abs_pe, bool(o["pe_abs"])),
        (m.pe_lam, o["pe_lam"]), (m.param_dtype, o["param_dtype"]),
        (m.dtype, o["dtype"]), (m.attention, "vq"),
        (m.grad_thru_cache, bool(o["grad_thru_cache"])),
        (run.data.batch_size, o["global_batch_size"]),
        (run.data.seq_len, o["sequence_len"]),
        (run.update_len, o["update_len"]), (run.optimizer.name, o["optimizer"]),
        (run.optimizer.learning_rate, o["lr_max"]),
        (run.optimizer.weight_decay, o["wd_lam"]),
        (run.optimizer.grad_clip, o["grad_clip"]),
        (run.optimizer.warmup_steps, o["n_warmup_step"]),
        (run.steps, o["n_max_step"]), (run.optimizer.final_lr_ratio, 0.1),
        (run.top_p, o["p_nucleus"]), (run.log_every, o["n_print_step"]),
        (run.eval_every, o["n_save_step"]), (run.eval_batches, o["n_eval_step"]),
        (run.keep, o["n_save_keep"]), (run.seed, o["prng_seed"]),
        (run.context_len, o["sequence_len"]),
    ]  # fmt: skip
    for i, (ours, official) in enumerate(pairs):
        assert ours == official, (name, i, ours, official)
    # Defaults the scripts rely on: the official forms of every option.
    assert (m.qk_norm, m.layerdrop, m.drop_mask_scope, m.lm_loss_average) == (
        "rms",
        "unit",
        "sequence",
        "positions",
    )


def test_from_official_rejects_what_it_cannot_reproduce():
    from tvq_eqx.train import from_official

    base = OFFICIAL["enwik8"]
    for change, match in [
        (dict(d_ff=3072), "d_ff"),
        (dict(n_extra_step=10), "n_extra_step"),
        (dict(lr_schedule="inv_sqrt"), "lr_schedule"),
        (dict(dataset="wikitext"), "dataset must be one of"),
        (dict(frobnicate=1), "unknown official launch flags"),
    ]:
        with pytest.raises(ValueError, match=match):
            from_official(base | change)
    window = from_official(base | dict(agg_cache=0, grad_thru_cache=0))
    assert window.model.attention == "window"
    assert window.model.grad_thru_cache is False


def test_checkpoint_of_the_old_parameter_layout_is_a_clear_error(tmp_path, getkey):
    import json

    model = tvq_eqx.Transformer(CFG, key=getkey())
    ts = train.init_train_state(model, AGGRESSIVE, 2, key=getkey())
    path = train.save_checkpoint(tmp_path, ts, step=1)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(dict(meta, format_version=1)))
    with pytest.raises(train.CheckpointError, match="earlier tvq-eqx .*format 1"):
        train.load_checkpoint(tmp_path, ts)


# ----------------------------------------------------------------------------
# Configs: Literal fields checked in one place, nested replace, dict round trip


@dataclasses.dataclass(frozen=True)
class _Modes:
    mode: Literal["a", "b"] = "a"
    impl: Literal["x", "y"] | None = None
    flag: Literal[True] = True
    size: int = 1

    def __post_init__(self):
        check_literals(self)


def test_check_literals_names_field_and_allowed_values():
    # (a dataclass outside tvq_eqx: the runtime type checker the tests enable
    # would otherwise answer before __post_init__)
    _Modes(mode="b", impl=None, size=7)
    _Modes(impl="y")
    with pytest.raises(ValueError) as e:
        _Modes(mode="c")
    assert str(e.value) == "_Modes.mode must be one of 'a', 'b'; got 'c'"
    with pytest.raises(
        ValueError, match=r"_Modes.impl must be one of 'x', 'y', None; got 'z'"
    ):
        _Modes(impl="z")
    with pytest.raises(ValueError, match="_Modes.flag must be one of True; got 1"):
        _Modes(flag=1)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: tvq_eqx.TransformerConfig(attention="sparse"), "attention"),
        (lambda: tvq_eqx.TransformerConfig(implementation="cuda"), "implementation"),
        (lambda: train.DataConfig(kind="audio"), "kind"),
        (lambda: train.OptimizerConfig(name="sgd"), "name"),
    ],
)
def test_config_literal_fields_are_checked(make, field):
    with pytest.raises((ValueError, TypeError), match=field):
        make()


def test_run_config_nested_replace_and_dict_round_trip():
    tiny = train.PRESETS["tiny"]
    run = tiny.replace(steps=8, model=dict(block_len=16), data=dict(seq_len=64),
                       update_len=32, context_len=0)  # fmt: skip
    assert run.model.mem_len == 16  # followed block_len
    assert run.optimizer is tiny.optimizer
    assert train.RunConfig.from_dict(run.to_dict()) == run
    with pytest.raises(
        ValueError, match=r"unknown TransformerConfig field\(s\) \['d_modle'\]"
    ):
        run.updated(dict(model=dict(d_modle=3)))
    with pytest.raises(ValueError, match="must be a multiple of"):
        run.replace(data=dict(seq_len=40))
    # The flat layout of earlier checkpoints still loads.
    flat = {k: v for k, v in run.to_dict().items() if k not in ("data", "optimizer")}
    flat.update(data=None, data_kind="bytes", tokenizer=None, batch_size=8,
                seq_len=64, optimizer="adamw", learning_rate=3e-3, warmup_steps=20,
                weight_decay=2e-4, grad_clip=1.0, final_lr_ratio=0.1)  # fmt: skip
    assert train.RunConfig.from_dict(flat) == run
    # A non-default PallasConfig round-trips; None (earlier run.json) = default.
    pallas = tvq_eqx.PallasConfig(tvq_eqx.ops.BlockSizes(block_q=8), backward="xla")
    tiles = run.replace(model=dict(pallas=pallas))
    assert train.RunConfig.from_dict(tiles.to_dict()).model.pallas == pallas
    assert train.RunConfig.from_dict(tiles.to_dict()) == tiles
    assert run.replace(model=dict(pallas=dict(backward="xla"))).model.pallas == (
        tvq_eqx.PallasConfig(backward="xla")
    )
    old = run.to_dict()
    old["model"]["pallas"] = None
    assert train.RunConfig.from_dict(old) == run


# ----------------------------------------------------------------------------
# fit: the training loop

FIT_RUN = TINY_RUN.replace(steps=8, eval_every=4, save_every=4)


def _fit_streams(run):
    toks = (np.arange(4000) * 7 % 251).astype(np.int32)
    return (
        train.make_stream(run, toks[:3000], train=True),
        train.make_stream(run, toks[3000:], train=False),
    )


class _Interrupt(train.Callback):
    def __init__(self, at, how="raise"):
        self.at, self.how = at, how

    def on_step(self, step, metrics, train_state):
        if step == self.at:
            if self.how == "raise":
                raise KeyboardInterrupt
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)


def _state_bytes(ts):
    return [
        np.asarray(x).tobytes() for x in jax.tree.leaves(eqx.filter(ts, eqx.is_array))
    ]


def test_fit_interrupt_checkpoints_and_resume_equals_uninterrupted(tmp_path):
    run = FIT_RUN
    stream, val = _fit_streams(run)
    full = train.fit(train.new_train_state(run), run, stream, eval_stream=val,
                     checkpoint_dir=tmp_path / "a", handle_sigint=False)  # fmt: skip
    assert full.status == "completed" and full.step == 8
    assert [r["step"] for r in full.history if r["split"] == "train"] == [2, 4, 6, 8]
    assert [r["step"] for r in full.history if r["split"] == "validation"] == [4, 8]
    assert full.validation["bits_per_token"] == full.history[-1]["bits_per_token"]
    assert sorted(p.name for p in train.list_checkpoints(tmp_path / "a")) == [
        "step_00000004", "step_00000008"]  # fmt: skip
    assert train.read_meta(tmp_path / "a")["validation"] == full.validation

    # KeyboardInterrupt from a callback after update 6: that step is saved,
    # the interrupt propagates.
    b = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train.fit(train.new_train_state(run), run, stream, eval_stream=val,
                  checkpoint_dir=b, callbacks=[_Interrupt(6)], handle_sigint=False)  # fmt: skip
    meta = train.read_meta(b)
    assert (
        meta["step"] == 6 and meta["interrupted"] is True and meta["batch_index"] == 3
    )
    like = eqx.filter_eval_shape(train.new_train_state, run)
    ts, _ = train.load_checkpoint(b, like)
    assert int(ts.step) == 6
    resumed = train.fit(ts, run, stream, eval_stream=val, checkpoint_dir=b,
                        handle_sigint=False)  # fmt: skip
    assert resumed.status == "completed" and resumed.step == 8
    assert _state_bytes(resumed.train_state) == _state_bytes(full.train_state)
    assert resumed.validation == full.validation


def test_fit_sigint_finishes_the_batch_saves_and_returns(tmp_path):
    import signal

    run = FIT_RUN
    stream, val = _fit_streams(run)
    # Python's own handler, whatever this process inherited (a process started
    # in the background of a shell ignores SIGINT).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        res = train.fit(train.new_train_state(run), run, stream, eval_stream=val,
                        checkpoint_dir=tmp_path, callbacks=[_Interrupt(2, how="signal")])  # fmt: skip
        # fit's handler is gone again: the one before it is back.
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert res.status == "interrupted" and res.step == 2
    assert train.read_meta(tmp_path)["step"] == 2


def test_fit_stop_at_and_stop_training(tmp_path):
    run = FIT_RUN
    stream, _ = _fit_streams(run)
    res = train.fit(train.new_train_state(run), run, stream, stop_at=5,
                    checkpoint_dir=tmp_path, handle_sigint=False)  # fmt: skip
    assert (res.status, res.step, res.validation) == ("stopped", 4, None)
    assert train.read_meta(tmp_path)["step"] == 4

    class Stop(train.Callback):
        def on_log(self, record):
            raise train.StopTraining

    res = train.fit(train.new_train_state(run), run, stream, callbacks=[Stop()],
                    handle_sigint=False)  # fmt: skip
    assert (res.status, res.step, res.checkpoint) == ("stopped", 2, None)


def test_adafactor_statistics_per_layer_as_official(getkey, monkeypatch):
    # Official: the layers are a Python list, so Adafactor's parameter scale
    # and update clipping (RMS over a whole leaf) are per layer. Reference: the
    # same optimizer with plain Adafactor on per-layer leaves (the stacked
    # arrays sliced). Layers are scaled differently so that mixing them shows.
    from tvq_eqx.train import _checkpoint, _optimizer

    model = tvq_eqx.Transformer(CFG.replace(n_layer=3), key=getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    scale = jnp.array([1.0, 4.0, 0.25])

    def per_layer_scaled(tree, power):
        def f(x):
            return x * scale.reshape((-1,) + (1,) * (x.ndim - 1)) ** power

        stack = jax.tree.map(f, tree.layers.stacked)
        return eqx.tree_at(lambda t: t.layers.stacked, tree, stack)

    params = per_layer_scaled(params, 1)
    grads = jax.tree.map(lambda x: jax.random.normal(getkey(), x.shape), params)
    grads = per_layer_scaled(grads, 2)
    kw = dict(learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.01)

    def two_updates(opt, p, g):
        state = opt.init(p)
        u1, state = opt.update(g, state, p)
        u2, _ = opt.update(jax.tree.map(lambda x: 0.5 * x, g), state, p)
        return u1, u2

    ours = two_updates(train.make_optimizer("adafactor", **kw), params, grads)
    monkeypatch.setattr(_optimizer, "per_layer", lambda inner: inner)
    plain = train.make_optimizer("adafactor", **kw)
    unstack = _checkpoint.unstack_layers
    ref = two_updates(plain, unstack(params), unstack(grads))
    ref = tuple(_checkpoint.restack_layers(params, r) for r in ref)
    mixed = two_updates(plain, params, grads)

    max_err = max_mix = 0.0
    for o, r, m in zip(
        jax.tree.leaves(ours), jax.tree.leaves(ref), jax.tree.leaves(mixed), strict=True
    ):
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-7)
        max_err = max(max_err, float(jnp.max(jnp.abs(o - r))))
        max_mix = max(max_mix, float(jnp.max(jnp.abs(m - r))))
    # Plain Adafactor on the stacked leaves is measurably different.
    assert max_mix > 1e3 * max(max_err, 1e-7), (max_mix, max_err)
