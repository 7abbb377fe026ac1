"""Work not lost, bad input named (issue 11): the command line's run folders,
checkpoint fallback and flag checks. One micro run (checkpoints at updates 2
and 4) is trained once; the tests copy it."""

import json
import os
import shutil
import signal

import pytest
from test_cli import MICRO

from tvq_eqx import train
from tvq_eqx.cli import main


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rel") / "run"
    assert main(["train", "--run-dir", str(run_dir), *MICRO, "--save-every", "2"]) == 0
    names = [p.name for p in train.list_checkpoints(run_dir / "checkpoints")]
    assert names == ["step_00000002", "step_00000004"]
    return run_dir


def _copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _corrupt(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    path.write_bytes(bytes(raw))


def _rows(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["split"], r["step"]) for r in rows]


def _files(run_dir):
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tvq-eqx: error: "), err
    return err[0]


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(
    two_checkpoints, tmp_path, capsys
):
    run_dir = _copy(two_checkpoints, tmp_path)
    ckpt = run_dir / "checkpoints"
    _corrupt(ckpt / "step_00000004" / "state.eqx")
    capsys.readouterr()
    # The newest intact one is used; the warning names the skipped one and why.
    assert main(["eval", "--run-dir", str(run_dir), "--eval-batches", "1",
                 "--no-progress"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "tvq-eqx: warning: skipped checkpoint step_00000004" in err
    assert "corrupt" in err and "using step_00000002" in err
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["split"] == "eval_validation" and last["step"] == 2
    # A chosen checkpoint has no fallback; a missing one lists what exists.
    assert main(["eval", "--run-dir", str(run_dir), "--checkpoint", "4"]) == 2
    assert "corrupt" in _error_line(capsys)
    assert main(["sample", "--run-dir", str(run_dir), "--checkpoint", "7"]) == 2
    line = _error_line(capsys)
    assert "no checkpoint of update 7" in line and "complete ones: 2, 4" in line
    assert main(["eval", "--run-dir", str(run_dir), "--checkpoint", "x"]) == 2
    assert "--checkpoint" in _error_line(capsys)
    # Nothing intact: one line naming each skipped checkpoint.
    _corrupt(ckpt / "step_00000002" / "state.eqx")
    assert main(["eval", "--run-dir", str(run_dir), "--no-progress"]) == 2
    line = _error_line(capsys)
    assert "no intact checkpoint" in line
    assert "step_00000004" in line and "step_00000002" in line


def test_resume_after_fallback_recomputes_the_lost_checkpoint(
    two_checkpoints, tmp_path, capsys
):
    run_dir = _copy(two_checkpoints, tmp_path)
    final = run_dir / "checkpoints" / "step_00000004" / "state.eqx"
    good = final.read_bytes()
    _corrupt(final)
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run_dir), "--resume", *MICRO,
                 "--save-every", "2"]) == 0  # fmt: skip
    assert "skipped checkpoint step_00000004" in capsys.readouterr().err
    assert final.read_bytes() == good  # bit for bit the lost one
    assert _rows(run_dir) == [
        ("train", 2), ("validation", 2), ("train", 4), ("validation", 4)]  # fmt: skip


