"""Where a run executes: multi-process start-up (`init_distributed`) and the
device mesh a run trains on (`mesh_for_run`), checked against the run before
anything is traced. The rules checked here have their homes elsewhere (the
mesh's data axis in `make_mesh` and the batch placement, a context-parallel
chunk in the op, context parallelism's model settings in the config); this
module only calls them early, so that a bad mesh is one error before a run
starts."""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
from jax.sharding import Mesh

from ..ops._context_parallel import check_chunk_len
from ._run_config import RunConfig
from ._steps import check_batch_splits, check_grad_accum, make_mesh

_ENV_SETTINGS = (
    ("JAX_NUM_PROCESSES", "num_processes"),
    ("JAX_PROCESS_ID", "process_id"),
)


def init_distributed(environ: Mapping[str, str] | None = None) -> None:
    """`jax.distributed.initialize()`, with explicit settings from the
    environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
    `JAX_PROCESS_ID`; unset, jax detects SLURM / Cloud TPU / MPI itself).

    A setting that is not an integer, or a coordinator jax cannot find, is a
    `ValueError` naming what to set; a failure to connect keeps jax's own
    error. A local multi-process run on CPU gets gloo collectives (set only
    for an explicit multi-process run, and undone if it does not start: the
    setting is process-wide)."""
    env = os.environ if environ is None else environ
    explicit: dict[str, int | str] = {}
    for var, name in _ENV_SETTINGS:
        value = env.get(var)
        if value is not None:
            if not value.strip().isdigit():
                raise ValueError(f"{var}={value!r} is not an integer")
            explicit[name] = int(value)
    if env.get("JAX_COORDINATOR_ADDRESS"):
        explicit["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    previous = jax.config.jax_cpu_collectives_implementation
    if int(explicit.get("num_processes", 1)) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**explicit)  # pyright: ignore[reportArgumentType]
    except ValueError as e:
        jax.config.update("jax_cpu_collectives_implementation", previous)
        raise ValueError(
            f"{e} (run under SLURM / Cloud TPU, or set JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
        ) from None


def mesh_for_run(
    run: RunConfig, *, data: int | None = None, seq: int = 1
) -> Mesh | None:
    """The mesh `run` trains on, over all devices: the batch split `data` ways
    (None = every device's share once `seq` is taken) and each update
    segment `seq` ways (context parallelism, `seq > 1`). None for one
    device without context parallelism (nothing to split).

    Checked before anything is traced (`ValueError`, one line): the sizes
    against the devices, the batch against `data`, each device's part of an
    update segment against the context-parallel rule, each device's rows
    against `run.grad_accum`, and the model against
    context parallelism (`for_mesh` sets it)."""
    n = jax.device_count()
    data = n // seq if data is None and seq >= 1 else data
    mesh = make_mesh(data=data, seq=seq)
    if n == 1 and seq == 1:
        return None
    check_batch_splits(run.data.batch_size, mesh)
    check_grad_accum(run.grad_accum, run.data.batch_size, mesh)
    if seq > 1:
        m = run.model
        assert m.mem_len is not None  # resolved by TransformerConfig
        chunk, rest = divmod(run.update_len, seq)
        check_chunk_len(
            -1 if rest else chunk,  # -1: not whole, which the rule refuses
            block_len=m.block_len,
            mem_len=m.mem_len,
            what=f"each device's part of an update segment (update_len="
            f"{run.update_len} / seq={seq}, whole)",
        )
        m.replace(seq_axis="seq", batch_axis="data")  # the config's own rule
    return mesh
