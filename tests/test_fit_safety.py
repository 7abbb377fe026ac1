"""Nothing lost when training goes wrong: a non-finite loss stops the run
before anything non-finite is saved (or the update is skipped), SIGTERM and
SIGHUP checkpoint like Ctrl-C, and a time-based checkpoint schedule bounds
what a preemption loses."""

from __future__ import annotations

import os
import signal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _runs import TINY_RUN

import tvq_eqx
from tvq_eqx import train
from tvq_eqx.train._checkpoint import checkpoint_step

RUN = TINY_RUN.replace(steps=16, keep=2)


def _stream(run):
    toks = (np.arange(4000) * 7 % 251).astype(np.int32)
    return train.make_stream(run, toks[:3000], train=True)


def _finite(tree) -> bool:
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def test_nonfinite_loss_stops_and_keeps_the_last_finite_checkpoint(tmp_path):
    """A learning rate of 1e6 makes the loss NaN within a few updates: the run
    ends 'diverged' naming them, every checkpoint kept is finite, and the
    rotation (keep=2) never pushed the finite ones out for NaN ones."""
    run = RUN.replace(optimizer=dict(learning_rate=1e6))
    res = train.fit(train.new_train_state(run), run, _stream(run),
                    checkpoint_dir=tmp_path, handle_sigint=False)  # fmt: skip
    assert res.status == "diverged", res.status
    assert "non-finite loss or gradient norm in update" in res.message
    assert res.step < run.steps
    kept = train.list_checkpoints(tmp_path)
    assert kept and all(checkpoint_step(p) < res.step for p in kept)
    like = eqx.filter_eval_shape(train.new_train_state, run)
    for path in kept:
        ts, meta = train.load_checkpoint(path, like)
        assert _finite(ts), path
        assert not meta.get("completed", False)