def test_lost_latest_is_found_by_scanning_and_never_overwritten(
    two_checkpoints, tmp_path, capsys
):
    run_dir = _copy(two_checkpoints, tmp_path)
    (run_dir / "checkpoints" / "LATEST").unlink()
    assert train.latest_checkpoint(run_dir / "checkpoints").name == "step_00000004"
    capsys.readouterr()
    assert main(["sample", "--run-dir", str(run_dir), "--prompt", "x" * 16,
                 "--sample-len", "12", "--temperature", "0"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "LATEST is missing" in err and "using step_00000004" in err
    # A fresh train into it refuses and writes nothing.
    before = _files(run_dir)
    assert main(["train", "--run-dir", str(run_dir), *MICRO]) == 2
    line = _error_line(capsys)
    assert "already holds checkpoints" in line and "--resume" in line
    assert _files(run_dir) == before
    # An incomplete checkpoint folder alone counts too.
    other = tmp_path / "other"
    (other / "checkpoints" / "step_00000002").mkdir(parents=True)
    assert main(["train", "--run-dir", str(other), *MICRO]) == 2
    assert "already holds checkpoints" in _error_line(capsys)
    assert not (other / "run.json").exists()


def test_finished_run_resumed_does_nothing_and_more_steps_extend_it(
    two_checkpoints, tmp_path, capsys, monkeypatch
):
    run_dir = _copy(two_checkpoints, tmp_path)
    flags = [*MICRO, "--save-every", "2"]
    before = _files(run_dir)
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run_dir), "--resume", *flags]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _files(run_dir) == before  # no duplicate validation row, no rewrite
    # --steps below the checkpoint: refused.
    assert main(["train", "--run-dir", str(run_dir), "--resume", *flags,
                 "--steps", "2"]) == 2  # fmt: skip
    assert "below the checkpoint's update 4" in _error_line(capsys)
    # Extending: the new --steps defines the schedule (fit's optimizer is
    # built from the run it gets).
    seen = []
    real_fit = train.fit

    def spy(ts, run, *args, **kwargs):
        seen.append((int(ts.step), run.steps, kwargs.get("optimizer")))
        return real_fit(ts, run, *args, **kwargs)

    monkeypatch.setattr(train, "fit", spy)
    assert main(["train", "--run-dir", str(run_dir), "--resume", *flags,
                 "--steps", "8"]) == 0  # fmt: skip
    assert seen == [(4, 8, None)]
    assert _rows(run_dir) == [
        (s, n) for n in (2, 4, 6, 8) for s in ("train", "validation")]  # fmt: skip
    meta = train.read_meta(run_dir / "checkpoints")
    assert meta["step"] == 8 and meta["run"]["steps"] == 8 and meta["completed"]
    assert json.loads((run_dir / "run.json").read_text())["steps"] == 8


def test_a_failing_first_step_writes_nothing(tmp_path, monkeypatch):
    # E.g. a setting that fails only when the model runs: the run folder and
    # run.json appear only after the first update completed.
    from tvq_eqx.train import _fit

    def broken(*args, **kwargs):
        def step(*a, **k):
            raise RuntimeError("fails at the first step")

        return step

    monkeypatch.setattr(_fit, "make_train_step", broken)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="first step"):
        main(["train", "--run-dir", str(run_dir), *MICRO])
    assert not run_dir.exists()


