"""`train --mesh data=2,seq=2`: context parallelism from the command line
(4 test devices) gives the data-parallel run's weights, resumes without the
mesh, and bad meshes are one error line with nothing written."""

import json

import equinox as eqx
import jax
import numpy as np
import pytest
from test_cli import MICRO, _one_error_line

from tvq_eqx import train
from tvq_eqx.cli import main


def _arrays(run_dir):
    _, ts, _ = train.load_run(run_dir)
    return jax.tree.leaves(eqx.filter(ts.model, eqx.is_array))


def test_mesh_run_equals_the_data_parallel_run_and_resumes_without_it(tmp_path):
    plain, meshed = tmp_path / "plain", tmp_path / "meshed"
    assert main(["train", "--run-dir", str(plain), *MICRO]) == 0
    assert (
        main(["train", "--run-dir", str(meshed), "--mesh", "data=2,seq=2",
              "--stop-at", "2", *MICRO])
        == 0
    )  # fmt: skip
    model = json.loads((meshed / "run.json").read_text())["model"]
    assert (model["seq_axis"], model["batch_axis"]) == ("seq", "data")
    # The second half without --mesh (data parallel over all devices).
    assert main(["train", "--run-dir", str(meshed), "--resume", *MICRO]) == 0
    for a, b in zip(_arrays(meshed), _arrays(plain), strict=True):
        assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) < 5e-5


@pytest.mark.parametrize(
    "mesh, message",
    [
        ("data=3,seq=2", "must equal the 4 devices"),
        ("data=2,pipe=2", "expected data=N,seq=M"),
        ("data=2,data=2", "expected data=N,seq=M"),
        ("data=1,seq=4", "multiple of block_len=16 and at least mem_len=16"),
    ],
)
def test_bad_mesh_is_one_line_and_writes_nothing(mesh, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), "--mesh", mesh, *MICRO]) == 2
    assert message in _one_error_line(capsys)
    assert not run_dir.exists()
