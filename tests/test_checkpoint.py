"""Checkpoints: bit-for-bit resume, atomic writes, corrupt/mismatched files."""

import json

import equinox as eqx
import jax
import numpy as np
import pytest

import tvq_eqx
from tvq_eqx import data, train
from tvq_eqx.train import _checkpoint

CFG = tvq_eqx.TransformerConfig(
    n_vocab=256,
    d_model=32,
    d_k=8,
    d_v=16,
    n_head=1,
    n_code=8,
    n_layer=1,
    block_len=8,
    p_dropres=0.1,
)
N = 3  # batches per half


def _setup(cfg=CFG):
    opt = train.make_optimizer(learning_rate=1e-2, warmup_steps=2, total_steps=4 * N)

    def build():
        model = tvq_eqx.Transformer(cfg, key=jax.random.key(0))
        return train.init_train_state(model, opt, 2, key=jax.random.key(1))

    return opt, build


def _stream():
    return data.TokenStream(data.load_bytes()[:4000], batch_size=2, seq_len=32, seed=3)


def _run(ts, step, stream, start, stop):
    for i in range(start, stop):
        _, window = stream.epoch_and_window(i)
        ts, _ = step(ts, stream.batch(i), reset=window == 0)
    return ts


def _host_leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_train_2n_equals_train_n_save_load_train_n(tmp_path):
    opt, build = _setup()
    stream = _stream()
    step = train.make_train_step(opt, update_len=16)
    straight = _run(build(), step, stream, 0, 2 * N)

    half = _run(build(), step, stream, 0, N)
    train.save_checkpoint(tmp_path, half, step=int(half.step), meta=dict(batch_index=N))
    del half
    like = eqx.filter_eval_shape(build)
    loaded, meta = train.load_checkpoint(tmp_path, like)
    assert meta["batch_index"] == N and meta["step"] == 2 * N
    resumed = _run(loaded, step, stream, meta["batch_index"], 2 * N)

    a, b = _host_leaves(straight), _host_leaves(resumed)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)  # bit for bit


def test_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _, build = _setup()
    ts = build()
    good = train.save_checkpoint(tmp_path, ts, step=1)
    before = (good / "state.eqx").read_bytes()

    def crash(f, tree, **kw):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(_checkpoint.eqx, "tree_serialise_leaves", crash)
    # One line naming the checkpoint and the cause (the partial folder gone).
    with pytest.raises(train.CheckpointError, match="step_00000002: disk full"):
        train.save_checkpoint(tmp_path, ts, step=2)
    assert not list(tmp_path.glob(".tmp-*"))
    monkeypatch.undo()

    assert train.latest_checkpoint(tmp_path) == good
    assert (good / "state.eqx").read_bytes() == before
    assert [p.name for p in train.list_checkpoints(tmp_path)] == ["step_00000001"]
    train.load_checkpoint(tmp_path, eqx.filter_eval_shape(build))
    # The next save cleans the stale temporary folder up.
    train.save_checkpoint(tmp_path, ts, step=2)
    assert not list(tmp_path.glob(".tmp-*"))
    assert train.latest_checkpoint(tmp_path).name == "step_00000002"


def test_keep_only_the_newest(tmp_path):
    _, build = _setup()
    ts = build()
    for s in range(1, 6):
        train.save_checkpoint(tmp_path, ts, step=s, keep=2)
    assert [p.name for p in train.list_checkpoints(tmp_path)] == [
        "step_00000004",
        "step_00000005",
    ]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    _, build = _setup()
    path = train.save_checkpoint(tmp_path, build(), step=1)
    raw = bytearray((path / "state.eqx").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (path / "state.eqx").write_bytes(bytes(raw))
    with pytest.raises(train.CheckpointError, match="corrupt"):
        train.load_checkpoint(tmp_path, eqx.filter_eval_shape(build))
    (path / "meta.json").write_text("{not json")
    with pytest.raises(train.CheckpointError, match="cannot read"):
        train.load_checkpoint(tmp_path, eqx.filter_eval_shape(build))
    (tmp_path / "LATEST").write_text("step_00000099\n")
    with pytest.raises(train.CheckpointError, match="not a complete checkpoint"):
        train.load_checkpoint(tmp_path, eqx.filter_eval_shape(build))
    with pytest.raises(train.CheckpointError, match="no checkpoint"):
        train.load_checkpoint(tmp_path / "missing", eqx.filter_eval_shape(build))


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    _, build = _setup()
    train.save_checkpoint(tmp_path, build(), step=1)
    _, other = _setup(CFG.replace(d_model=48))
    with pytest.raises(train.CheckpointError, match="does not match"):
        train.load_checkpoint(tmp_path, eqx.filter_eval_shape(other))


def _as_format(path, version):
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(dict(meta, format_version=version)))


