"""`python -m tvq_eqx`: train / eval / sample / bench end to end on a micro
model, resume, and bad input (one error line, exit code 2, nothing written)."""

import json

import pytest

import tvq_eqx
from tvq_eqx.cli import main

MICRO = [
    "--model.d-model",
    "32",
    "--model.d-k",
    "8",
    "--model.d-v",
    "32",
    "--model.n-code",
    "8",
    "--model.n-layer",
    "1",
    "--model.block-len",
    "16",
    "--data.seq-len",
    "64",
    "--update-len",
    "32",
    "--data.batch-size",
    "4",
    "--steps",
    "4",
    "--optimizer.warmup-steps",
    "1",
    "--eval-every",
    "2",
    "--eval-batches",
    "2",
    "--log-every",
    "2",
    "--sample-len",
    "12",
    "--no-progress",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "--run-dir", str(run_dir), *MICRO])
    assert code == 0
    return run_dir


def test_export_writes_the_model_load_model_reads(trained, tmp_path, capsys):
    """`tvq-eqx export`: the run's model, array for array, as safetensors."""
    import jax
    import numpy as np

    out = tmp_path / "model.safetensors"
    assert main(["export", "--run-dir", str(trained), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    _, ts, _ = tvq_eqx.train.load_run(trained)
    loaded = tvq_eqx.load_model(out)
    assert loaded.config == ts.model.config
    for a, b in zip(jax.tree.leaves(ts.model), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert main(["export", "--run-dir", str(trained), "--out", str(tmp_path)]) == 2
    assert "is a folder" in _one_error_line(capsys)


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tvq-eqx: error: "), err
    return err[0]


def test_train_writes_log_curves_checkpoint(trained):
    records = [
        json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()
    ]
    train_recs = [r for r in records if r["split"] == "train"]
    val_recs = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in train_recs] == [2, 4]
    assert [r["step"] for r in val_recs] == [2, 4]
    for k in (
        "bits_per_token",
        "tokens_per_s",
        "code_entropy",
        "dead_code_fraction",
        "code_perplexity",
        "grad_norm",
    ):
        assert k in train_recs[-1]
    assert (trained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained / "checkpoints" / "LATEST").read_text().strip() == "step_00000004"
    meta = json.loads(
        (trained / "checkpoints" / "step_00000004" / "meta.json").read_text()
    )
    assert meta["batch_index"] == 2 and meta["run"]["model"]["d_model"] == 32
    assert meta["validation"]["bits_per_token"] == val_recs[-1]["bits_per_token"]


def test_eval_and_sample_commands(trained, capsys):
    capsys.readouterr()
    log = trained / "metrics.jsonl"
    before = log.read_text().splitlines()
    assert (
        main(
            ["eval", "--run-dir", str(trained), "--eval-batches", "2", "--no-progress"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "validation bits per byte:" in out
    # The result is appended to the run's log, which keeps what it had.
    after = log.read_text().splitlines()
    assert after[: len(before)] == before and len(after) == len(before) + 1
    record = json.loads(after[-1])
    assert record["split"] == "eval_validation" and record["step"] == 4
    assert (
        main(
            [
                "sample",
                "--run-dir",
                str(trained),
                "--prompt",
                "ROMEO:",
                "--sample-len",
                "12",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("ROMEO:")
    # The prompt (5 complete blocks of 16 bytes) read in chunks of 32 tokens:
    # the same greedy text; a chunk not a multiple of the block is refused.
    prompt = ["--prompt", "ROMEO: " * 13, "--sample-len", "12", "--temperature", "0"]
    texts = []
    for chunk in ([], ["--prefill-chunk", "32"]):
        assert main(["sample", "--run-dir", str(trained), *prompt, *chunk]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("ROMEO: " * 13)
    argv = ["sample", "--run-dir", str(trained), *prompt, "--prefill-chunk", "24"]
    assert main(argv) == 2
    assert (
        "--prefill-chunk must be a positive multiple of the block length (16); "
        "got 24" in _one_error_line(capsys)
    )


def test_resume_continues_bit_for_bit(trained, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), "--stop-at", "2", *MICRO]) == 0
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_00000002"
    assert main(["train", "--run-dir", str(run_dir), "--resume", *MICRO]) == 0
    final = "checkpoints/step_00000004/state.eqx"
    assert (run_dir / final).read_bytes() == (trained / final).read_bytes()
    steps = [
        json.loads(x)["step"]
        for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["split"] == "train"
    ]
    assert steps == [2, 4]
    capsys.readouterr()
    # Different settings on resume: refused.
    assert (
        main(
            [
                "train",
                "--run-dir",
                str(run_dir),
                "--resume",
                *MICRO,
                "--optimizer.learning-rate",
                "0.5",
            ]
        )
        == 2
    )
    assert "differ from the checkpoint" in _one_error_line(capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "nope"], "invalid choice"),
        (["train", "--bogus-flag", "1"], "Unrecognized options: --bogus-flag"),
        (["frobnicate"], "invalid choice"),
        (["train", "--data.path", "/nonexistent/text.txt", *MICRO], "does not exist"),
        (["train", *MICRO, "--data.seq-len", "80"], "multiple of"),
        (["train", *MICRO, "--model.d-model", "abc"], "--model.d-model"),
        (["train", *MICRO, "--optimizer.name", "sgd"], "'sgd'"),
        (["train", *MICRO, "--model.qk-norm", "centred"], "--model.qk-norm"),
        (["train", *MICRO, "--model.e-scale", "0"], "e_scale must be a float > 0"),
        (["train", *MICRO, "--config", "/nonexistent/run.toml"], "no such file"),
        (
            ["train", *MICRO, "--grad-accum", "3"],
            "grad_accum=3 (--grad-accum) must divide the batch size",
        ),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(argv, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                *argv[:1],
                *(["--run-dir", str(run_dir)] if argv[0] == "train" else []),
                *argv[1:],
            ]
        )
        == 2
    )
    assert message in _one_error_line(capsys)
    assert not run_dir.exists()


def test_empty_data_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    run_dir = tmp_path / "run"
    assert (
        main(["train", "--run-dir", str(run_dir), "--data.path", str(empty), *MICRO])
        == 2
    )
    assert "empty" in _one_error_line(capsys)
    assert not run_dir.exists()


def test_existing_checkpoint_is_not_overwritten(trained, capsys):
    state = trained / "checkpoints" / "step_00000004" / "state.eqx"
    before = state.read_bytes()
    capsys.readouterr()
    assert main(["train", "--run-dir", str(trained), *MICRO]) == 2
    assert "--resume" in _one_error_line(capsys)
    assert state.read_bytes() == before


def test_corrupt_or_missing_checkpoint(trained, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    state = copy / "checkpoints" / "step_00000004" / "state.eqx"
    raw = bytearray(state.read_bytes())
    raw[-10] ^= 0x55
    state.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(copy), "--no-progress"]) == 2
    assert "corrupt" in _one_error_line(capsys)
    assert main(["sample", "--run-dir", str(tmp_path / "nothing")]) == 2
    assert "no checkpoints" in _one_error_line(capsys)


def test_rerunning_without_run_dir_never_overwrites(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *MICRO, "--stop-at", "2"]) == 0
    assert main(["train", *MICRO, "--stop-at", "2"]) == 0
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "LATEST").is_file()
    assert (tmp_path / "runs" / "tiny-2" / "checkpoints" / "LATEST").is_file()


def test_bench_reports_throughput(capsys):
    flags = [f for f in MICRO if f != "--no-progress"]
    assert main(["bench", *flags, "--bench-steps", "1", "--sample-tokens", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["train_tokens_per_s"] > 0 and res["sample_ms_per_token"] > 0


def test_parity_options_are_flags(tmp_path):
    run_dir = tmp_path / "run"
    flags = ["--model.qk-norm", "layer", "--model.layerdrop", "layer",
             "--model.e-scale", "0.5", "--model.drop-mask-scope", "segment",
             "--model.lm-loss-average", "tokens", "--model.p-droplyr", "0.2",
             "--model.tie-embeddings"]  # fmt: skip
    assert (
        main(["train", "--run-dir", str(run_dir), *MICRO, *flags, "--stop-at", "2"])
        == 0
    )
    meta = json.loads(
        (run_dir / "checkpoints" / "step_00000002" / "meta.json").read_text()
    )
    model = meta["run"]["model"]
    assert (model["qk_norm"], model["layerdrop"], model["e_scale"]) == (
        "layer",
        "layer",
        0.5,
    )
    assert (model["drop_mask_scope"], model["lm_loss_average"]) == ("segment", "tokens")


def test_train_help_shows_type_default_and_description(capsys):
    assert main(["train", "--help"]) == 0
    # Unwrap: tyro boxes its help; where a line wraps depends on its version.
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    for text in (
        "--steps INT Optimizer updates in the whole run. (default: 600)",
        "--model.d-model INT Width of the residual stream. (default: 128)",
        "--optimizer.grad-clip {None}|FLOAT Global-norm gradient clipping (None = off). (default: 1.0)",
        "--data.kind {bytes,sentencepiece,images}",
        "--model.attention {vq,window,block_window,full}",
        "--preset {tiny,enwik8,pg19,imagenet64}",
        "--grad-accum INT Gradient accumulation: each update's rows in this many",
    ):
        assert text in out, text
    assert main(["train", "--preset", "enwik8", "--help"]) == 0
    assert "(default: 125000)" in " ".join(capsys.readouterr().out.split())


def test_presets_are_the_cli_choices():
    from typing import get_args

    from tvq_eqx import cli
    from tvq_eqx.train import PRESETS

    assert set(get_args(cli.PresetName)) == set(PRESETS)


def test_config_file_then_flags(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        "steps = 4\nupdate_len = 32\ncontext_len = 0\n"
        "[model]\nd_model = 32\nd_k = 8\nd_v = 32\nn_code = 8\nn_layer = 1\nblock_len = 16\n"
        "[data]\nseq_len = 64\nbatch_size = 4\n"
        '[optimizer]\nwarmup_steps = 1\ngrad_clip = "None"\n'
    )
    assert main(["train", "--config", str(cfg), "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Width of the residual stream. (default: 32)" in out
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run_dir), "--stop-at", "2",
                 "--optimizer.learning-rate", "0.01", "--no-progress"]) == 0  # fmt: skip
    run = json.loads((run_dir / "run.json").read_text())
    assert run["model"]["d_model"] == 32 and run["model"]["mem_len"] == 16
    assert run["optimizer"]["grad_clip"] is None
    assert run["optimizer"]["learning_rate"] == 0.01  # the flag wins
    assert run["optimizer"]["weight_decay"] == 2e-4  # the preset's
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nd_modle = 3\n")
    capsys.readouterr()
    assert main(["train", "--config", str(bad), "--run-dir", str(tmp_path / "x")]) == 2
    assert "unknown TransformerConfig field(s) ['d_modle']" in _one_error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path):
    from tvq_eqx import train

    def boom(*args, **kwargs):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(train, "fit", boom)
    with pytest.raises(RuntimeError, match="a real bug"):
        main(["train", "--run-dir", str(tmp_path / "run"), *MICRO])


def test_ctrl_c_checkpoints_exits_130_and_resumes(
    trained, tmp_path, monkeypatch, capsys
):
    import os
    import signal

    from tvq_eqx.train import callbacks as _callbacks

    real = _callbacks.ProgressBar.on_step

    def on_step(self, step, metrics, train_state):
        real(self, step, metrics, train_state)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(_callbacks.ProgressBar, "on_step", on_step)
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), *MICRO]) == 130
    assert "interrupted at update 2" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_00000002"
    monkeypatch.setattr(_callbacks.ProgressBar, "on_step", real)
    assert main(["train", "--run-dir", str(run_dir), "--resume", *MICRO]) == 0
    final = "checkpoints/step_00000004/state.eqx"
    assert (run_dir / final).read_bytes() == (trained / final).read_bytes()


