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

import tvq_eqx
from tvq_eqx import train
from tvq_eqx.train import CheckpointError, CheckpointWarning

RUN = train.RunConfig(
    model=tvq_eqx.TransformerConfig(
        n_vocab=256, d_model=16, d_k=8, d_v=16, n_code=4, n_layer=1, block_len=8
    ),
    data=train.DataConfig(batch_size=2, seq_len=16),
    optimizer=train.OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
    update_len=8, steps=4, context_len=32, eval_every=0, eval_batches=2,
    log_every=2, save_every=2, keep=5, sample_len=0,
)  # fmt: skip


def _train(run_dir, run, run_id):
    toks = (np.arange(4000) * 7 % 251).astype(np.int32)
    stream = train.make_stream(run, toks[:3000], train=True)
    train.start_run_dir(run_dir, run, run_id=run_id)
    res = train.fit(
        train.new_train_state(run), run, stream,
        checkpoint_dir=train.checkpoints_of(run_dir),
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
    settings, run_id = train.read_run_json(run_dir)
    assert run_id == "aaaaaaaaaaaa"
    assert train.RunConfig.from_dict(settings) == RUN
    metas = [
        train.read_meta(p) for p in train.list_checkpoints(run_dir / "checkpoints")
    ]
    assert {m["run_id"] for m in metas} == {"aaaaaaaaaaaa"}


def test_metrics_log_is_fsynced_at_each_checkpoint(tmp_path, monkeypatch):
    import os

    from tvq_eqx.train import _callbacks

    synced = []
    real = os.fsync
    monkeypatch.setattr(
        _callbacks.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1]
    )
    log = _callbacks.JSONLLogger(tmp_path / "metrics.jsonl")
    log.on_log(dict(split="train", step=1, loss=1.0))
    log.on_checkpoint(2, tmp_path)
    assert len(synced) == 1