def test_old_unrolled_checkpoint_loads_into_stacked_layers(tmp_path):
    # A format-2 checkpoint held one subtree per layer (`layers` a tuple of
    # TransformerLayers) in the model and in the optimizer moments:
    # `unstack_layers` gives exactly that tree, so saving it and marking it
    # format 2 is such a checkpoint.
    opt, build = _setup(CFG.replace(n_layer=3))
    step = train.make_train_step(opt, update_len=16)
    stream = _stream()
    # Format 2 predates the codebook tally: it loads as 1 (a whole number).
    ts = _run(build(), step, stream, 0, 1)
    old = _old_layout(_checkpoint.without_tally(_checkpoint.unstack_layers(ts)))
    assert isinstance(old.model.layers, tuple) and len(old.model.layers) == 3
    path = train.save_checkpoint(tmp_path, old, step=1)
    _as_format(path, 2)
    loaded, _ = train.load_checkpoint(tmp_path, eqx.filter_eval_shape(build))
    assert isinstance(loaded.model.layers, tvq_eqx.nn.LayerStack)
    ts = _unit_tallies(ts)
    a, b = _host_leaves(ts), _host_leaves(loaded)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    # ... and training goes on from it as from the original.
    cont = _host_leaves(_run(ts, step, stream, 1, 2))
    for x, y in zip(cont, _host_leaves(_run(loaded, step, stream, 1, 2)), strict=True):
        assert np.array_equal(x, y)


def _old_layout(ts):
    """`ts` with the attention state one entry per unit (formats 2 to 4)."""
    return _checkpoint.per_unit_state(ts)


def _unit_tallies(ts):
    """`ts` with every codebook tally 1, as a checkpoint from before it loads."""
    quantizers = [u.quantizer for u in ts.model.layers.stacked.units]
    ones = [np.ones_like(q.ema_tally) for q in quantizers]
    return eqx.tree_at(
        lambda t: [u.quantizer.ema_tally for u in t.model.layers.stacked.units],
        ts,
        ones,
    )