@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("not a folder")
    return f


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--bench-steps", "0"], "--bench-steps must be >= 1; got 0"),
        (["bench", "--bench-steps", "-3"], "--bench-steps must be >= 1"),
        (["bench", "--sample-tokens", "-1"], "--sample-tokens must be >= 0"),
        (["train", "--run-dir", "{file}"], "is a file, not a folder"),
        (["train", "--run-dir", "{file}/sub"], "lies under the file"),
        (["train", "--run-dir", "{new}", "--steps", "-4"], "steps must be a positive int"),
        (["train", "--run-dir", "{new}", "--steps", "0"], "steps must be a positive int"),
        (["train", "--run-dir", "{new}", "--data.batch-size", "0"], "batch_size must be a positive int"),
        (["train", "--run-dir", "{new}", "--data.seq-len", "-1"], "seq_len must be a positive int"),
        (["train", "--run-dir", "{new}", "--temperature", "nan"], "temperature must be a finite float"),
        (["train", "--run-dir", "{new}", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["train", "--run-dir", "{new}", "--stop-at", "0"], "--stop-at must be >= 1"),
        (["train", "--run-dir", "{new}", "--checkpoint", "2"], "--checkpoint needs --resume"),
        (["train", "--run-dir", "{new}", "--resume"], "--resume: no checkpoints"),
        (["train", "--run-dir", "{new}", "--data.path", "{new}/none.txt"], "does not exist"),
        (["train", "--run-dir", "{new}", "--data.path", "{empty}"], "contains no non-empty files"),
        (["train", "--run-dir", "{new}", "--data.kind", "images"], "needs a data path"),
        (["train", "--run-dir", "{new}", "--config", "{empty}"], "is a folder, not a file"),
        (["train", "--run-dir", "{new}", "--model.n-layer", "0"], "n_layer must be a positive int"),
        (["train", "--run-dir", "{new}", "--optimizer.learning-rate", "nan"], "learning_rate must be > 0"),
        (["train", "--run-dir", "{new}", "--keep", "0"], "keep must be a positive int"),
        (["train", "--run-dir", "{new}", "--model.implementation", "quadratic"], "invalid choice 'quadratic'"),
        (["train", "--run-dir", "{new}", "--context-len", "7"], "context_len=7 must be a multiple"),
        (["eval", "--run-dir", "{file}"], "is a file, not a folder"),
        (["eval", "--run-dir", "{new}"], "no checkpoints in"),
        (["eval", "--run-dir", "{new}", "--eval-batches", "-1"], "--eval-batches must be >= 0"),
        (["eval", "--run-dir", "{new}", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["eval", "--run-dir", "{new}", "--checkpoint", "-2"], "--checkpoint: expected an update number"),
        (["sample", "--run-dir", "{new}", "--temperature", "nan"], "--temperature must be a finite number"),
        (["sample", "--run-dir", "{new}", "--temperature", "inf"], "--temperature must be a finite number"),
        (["sample", "--run-dir", "{new}", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["sample", "--run-dir", "{new}", "--sample-len", "-1"], "--sample-len must be >= 0"),
        (["sample", "--run-dir", "{new}", "--seed", "-1"], "--seed must be >= 0"),
    ],
)  # fmt: skip
def test_bad_flags_one_line_exit_2_nothing_written(
    argv, message, tmp_path, a_file, capsys
):
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    argv = [a.format(file=a_file, new=new, empty=empty) for a in argv]
    assert main(argv) == 2
    assert message in _error_line(capsys)
    assert not new.exists()
    assert a_file.read_text() == "not a folder"


def test_ctrl_c_during_a_huge_sample_exits_130_keeping_the_text(
    two_checkpoints, monkeypatch, capsys
):
    # 10^8 tokens are accepted (streamed in chunks, memory bounded); a Ctrl-C
    # after the first chunk stops it, exit 130, what was printed stays.
    from tvq_eqx import sampling

    real = sampling.sample_iter
    asked = []

    def ctrl_c_after_one_chunk(*args, **kwargs):
        asked.append(kwargs["steps"])
        chunks = real(*args, **kwargs, chunk_len=16)
        yield next(chunks)
        os.kill(os.getpid(), signal.SIGINT)
        yield from chunks

    monkeypatch.setattr(sampling, "sample_iter", ctrl_c_after_one_chunk)
    # Python's own Ctrl-C handler (KeyboardInterrupt), whatever an earlier test
    # in this worker process left installed: with a handler that only sets a
    # flag the 10^8 tokens would run to the end.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    capsys.readouterr()
    try:
        code = main(["sample", "--run-dir", str(two_checkpoints), "--prompt", "x" * 16,
                     "--sample-len", "100000000", "--temperature", "0"])  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    out, err = capsys.readouterr()
    assert code == 130 and asked == [100_000_000]
    assert "interrupted after 16 of 100000000 tokens" in err
    assert out.startswith("x" * 16) and len(out) > 16 + 1
    # The same 16 tokens as a plain greedy sample of 16.
    monkeypatch.setattr(sampling, "sample_iter", real)
    assert main(["sample", "--run-dir", str(two_checkpoints), "--prompt", "x" * 16,
                 "--sample-len", "16", "--temperature", "0"]) == 0  # fmt: skip
    assert capsys.readouterr().out == out


def test_distributed_without_a_coordinator_is_one_line(tmp_path, monkeypatch, capsys):
    # What jax.distributed.initialize() raises without its settings (stubbed:
    # on a cluster machine the real one would try to connect).
    import jax

    def no_coordinator(*args, **kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", no_coordinator)
    for argv in (
        ["train", "--run-dir", str(tmp_path / "run"), *MICRO, "--distributed"],
        ["bench", "--distributed"],
        ["eval", "--run-dir", str(tmp_path / "run"), "--distributed"],
    ):
        assert main(argv) == 2
        assert "--distributed: coordinator_address should be defined" in _error_line(
            capsys
        )
    assert not (tmp_path / "run").exists()


def test_streamed_text_equals_one_whole_decode(capsys):
    # Chunk boundaries change nothing: a UTF-8 character split between two
    # chunks, and a sentencepiece-like decoder that drops the text's first
    # space.
    import numpy as np

    from tvq_eqx.data import decode_bytes, encode_bytes
    from tvq_eqx.sampling import TokenPrinter

    toks = encode_bytes("héllo wörld ✓")
    printer = TokenPrinter(decode_bytes, byte_level=True)
    for i in range(0, len(toks), 3):
        printer.write(toks[i : i + 3])
    printer.close()
    assert capsys.readouterr().out == "héllo wörld ✓\n"

    pieces = [" a", " b", "c", " d"]

    def decode(ids):
        return "".join(pieces[int(t)] for t in ids).lstrip(" ")

    printer = TokenPrinter(decode, byte_level=False)
    for t in [0, 1, 2, 3]:
        printer.write(np.asarray([t]))
    printer.close()
    assert capsys.readouterr().out == decode([0, 1, 2, 3]) + "\n" == "a bc d\n"
