"""libtpu on a CPU machine: the TPU compiler without a TPU, for the
ahead-of-time TPU gate (benchmarks/aot_tpu.py) and its tests.

`scripts/setup.sh` installs the pinned `libtpu` (pyproject's `aot-tpu` extra)
into `.venv/libtpu`, outside the venv's site-packages: a libtpu there would
make every jax process on this machine (the demo, the tests) try to open a
TPU at start-up and print libtpu's warnings. A process that wants the TPU
compiler calls `use_libtpu()` before jax picks its backends.
"""

from __future__ import annotations

import os
import sys

LIBTPU_DIR = os.path.join(os.path.dirname(__file__), "..", ".venv", "libtpu")

# Short names of the generations the gate targets -> libtpu topology names
# (4 chips each; the first device is the one a single-chip program uses).
TOPOLOGIES = {
    "v4": "v4:2x2x1",
    "v5e": "v5e:2x2",
    "v5p": "v5p:2x2x1",
    "v6e": "v6e:2x2",
}


def use_libtpu() -> bool:
    """Make `import libtpu` find the side install (if present) and keep jax
    on the CPU backend (the topology API compiles for TPU without one).
    Returns whether libtpu is importable. Call before jax initialises."""
    path = os.path.abspath(LIBTPU_DIR)
    if os.path.isdir(path) and path not in sys.path:
        sys.path.insert(0, path)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # libtpu looks for a TPU VM's metadata on start-up; say there is none.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Compiling only: several processes (the gate's, the tests') may load it
    # at once; without this the second fails on libtpu's lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


MISSING = (
    "libtpu is not importable: run scripts/setup.sh (it installs the pinned "
    "libtpu into .venv/libtpu)"
)


def require_libtpu() -> bool:
    """`use_libtpu()`, saying on stderr what to do when libtpu is missing."""
    if use_libtpu():
        return True
    print(MISSING, file=sys.stderr)
    return False


def topology_devices(generation: str):
    """The TPU devices of `generation`'s topology (no hardware)."""
    from jax.experimental import topologies

    name = TOPOLOGIES.get(generation, generation)
    return topologies.get_topology_desc(name, platform="tpu").devices


def abstract_mesh_for(device):
    """The mesh context Pallas's TPU lowering reads the chip from."""
    from jax.sharding import AbstractDevice, AbstractMesh

    kind = AbstractDevice(device.device_kind, 1, "tpu")
    return AbstractMesh((), (), abstract_device=kind)