def test_checkpoint_from_before_the_codebook_tally_loads(tmp_path):
    # Format 3: the stacked layout without `VectorQuantizer.ema_tally`. It
    # loads with tallies 1 and trains on exactly as the original.
    opt, build = _setup(CFG.replace(n_layer=2))
    step = train.make_train_step(opt, update_len=16)
    stream = _stream()
    ts = _run(build(), step, stream, 0, 1)
    assert all(
        np.all(np.asarray(u.quantizer.ema_tally) == 3.0)  # 1 + two EMA steps
        for u in ts.model.layers.stacked.units
    )
    # A format-4 file (with the tally) marked as format 3 does not match.
    path = train.save_checkpoint(tmp_path / "new", _old_layout(ts), step=2)
    _as_format(path, 3)
    with pytest.raises(train.CheckpointError, match="does not match.*format 3"):
        train.load_checkpoint(path, eqx.filter_eval_shape(build))
    path = train.save_checkpoint(
        tmp_path, _old_layout(_checkpoint.without_tally(ts)), step=1
    )
    _as_format(path, 3)
    loaded, _ = train.load_checkpoint(tmp_path, eqx.filter_eval_shape(build))
    want = _unit_tallies(ts)
    for x, y in zip(_host_leaves(want), _host_leaves(loaded), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    cont = _host_leaves(_run(want, step, stream, 1, 2))
    for x, y in zip(cont, _host_leaves(_run(loaded, step, stream, 1, 2)), strict=True):
        assert np.array_equal(x, y)


def test_old_checkpoint_of_another_model_or_unknown_format_is_a_clear_error(tmp_path):
    _, build = _setup(CFG.replace(n_layer=2))
    old = _old_layout(_checkpoint.without_tally(_checkpoint.unstack_layers(build())))
    path = train.save_checkpoint(tmp_path, old, step=1)
    _as_format(path, 2)
    _, other = _setup(CFG.replace(n_layer=2, d_model=48))
    with pytest.raises(
        train.CheckpointError, match="does not match.*format 2 .layers unrolled"
    ):
        train.load_checkpoint(tmp_path, eqx.filter_eval_shape(other))
    # A stacked file marked as format 2 has the wrong leaf shapes.
    path = train.save_checkpoint(tmp_path, build(), step=2)
    _as_format(path, 2)
    with pytest.raises(train.CheckpointError, match="format 2 .layers unrolled"):
        train.load_checkpoint(tmp_path, eqx.filter_eval_shape(build))
    _as_format(path, 99)
    with pytest.raises(
        train.CheckpointError, match="format 99.*reads formats 2 .*, 3 .*, 4 .* and 5"
    ):
        train.load_checkpoint(tmp_path, eqx.filter_eval_shape(build))


def test_adafactor_state_without_per_layer_statistics_is_a_clear_error(
    tmp_path, monkeypatch
):
    # Before Adafactor kept one state per layer (`per_layer`), its state was
    # one optax state over all leaves (format 2: the layers' leaves unrolled;
    # format 3: stacked). Neither can become the per-layer state: clear error.
    from tvq_eqx.train import _optimizer

    cfg = CFG.replace(n_layer=2)

    def build(opt):
        model = tvq_eqx.Transformer(cfg, key=jax.random.key(0))
        return train.init_train_state(model, opt, 2, key=jax.random.key(1))

    new = train.make_optimizer("adafactor", warmup_steps=2, total_steps=4)
    monkeypatch.setattr(_optimizer, "per_layer", lambda inner: inner)
    old = build(train.make_optimizer("adafactor", warmup_steps=2, total_steps=4))
    old = _old_layout(old)
    for version, tree in ((2, _checkpoint.unstack_layers(old)), (3, old)):
        path = train.save_checkpoint(tmp_path, tree, step=version)
        _as_format(path, version)
        with pytest.raises(train.CheckpointError, match="does not match.*Adafactor"):
            train.load_checkpoint(path, eqx.filter_eval_shape(build, new))


def test_checkpoint_with_the_state_per_unit_loads_stacked(tmp_path):
    # Format 4: the attention state one entry per unit (call order: layer 0's
    # two units, then layer 1's, ...). It loads into the stacked layout
    # (`TransformerState.stacked`) and trains on exactly as the original.
    opt, build = _setup(CFG.replace(n_layer=3))
    step = train.make_train_step(opt, update_len=16)
    stream = _stream()
    ts = _run(build(), step, stream, 0, 1)
    old = _old_layout(ts)
    assert len(old.attn_state.units) == 6
    path = train.save_checkpoint(tmp_path, old, step=1)
    _as_format(path, 4)
    loaded, _ = train.load_checkpoint(tmp_path, eqx.filter_eval_shape(build))
    assert isinstance(loaded.attn_state, tvq_eqx.TransformerState)
    assert loaded.attn_state.stacked[1].cache_mean.shape[:2] == (3, 2)
    for x, y in zip(_host_leaves(ts), _host_leaves(loaded), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    # A new (format 5) file marked as format 4 has the wrong leaf shapes.
    path = train.save_checkpoint(tmp_path / "new", ts, step=1)
    _as_format(path, 4)
    with pytest.raises(train.CheckpointError, match="does not match.*format 4"):
        train.load_checkpoint(path, eqx.filter_eval_shape(build))
    cont = _host_leaves(_run(ts, step, stream, 1, 2))
    for x, y in zip(cont, _host_leaves(_run(loaded, step, stream, 1, 2)), strict=True):
        assert np.array_equal(x, y)


def test_checkpoint_written_by_format_4_code_loads(tmp_path):
    # Written by tvq-eqx b343857 (tests/fixtures/make_format4_checkpoint.py,
    # which holds the config rebuilt here); its per-unit attention state was
    # also saved as plain arrays by that code.
    import shutil
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "format4_checkpoint"
    shutil.copytree(fixture, tmp_path / "ckpt")
    cfg = tvq_eqx.TransformerConfig(
        n_vocab=16, d_model=8, d_k=4, d_v=4, n_head=1, n_code=4, n_layer=2, block_len=4
    )
    opt = train.make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=4)

    def build():
        model = tvq_eqx.Transformer(cfg, key=jax.random.key(0))
        return train.init_train_state(model, opt, 2, key=jax.random.key(1))

    loaded, meta = train.load_checkpoint(
        tmp_path / "ckpt", eqx.filter_eval_shape(build)
    )
    assert meta["format_version"] == 4 and meta["step"] == 1
    state = loaded.attn_state
    want = np.load(fixture / "attn_state_units.npz")
    assert state.n_layer == 2 and int(state.position) == int(want["position"]) == 8
    for i, unit in enumerate(state.units()):
        for k, x in enumerate(jax.tree.leaves(unit)):
            y = want[f"unit{i}_{k}"]
            assert np.asarray(x).dtype == y.dtype and np.array_equal(x, y)
    # The cache is not empty: the check compares real values.
    assert float(np.abs(want["unit3_5"]).max()) > 0
    # ... and the state goes on: one more step from it runs and stays finite.
    toks = np.arange(2 * 9, dtype=np.int32).reshape(2, 9) % 16
    batch = dict(
        inputs=toks[:, :8], targets=toks[:, 1:], loss_mask=np.ones((2, 8), np.float32)
    )
    nxt, metrics = train.make_train_step(opt, update_len=8)(loaded, batch)
    assert np.isfinite(float(metrics["loss"])) and int(nxt.attn_state.position) == 16