def test_pallas_settings_are_flags_and_config_file_tables(tmp_path, capsys):
    # Plain flags (no subcommand); tile sizes from a config file's table.
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--model.pallas.backward {kernels,xla}" in out
    assert "--model.pallas.interpret {None,True,False}" in out
    assert "model.pallas:" not in out  # no tyro subcommand
    cfg = tmp_path / "run.toml"
    cfg.write_text("[model.pallas.block_sizes]\nblock_q = 8\nnum_warps = 2\n")
    run_dir = tmp_path / "run"
    flags = ["--config", str(cfg), *MICRO, "--model.pallas.backward", "xla",
             "--model.pallas.interpret", "True"]  # fmt: skip
    argv = ["train", "--run-dir", str(run_dir), *flags]
    assert main([*argv, "--stop-at", "2"]) == 0
    run = json.loads((run_dir / "run.json").read_text())
    pallas = run["model"]["pallas"]
    assert (pallas["backward"], pallas["interpret"]) == ("xla", True)
    assert (pallas["block_sizes"]["block_q"], pallas["block_sizes"]["num_warps"]) == (
        8,
        2,
    )
    from tvq_eqx.train import RunConfig, load_run

    saved, _, _ = load_run(run_dir)
    assert saved.model.pallas == tvq_eqx.PallasConfig(
        tvq_eqx.ops.BlockSizes(block_q=8, num_warps=2), backward="xla", interpret=True
    )
    assert RunConfig.from_dict(run) == saved
    # --resume compares the pallas settings like any other.
    capsys.readouterr()
    bad = ["--model.pallas.backward", "kernels"]
    assert main(["train", "--run-dir", str(run_dir), "--resume", *flags, *bad]) == 2
    assert "differ from the checkpoint" in _one_error_line(capsys)
    assert main(["train", "--run-dir", str(run_dir), "--resume", *flags]) == 0
