"""Packed documents from the data streams through training: the streams'
`doc_starts` agree with `doc_ids` (window borders, the shuffle's rotation
wrap, padding) and are resumable; `RunConfig.doc_masking` / `--doc-masking`
passes them through the train and eval steps to `loss_fn` (off: nothing
changes); clear errors."""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _inputs import user_call

import tvq_eqx
from tvq_eqx import cli, data, train
from tvq_eqx.train._optimizer import CODEBOOK

SEP = 255  # a document's first token (pack_documents' separator)

CFG = tvq_eqx.TransformerConfig(
    n_vocab=256, d_model=32, d_k=8, d_v=16, n_head=2, n_code=8, n_layer=1, block_len=8
)
B, T, U = 2, 32, 16  # rows, window, update segment (two per window)
PLAIN = ("inputs", "targets", "loss_mask")  # a batch without documents


def _packed(rng, n_docs, max_len=9):
    docs = [rng.integers(0, 200, rng.integers(0, max_len)) for _ in range(n_docs)]
    return data.pack_documents(docs, separator=SEP)


def _token_stream(**kw):
    tokens, starts = _packed(np.random.default_rng(0), 60)
    # 3 rows of a length that leaves padding at the end of the last row.
    tokens = tokens[: 3 * (len(tokens) // 3) - 2]
    starts = starts[starts < len(tokens)]
    return data.TokenStream(tokens, batch_size=3, seq_len=8, doc_starts=starts, **kw)


def _image_stream(seq_len, **kw):
    images = np.arange(5 * 12, dtype=np.uint8).reshape(5, 2, 2, 3)
    # 5 images in 2 rows: the second row ends in a padding slot.
    return data.ImageStream(images, batch_size=2, seq_len=seq_len, **kw)


STREAMS = {
    "tokens": _token_stream,
    "tokens-in-order": lambda **kw: _token_stream(**{**kw, "shuffle": False}),
    "images-half": lambda **kw: _image_stream(6, **kw),
    "images-one": lambda **kw: _image_stream(12, **kw),
    "images-two": lambda **kw: _image_stream(24, **kw),
}


def _epoch(stream, epoch, key):
    """`key` of every window of `epoch`, joined along the rows."""
    n = stream.num_batches
    return np.concatenate([stream.batch(epoch * n + w)[key] for w in range(n)], axis=1)


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_doc_starts_mark_where_doc_ids_change(name):
    stream = STREAMS[name](seed=3)
    wrapped = False
    for epoch in range(3):
        ids = _epoch(stream, epoch, "doc_ids")
        starts = _epoch(stream, epoch, "doc_starts")
        assert starts.dtype == np.bool_ and starts.shape == ids.shape
        # Across window borders as inside them: a change of document (padding,
        # -1, one more); the row's first position starts a fresh stream.
        want = np.ones_like(starts)
        want[:, 1:] = ids[:, 1:] != ids[:, :-1]
        np.testing.assert_array_equal(starts, want)
        if isinstance(stream, data.TokenStream):
            # Every separator starts a document; the other starts are only
            # a row's first token, the rotation's join, or padding.
            inputs = _epoch(stream, epoch, "inputs")
            assert starts[inputs == SEP].all()
            other = starts & (inputs != SEP)
            other[:, 0] = False
            assert other.sum(axis=1).max() <= 2
            num_docs = stream.doc_starts.size
            wrapped |= bool(np.any(ids >= num_docs))
        else:
            d = stream.images.shape[1]
            pos = np.arange(ids.shape[1])
            np.testing.assert_array_equal(
                starts[ids >= 0], np.broadcast_to(pos % d == 0, ids.shape)[ids >= 0]
            )
        assert np.any((ids == -1) & starts)  # padding starts a document
    if isinstance(stream, data.TokenStream):
        assert wrapped == stream.shuffle  # the rotation wrap was seen


@pytest.mark.parametrize("name", ["tokens", "images-half"])
def test_doc_starts_are_resumable(name):
    stream = STREAMS[name](seed=5)
    n = stream.num_batches
    steps = [0, 1, n - 1, n, n + 1, 2 * n + 3]
    from_zero = list(itertools.islice(stream.iterate(0), max(steps) + 1))
    for k in steps:
        fresh = STREAMS[name](seed=5)
        resumed = next(fresh.iterate(k))
        for key, value in from_zero[k].items():
            np.testing.assert_array_equal(resumed[key], value, err_msg=f"{k} {key}")
        if k % n == 0:  # a new epoch starts fresh streams
            assert resumed["doc_starts"][:, 0].all()


# ----------------------------------------------------------------------------
# Training


def _stream(tokens, starts, **kw):
    return data.TokenStream(
        tokens, batch_size=B, seq_len=T, doc_starts=starts, shuffle=False, **kw
    )


@pytest.fixture(scope="module")
def packed():
    """Two rows of packed documents, several per row: row 0 (tokens 0..32)
    holds documents at 0, 10 (across the update segments' border at 16), 22,
    28 and 29 (a separator alone)."""
    rng = np.random.default_rng(1)
    lengths = [9, 11, 5, 0, 7, 13, 3, 8, 6, 10]
    docs = [rng.integers(0, 200, n) for n in lengths]
    tokens, starts = data.pack_documents(docs, separator=SEP)
    tokens = tokens[: B * (T + 1)]
    return tokens, starts[starts < len(tokens)]


@pytest.fixture(scope="module")
def model():
    return tvq_eqx.Transformer(CFG, key=jax.random.key(0))


OPT = train.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=4)
RUN = train.RunConfig(
    model=CFG,
    data=train.DataConfig(batch_size=B, seq_len=T),
    update_len=U,
    steps=2,
    eval_every=0,
    log_every=2,
    sample_len=0,
    doc_masking=True,
)


def _fresh(model):
    return train.init_train_state(model, OPT, B, key=jax.random.key(1))


def _params(ts):
    return jax.tree.leaves(eqx.filter(ts.model, eqx.is_inexact_array))


def test_masked_train_step_equals_loss_fn_with_the_batch_doc_starts(model, packed):
    stream = _stream(*packed)
    batch = stream.batch(0)
    assert batch["doc_starts"][:, 1:].sum() >= 4  # documents inside the rows
    # fit with run.doc_masking and the donating step give the same state.
    fitted = train.fit(_fresh(model), RUN, stream, optimizer=OPT, handle_sigint=False)
    step = train.make_train_step(OPT, update_len=U, doc_masking=True)
    new, metrics = step(_fresh(model), batch, reset=True)
    for a, b in zip(_params(fitted.train_state), _params(new), strict=True):
        np.testing.assert_array_equal(a, b)

    # By hand: loss_fn on each update segment with its slice of doc_starts.
    ts = _fresh(model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    rng, seq_key = jax.random.split(jax.random.wrap_key_data(ts.rng))

    @jax.jit
    def update(params, opt_state, attn, seg, sub):
        def f(p):
            return tvq_eqx.loss_fn(
                eqx.combine(p, static), seg, attn, key=sub, sequence_key=seq_key
            )

        (_, aux), g = jax.value_and_grad(f, has_aux=True)(params)
        u, opt_state = OPT.update(g, opt_state, params)
        labels = train.param_labels(g)
        main = jax.tree.map(lambda x, lab: None if lab == CODEBOOK else x, g, labels)
        return optax.apply_updates(params, u), opt_state, aux, optax.tree.norm(main)

    opt_state, attn, lm_sum, norms = ts.opt_state, ts.attn_state, 0.0, []
    for i in range(T // U):
        rng, sub = jax.random.split(rng)
        seg = {
            k: jnp.asarray(batch[k][:, U * i : U * (i + 1)])
            for k in ("inputs", "targets", "loss_mask", "doc_starts")
        }
        params, opt_state, aux, norm = update(params, opt_state, attn, seg, sub)
        attn, lm_sum = aux["state"], lm_sum + float(aux["metrics"]["lm_loss_sum"])
        norms.append(float(norm))
    assert float(metrics["lm_loss_sum"]) == pytest.approx(lm_sum, rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(np.mean(norms), rel=1e-5)
    for a, b in zip(_params(new), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_unmasked_steps_are_unchanged(model, packed, monkeypatch):
    """Masking off, the batch reaching loss_fn has no doc_starts and the
    train and eval steps trace to the very program of a batch without them
    (today's); on, doc_starts reach loss_fn. Traced only, nothing compiled."""
    from tvq_eqx.train import _steps

    batch = _stream(*packed).batch(0)
    plain = {k: batch[k] for k in PLAIN}
    seen = []

    def spy(model, b, *args, **kwargs):
        seen.append(tuple(sorted(b)))
        return real(model, b, *args, **kwargs)

    real = _steps.loss_fn
    monkeypatch.setattr(_steps, "loss_fn", spy)
    ts = _fresh(model)

    def program(step, extra, on):
        """The traced step of `plain` plus the (closed-over) `extra` entries."""

        def f(b):
            b = {**b, **extra}
            if step == "train":
                return train.train_step(
                    ts, b, optimizer=OPT, update_len=U, reset=True, doc_masking=on
                )
            return train.eval_step(
                model, ts.attn_state, b, segment_len=U, reset=True, doc_masking=on
            )

        seen.clear()
        jaxpr = str(jax.make_jaxpr(f)(plain))
        return jaxpr, set(seen)

    docs = {k: batch[k] for k in ("doc_ids", "doc_starts")}
    for step in ("train", "eval"):
        off, keys = program(step, docs, False)
        assert keys == {tuple(sorted(PLAIN))}
        assert (off, keys) == program(step, {}, False)
        on, keys = program(step, docs, True)
        assert keys == {tuple(sorted((*PLAIN, "doc_starts")))} and on != off
    # The jitted steps get only what they use.
    assert sorted(_steps._place(batch, None, False)) == sorted(PLAIN)
    assert sorted(_steps._place(batch, None, True)) == sorted((*PLAIN, "doc_starts"))


def test_a_document_ignores_the_one_before_it_only_when_masked(model, packed):
    """Row 0's loss counted on its second document only: perturbing the
    first document's tokens leaves it unchanged with masking, not without."""
    tokens, starts = packed
    first, second = int(starts[1]), int(starts[2])
    assert (first, second) == (10, 22)  # document 2 spans both segments
    perturbed = tokens.copy()
    perturbed[1:first] = (perturbed[1:first] + 7) % 200
    sums = {}
    for name, toks in (("base", tokens), ("perturbed", perturbed)):
        batch = _stream(toks, starts, repeat=False).batch(0)
        mask = np.zeros((B, T), np.float32)
        mask[0, first : second - 1] = 1  # inputs and targets in document 2
        batch["loss_mask"] = mask
        for on in (True, False):
            step = train.make_eval_step(segment_len=U, doc_masking=on)
            _, s = step(model, model.init_state(B), batch, reset=True)
            sums[name, on] = float(s["lm_loss_sum"])
    assert sums["perturbed", True] == pytest.approx(sums["base", True], rel=1e-5)
    assert sums["perturbed", False] != pytest.approx(sums["base", False], rel=1e-4)

    # evaluate_stream follows run.doc_masking (the same eval step).
    stream = _stream(tokens, starts, repeat=False)
    got = train.evaluate_stream(model, stream, RUN, max_batches=1)
    _, want = train.make_eval_step(segment_len=U, doc_masking=True)(
        model, model.init_state(B), stream.batch(0), reset=True
    )
    assert got["lm_loss_sum"] == pytest.approx(float(want["lm_loss_sum"]), rel=1e-6)


def test_doc_starts_are_sharded_like_inputs(packed):
    batch = _stream(*packed).batch(0)
    mesh = train.make_mesh(jax.devices()[:2])
    placed = train.shard_batch(batch, mesh, doc_masking=True)
    assert placed["doc_starts"].sharding == placed["inputs"].sharding
    assert placed["doc_starts"].dtype == jnp.bool_
    np.testing.assert_array_equal(placed["doc_starts"], batch["doc_starts"])
    assert "doc_starts" not in train.shard_batch(batch, mesh)


# ----------------------------------------------------------------------------
# Settings and errors


def test_flag_is_parsed_and_saved_with_the_run(tmp_path, capsys):
    base = train.PRESETS["tiny"]
    assert base.doc_masking is False  # official: packed, never masked

    def parse(*argv):
        args = cli._parse_run_command(
            cli.TrainCommand, list(argv), prog="t", base=base, preset="tiny"
        )
        return args.run

    on = parse("--doc-masking")
    assert on.doc_masking is True and parse().doc_masking is False
    assert parse("--doc-masking", "--no-doc-masking").doc_masking is False
    assert train.RunConfig.from_dict(on.to_dict()) == on
    assert train.RunConfig.from_dict({"doc_masking": True}).doc_masking is True
    # A resume keeps the saved setting: a different one is refused.
    with pytest.raises(train.runs.RunDirError, match="doc_masking"):
        train.runs.check_resume(on, parse(), dict(path="ckpt", step=0))
    train.runs.check_resume(on, parse("--doc-masking"), dict(path="ckpt", step=0))
    assert cli.main(["train", "--help"]) == 0
    assert "--doc-masking" in capsys.readouterr().out


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model=dict(attention="full")), "attention='full'"),
        (dict(doc_masking=1), "must be a bool"),
    ],
)
def test_a_run_that_cannot_mask_is_refused_when_built(changes, message):
    with user_call(), pytest.raises(ValueError, match=message):
        RUN.replace(**changes)
    # Without masking the same model is fine.
    RUN.replace(**{**changes, "doc_masking": False})


def test_cli_refuses_full_attention_with_doc_masking(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "--run-dir", str(run_dir), "--doc-masking",
            "--model.attention", "full", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot mask documents" in err[0], err
    assert not run_dir.exists()


def test_missing_or_misshapen_doc_starts_and_full_attention_are_named(model, packed):
    batch = _stream(*packed).batch(0)
    plain = {k: batch[k] for k in PLAIN}
    ts = _fresh(model)
    with pytest.raises(ValueError, match="train batch is missing 'doc_starts'"):
        train.train_step(ts, plain, optimizer=OPT, update_len=U, doc_masking=True)
    with pytest.raises(ValueError, match="eval batch is missing 'doc_starts'"):
        train.eval_step(model, model.init_state(B), plain, segment_len=U,
                        doc_masking=True)  # fmt: skip
    with pytest.raises(ValueError, match="train batch is missing 'doc_starts'"):
        train.make_train_step(OPT, update_len=U, doc_masking=True)(ts, plain)
    bad = dict(batch, doc_starts=batch["doc_starts"][:, :8])
    with pytest.raises(ValueError, match=r"doc_starts'\] must have the shape"):
        train.train_step(ts, bad, optimizer=OPT, update_len=U, doc_masking=True)
    # A model that cannot mask: refused before anything is traced.
    full = tvq_eqx.Transformer(CFG.replace(attention="full"), key=jax.random.key(0))
    with pytest.raises(ValueError, match="cannot mask documents"):
        train.make_eval_step(segment_len=U, doc_masking=True)(
            full, model.init_state(B), batch
        )
