"""`train --distributed` as two local processes (one CPU device each, gloo
collectives): both finish, only the first writes the run folder, and the run
ends where the one-process data-parallel run ends."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from test_cli import MICRO, trained  # noqa: F401  (the one-process reference run)

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _validation(run_dir: Path) -> list[float]:
    records = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    return [r["bits_per_token"] for r in records if r.get("split") == "validation"]


def test_two_process_run_equals_one_process(trained, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(rank),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tvq_eqx", "train", "--distributed",
                 "--run-dir", str(run_dir), *MICRO],
                env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True,
            )
        )  # fmt: skip
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "devices=2" in out
    # One writer: every record once.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_00000004"
    # The same global batch as the one-process run (4 devices): same losses.
    got, want = _validation(run_dir), _validation(trained)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert abs(a - b) < 1e-4, (got, want)
