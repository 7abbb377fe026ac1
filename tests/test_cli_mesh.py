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


def test_mesh_for_run_refuses_each_bad_mesh_before_tracing():
    # The library call behind --mesh (4 test devices): each refusal names the
    # rule's numbers; a good mesh is returned, one device needs none.
    run = train.PRESETS["tiny"].replace(
        data=dict(batch_size=4, seq_len=64), update_len=64,
        model=dict(block_len=16),
    )  # fmt: skip
    mesh = train.mesh_for_run(run, data=2, seq=2)
    assert mesh is not None and dict(mesh.shape) == dict(data=2, seq=2)
    assert dict(train.mesh_for_run(run).shape) == dict(data=4)
    with pytest.raises(ValueError, match=r"data x seq = 3 x 2 must equal the 4"):
        train.mesh_for_run(run, data=3, seq=2)
    with pytest.raises(ValueError, match="batch size 6 must be a multiple"):
        train.mesh_for_run(run.replace(data=dict(batch_size=6)), data=4)
    with pytest.raises(ValueError, match=r"update_len=64 / seq=4.*at least mem_len=32"):
        train.mesh_for_run(run.replace(model=dict(mem_len=32)), data=1, seq=4)
    with pytest.raises(ValueError, match="context parallelism"):
        train.mesh_for_run(run.replace(model=dict(attention="window")), seq=2)


def test_init_distributed_names_a_bad_setting():
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        train.init_distributed(dict(JAX_NUM_PROCESSES="two"))