def test_a_nonfinite_parameter_is_never_saved(tmp_path, monkeypatch):
    """Fault injection: an update that leaves a non-finite parameter behind
    while its loss and gradient norm were finite (they are computed before
    the update) is caught before the checkpoint."""
    from tvq_eqx.train import _fit

    real = _fit.make_train_step

    def poisoning(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def step(ts, batch, *, reset=False):
            ts, metrics = step_fn(ts, batch, reset=reset)
            bias = ts.model.head.bias
            ts = eqx.tree_at(lambda t: t.model.head.bias, ts, bias.at[0].set(jnp.nan))
            return ts, metrics

        return step

    monkeypatch.setattr(_fit, "make_train_step", poisoning)
    res = train.fit(train.new_train_state(RUN), RUN, _stream(RUN),
                    checkpoint_dir=tmp_path, handle_sigint=False)  # fmt: skip
    assert res.status == "diverged" and res.step == RUN.save_every
    assert "non-finite parameter after update 2" in res.message
    assert train.list_checkpoints(tmp_path) == []


def test_skip_mode_leaves_the_update_out_and_counts_it():
    """`skip_nonfinite`: an update with a NaN loss changes nothing (bitwise)
    and counts one skipped update; a clean batch then trains."""
    run = RUN
    ts = train.new_train_state(run)
    step = train.make_train_step(
        train.optimizer_from_config(run.optimizer, run.steps),
        update_len=16,
        donate=False,
        skip_nonfinite=True,
    )
    batch = dict(_stream(run).batch(0))
    # Finite weights whose sum overflows float32: the loss is not finite.
    bad = dict(batch, loss_mask=np.full_like(batch["loss_mask"], 3e38))
    after, metrics = step(ts, bad, reset=True)
    assert float(metrics["skipped_updates"]) == 1.0
    same = jax.tree.leaves(eqx.filter(after.model, eqx.is_array))
    before = jax.tree.leaves(eqx.filter(ts.model, eqx.is_array))
    assert all(np.array_equal(a, b) for a, b in zip(same, before, strict=True))
    assert int(after.step) == int(ts.step) + 1  # the update was consumed
    trained, metrics = step(after, batch, reset=False)
    assert float(metrics["skipped_updates"]) == 0.0
    moved = jax.tree.leaves(eqx.filter(trained.model, eqx.is_array))
    assert not all(np.array_equal(a, b) for a, b in zip(moved, before, strict=True))


def test_skip_mode_gives_up_after_max_skipped(tmp_path):
    run = RUN.replace(
        optimizer=dict(learning_rate=1e6), on_nonfinite="skip", max_skipped=3
    )
    res = train.fit(train.new_train_state(run), run, _stream(run),
                    checkpoint_dir=tmp_path, handle_sigint=False)  # fmt: skip
    assert res.status == "diverged" and res.skipped_updates > 3
    assert "max_skipped=3" in res.message
    assert _finite(res.train_state.model)  # skipped updates were never applied


class _Signal(train.Callback):
    def __init__(self, at, signum):
        self.at, self.signum = at, signum

    def on_step(self, step, metrics, train_state):
        if step == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_checkpoint_like_ctrl_c(name, tmp_path):
    signum = getattr(signal, name)
    # The default handler first (a background shell may have set SIG_IGN).
    inherited = signal.signal(signum, signal.SIG_DFL)
    try:
        res = train.fit(train.new_train_state(RUN), RUN, _stream(RUN),
                        checkpoint_dir=tmp_path, callbacks=[_Signal(4, signum)])  # fmt: skip
        assert signal.getsignal(signum) == signal.SIG_DFL  # restored
    finally:
        signal.signal(signum, inherited)
    assert (res.status, res.step, res.signal) == ("interrupted", 4, signum)
    meta = train.read_meta(tmp_path)
    assert meta["step"] == 4 and meta["interrupted"] is True


def test_save_every_minutes(tmp_path):
    """With no update-based schedule, a time-based one still checkpoints."""
    run = RUN.replace(steps=8, save_every=0, keep=10, save_every_minutes=1e-9)
    res = train.fit(train.new_train_state(run), run, _stream(run),
                    checkpoint_dir=tmp_path, handle_sigint=False)  # fmt: skip
    assert res.status == "completed"
    steps = [checkpoint_step(p) for p in train.list_checkpoints(tmp_path)]
    assert steps == [2, 4, 6, 8]
    with pytest.raises(ValueError, match="save_every_minutes"):
        RUN.replace(save_every_minutes=-1.0)
    # (ValueError from the config; under the tests' type-check hook, its
    # TypeError first.)
    with pytest.raises((ValueError, TypeError), match="on_nonfinite"):
        RUN.replace(on_nonfinite="ignore")  # type: ignore[arg-type]


def test_resume_may_change_the_safety_nets_only():
    saved = RUN
    meta = dict(step=2, path="x")
    train.runs.check_resume(saved, RUN.replace(on_nonfinite="skip", max_skipped=5,
                                          save_every_minutes=3.0), meta)  # fmt: skip
    with pytest.raises(train.runs.RunDirError, match="safety nets"):
        train.runs.check_resume(saved, RUN.replace(log_every=4), meta)


# The command line: a diverged run exits 1 with one line naming the last
# finite checkpoint; SIGTERM exits 143 after checkpointing.
CLI_FLAGS = [
    "--model.d-model", "16", "--model.d-k", "8", "--model.d-v", "16",
    "--model.n-code", "4", "--model.n-layer", "1", "--model.block-len", "16",
    "--data.seq-len", "32", "--update-len", "16", "--data.batch-size", "4",
    "--steps", "16", "--optimizer.warmup-steps", "1", "--eval-every", "0",
    "--eval-batches", "1", "--log-every", "2", "--save-every", "2",
    "--sample-len", "0", "--no-progress",
]  # fmt: skip


def test_cli_diverged_run_exits_1_naming_the_last_finite_checkpoint(tmp_path, capsys):
    from tvq_eqx.cli import main

    run_dir = tmp_path / "run"
    argv = ["train", "--run-dir", str(run_dir), *CLI_FLAGS]
    assert main([*argv, "--optimizer.learning-rate", "1e6"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training diverged: non-finite loss" in err[0], err
    kept = train.list_checkpoints(run_dir / "checkpoints")
    assert kept and str(kept[-1]) in err[0]
    # Resuming it with the skip safety net is allowed (only the nets changed).
    code = main([*argv, "--optimizer.learning-rate", "1e6", "--resume",
                 "--on-nonfinite", "skip", "--max-skipped", "1"])  # fmt: skip
    assert code == 1 and "max_skipped=1" in capsys.readouterr().err


def test_cli_sigterm_checkpoints_and_exits_143(tmp_path, monkeypatch, capsys):
    from tvq_eqx.cli import main
    from tvq_eqx.train import callbacks as _callbacks

    real = _callbacks.ProgressBar.on_step

    def on_step(self, step, metrics, train_state):
        real(self, step, metrics, train_state)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(_callbacks.ProgressBar, "on_step", on_step)
    inherited = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        run_dir = tmp_path / "run"
        assert main(["train", "--run-dir", str(run_dir), *CLI_FLAGS]) == 143
    finally:
        signal.signal(signal.SIGTERM, inherited)
    assert "interrupted at update 4 (SIGTERM)" in capsys.readouterr().err
    latest = (run_dir / "checkpoints" / "LATEST").read_text().strip()
    assert latest == "step_00000004"


def _short(flags):
    i = flags.index("--steps")
    return [*flags[:i], "--steps", "2", *flags[i + 2 :]]


def test_run_folder_lock_refuses_a_second_trainer_and_takes_over_a_dead_ones(
    tmp_path, capsys
):
    import subprocess
    import sys

    from tvq_eqx.cli import main

    run_dir = tmp_path / "run"
    argv = ["train", "--run-dir", str(run_dir), *_short(CLI_FLAGS)]
    with train.runs.RunLock(run_dir):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1
            and f"in use by another training process (pid {os.getpid()})" in err[0]
        )
        assert not (run_dir / "checkpoints").exists()  # nothing written
    # A trainer killed with SIGKILL leaves its pid in the lock file but no
    # lock (the kernel dropped it): the next run takes the folder over.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from tvq_eqx.train.runs import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)",
         str(run_dir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    holder.stdout.close()
    assert (run_dir / ".lock").read_text().strip() == str(holder.pid)
    assert main(argv) == 0
    assert train.list_checkpoints(run_dir / "checkpoints")


def _guide_code() -> str:
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    section = text.split("## VQAttention in your own model", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_user_module_guide_runs_as_written():
    """The guide's user module trains its codebook: three EMA steps, the
    codebook moved, the loss finite."""
    scope: dict = {}
    exec(_guide_code(), scope)
    q = scope["model"].attn.quantizer
    assert float(q.ema_tally) == 4.0
    assert np.isfinite(float(scope["loss"]))
    fresh = scope["Tagger"](jax.random.key(0)).attn.quantizer
    assert not np.allclose(q.codebook_sum, fresh.codebook_sum)


def test_user_module_with_plain_adamw_on_the_codebook_is_loud():
    """The issue's case: a VQAttention in a user's module trained with a
    plain optax.adamw: the tally moves off a whole number and the unit's
    next call raises (it used to train on, its codebook never learning)."""
    import optax

    attn = tvq_eqx.nn.VQAttention(
        d_model=16, d_k=8, d_v=8, n_code=4, block_len=8, key=jax.random.key(0)
    )
    x = jax.random.normal(jax.random.key(1), (2, 8, 16))
    opt = optax.adamw(1e-2, weight_decay=0.1)
    params = eqx.filter(attn, eqx.is_inexact_array)
    state = opt.init(params)

    def loss(a):
        y, _, stats = a(x)
        return jnp.mean(y**2) + a.auxiliary_loss(stats, n_positions=16)

    grads = eqx.filter_grad(loss)(attn)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes dtypes inside
        updates, state = opt.update(grads, state, params)
    attn = eqx.apply_updates(attn, updates)
    with pytest.raises(Exception, match="ema_tally is not a whole number"):
        attn(x)


def test_vqattention_settings_and_defaults():
    cfg = tvq_eqx.TransformerConfig(d_model=16, d_k=8, d_v=8, n_code=4, block_len=8)
    from_config = tvq_eqx.nn.VQAttention(cfg, key=jax.random.key(0))
    from_sizes = tvq_eqx.nn.VQAttention(
        d_model=16, d_k=8, d_v=8, n_code=4, block_len=8, key=jax.random.key(0)
    )
    assert from_sizes.config == from_config.config
    x = jax.random.normal(jax.random.key(1), (2, 16, 16))
    out, state, _ = from_sizes(x)  # no state, no mask: an empty history, all real
    want, want_state, _ = from_config(
        x, from_config.init_state(2), mask=jnp.ones((2, 16), jnp.float32)
    )
    np.testing.assert_array_equal(out, want)
    with pytest.raises(TypeError, match="not both"):
        tvq_eqx.nn.VQAttention(cfg, d_model=16, key=jax.random.key(0))


def test_old_style_keys_and_int64_tokens():
    import warnings

    cfg = tvq_eqx.TransformerConfig(
        d_model=16, d_k=8, d_v=8, n_code=4, n_layer=2, block_len=8
    )
    old = tvq_eqx.Transformer(cfg, key=jax.random.PRNGKey(0))
    new = tvq_eqx.Transformer(cfg, key=jax.random.key(0))
    for a, b in zip(
        jax.tree.leaves(eqx.filter(old, eqx.is_array)),
        jax.tree.leaves(eqx.filter(new, eqx.is_array)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    tokens = np.zeros((2, 16), dtype=np.int64)  # numpy's default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp, _, _ = new(tokens, new.init_state(2))
    assert lp.shape == (2, 16, 256)
    with pytest.raises(ValueError, match="must be in"):
        new(np.full((2, 16), 2**40, dtype=np.int64), new.init_state(2))


def test_multisteps_the_other_way_round_takes_one_ema_step_per_update():
    # with_ema_codebook(optax.MultiSteps(...)) is tests/test_grad_accum.py's;
    # the other order still takes one EMA step per real update (towards the
    # micro-batches' mean statistics, as its docstring says).
    import optax

    attn = tvq_eqx.nn.VQAttention(
        d_model=16, d_k=8, d_v=8, n_code=4, block_len=8, key=jax.random.key(0)
    )
    opt = optax.MultiSteps(train.with_ema_codebook(optax.adamw(1e-2)), 2)
    params = eqx.filter(attn, eqx.is_inexact_array)
    state = opt.init(params)
    x = jax.random.normal(jax.random.key(1), (2, 8, 16))

    def loss(a):
        y, _, stats = a(x)
        return jnp.mean(y**2) + a.auxiliary_loss(stats, n_positions=16)

    for _ in range(4):  # two real updates
        grads = eqx.filter_grad(loss)(attn)
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(
                grads, state, eqx.filter(attn, eqx.is_inexact_array)
            )
        attn = eqx.apply_updates(attn, updates)
    assert float(attn.quantizer.ema_tally) == 3.0  # 1 + one EMA step per update
    attn(x)  # the tally is whole: no error
