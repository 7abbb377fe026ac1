"""Which checkpoint a run folder trusts: a newest one whose meta.json is valid
JSON of the wrong shape or types, an unreadable LATEST, a checkpoint of
another run or configuration -- each is skipped with a warning naming it,
and loading falls back to the newest one that belongs (never an
AttributeError, never another model evaluated silently)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _runs import TINY_RUN

from tvq_eqx import train
from tvq_eqx.train import CheckpointError, CheckpointWarning

RUN = TINY_RUN


def _train(run_dir, run, run_id):
    toks = (np.arange(4000) * 7 % 251).astype(np.int32)
    stream = train.make_stream(run, toks[:3000], train=True)
    train.runs.start_run_dir(run_dir, run, run_id=run_id)
    res = train.fit(
        train.new_train_state(run), run, stream,
        checkpoint_dir=train.runs.checkpoints_of(run_dir),
        checkpoint_meta=dict(run_id=run_id), handle_sigint=False,
    )  # fmt: skip
    assert res.status == "completed"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust") / "run"
    _train(d, RUN, "aaaaaaaaaaaa")
    return d


def _copy(run_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def _rewrite_meta(path, fn):
    meta_path = path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(fn(meta)))


BAD_METAS = {
    "a list": lambda m: [],
    "null": lambda m: None,
    "a number": lambda m: 5,
    "run null": lambda m: dict(m, run=None),
    "step a string": lambda m: dict(m, step="abc"),
    "step huge": lambda m: dict(m, step=10**20),
    "step negative": lambda m: dict(m, step=-5),
    "completed a string": lambda m: dict(m, completed="false"),
    "signature not a list": lambda m: dict(m, signature="x"),
}


@pytest.mark.parametrize("what", list(BAD_METAS))
def test_wrong_shaped_newest_meta_falls_back(run_dir, tmp_path, what):
    d = _copy(run_dir, tmp_path)
    _rewrite_meta(d / "checkpoints" / "step_00000004", BAD_METAS[what])
    with pytest.warns(CheckpointWarning, match="skipped checkpoint step_00000004"):
        _, ts, meta = train.load_run(d)
    assert meta["step"] == 2 and int(ts.step) == 2


def test_unreadable_latest_falls_back(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    (d / "checkpoints" / "LATEST").write_bytes(b"\xff\xfe\x00step")
    with pytest.warns(CheckpointWarning, match="LATEST is unreadable"):
        _, _, meta = train.load_run(d)
    assert meta["step"] == 4


def test_checkpoint_of_another_configuration_is_refused(run_dir, tmp_path):
    """The issue's case: a complete checkpoint of another model (other
    d_model and n_code) dropped in as the newest: skipped by name."""
    other = tmp_path / "other"
    other_run = RUN.replace(steps=6, model=dict(d_model=32, n_code=8))
    _train(other, other_run, "bbbbbbbbbbbb")
    d = _copy(run_dir, tmp_path)
    shutil.copytree(
        other / "checkpoints" / "step_00000006", d / "checkpoints" / "step_00000006"
    )
    (d / "checkpoints" / "LATEST").write_text("step_00000006\n")
    with pytest.warns(CheckpointWarning, match="another run"):
        _, _, meta = train.load_run(d)
    assert meta["step"] == 4 and meta["run_id"] == "aaaaaaaaaaaa"
    with pytest.raises(CheckpointError, match="not this run's checkpoint"):
        train.load_run(d, step=6)


def test_same_settings_other_run_id_is_refused(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    _rewrite_meta(
        d / "checkpoints" / "step_00000004", lambda m: dict(m, run_id="cccccccccccc")
    )
    with pytest.warns(CheckpointWarning, match="belongs to another run"):
        _, _, meta = train.load_run(d)
    assert meta["step"] == 2


def test_run_json_holds_the_run_id_and_settings(run_dir):
    settings, run_id = train.runs.read_run_json(run_dir)
    assert run_id == "aaaaaaaaaaaa"
    assert train.RunConfig.from_dict(settings) == RUN
    metas = [
        train.read_meta(p) for p in train.list_checkpoints(run_dir / "checkpoints")
    ]
    assert {m["run_id"] for m in metas} == {"aaaaaaaaaaaa"}


def test_metrics_log_is_fsynced_at_each_checkpoint(tmp_path, monkeypatch):
    import os

    from tvq_eqx.train import callbacks as _callbacks

    synced = []
    real = os.fsync
    monkeypatch.setattr(
        _callbacks.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1]
    )
    log = _callbacks.JSONLLogger(tmp_path / "metrics.jsonl")
    log.on_log(dict(split="train", step=1, loss=1.0))
    log.on_checkpoint(2, tmp_path)
    assert len(synced) == 1


def test_disk_full_is_one_line_and_removes_the_partial_folder(
    run_dir, tmp_path, monkeypatch
):
    """ENOSPC while writing: a CheckpointError naming the folder and "No
    space left on device" (was: a 60-line traceback ending in equinox's
    TreePathError), no .tmp-* folder left, LATEST and earlier checkpoints
    untouched; the next save succeeds."""
    import errno
    import os

    import equinox as eqx

    from tvq_eqx.train import _checkpoint

    d = _copy(run_dir, tmp_path) / "checkpoints"
    before = sorted(p.name for p in d.iterdir())
    like = eqx.filter_eval_shape(train.new_train_state, RUN)
    ts, _ = train.load_checkpoint(d, like)
    real = eqx.tree_serialise_leaves

    def full(f, tree):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_checkpoint.eqx, "tree_serialise_leaves", full)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        train.save_checkpoint(d, ts, step=6)
    assert "step_00000006" in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in d.iterdir()) == before
    monkeypatch.setattr(_checkpoint.eqx, "tree_serialise_leaves", real)
    train.save_checkpoint(d, ts, step=6)
    assert (d / "LATEST").read_text().strip() == "step_00000006"


def test_resume_of_a_complete_run_writes_its_missing_plot(tmp_path, capsys):
    """A kill after the final checkpoint but before the plot: `--resume`
    has nothing to train, and writes curves.png."""
    from tvq_eqx.cli import main

    flags = [
        "--model.d-model", "16", "--model.d-k", "8", "--model.d-v", "16",
        "--model.n-code", "4", "--model.n-layer", "1", "--model.block-len", "16",
        "--data.seq-len", "32", "--update-len", "16", "--data.batch-size", "4",
        "--steps", "2", "--optimizer.warmup-steps", "1", "--eval-every", "0",
        "--eval-batches", "1", "--log-every", "1", "--sample-len", "0",
        "--no-progress",
    ]  # fmt: skip
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), *flags]) == 0
    (run_dir / "curves.png").unlink()
    assert main(["train", "--run-dir", str(run_dir), "--resume", *flags]) == 0
    assert "wrote the missing" in capsys.readouterr().out
    assert (run_dir / "curves.png").is_file()


def test_async_checkpoints_write_off_the_training_thread(tmp_path, monkeypatch):
    """`AsyncCheckpointer` (what `fit` uses): `save` copies to the host and
    returns; the files are written by a background thread; `wait` returns
    the finished checkpoint, or raises the writer's error in the caller."""
    import errno
    import os
    import threading

    import equinox as eqx

    from tvq_eqx.train import _checkpoint

    writers = []
    real_write = _checkpoint.write_checkpoint

    def spy(*args, **kwargs):
        writers.append(threading.current_thread().name)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(_checkpoint, "write_checkpoint", spy)
    saver = _checkpoint.AsyncCheckpointer()
    ts = train.new_train_state(RUN)
    assert saver.save(tmp_path, ts, step=1) is None
    assert saver.wait() == (1, tmp_path / "step_00000001")
    assert writers == ["tvq-eqx-checkpoint-1"]
    like = eqx.filter_eval_shape(train.new_train_state, RUN)
    loaded, _ = train.load_checkpoint(tmp_path, like)
    assert int(loaded.step) == int(ts.step)

    def full(f, tree):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_checkpoint.eqx, "tree_serialise_leaves", full)
    saver.save(tmp_path, ts, step=2)  # returns: the failure is in the thread
    with pytest.raises(CheckpointError, match="No space left on device"):
        saver.wait()
    assert (tmp_path / "LATEST").read_text().strip() == "step_00000001"
