"""The whole pallas train step compiled by libtpu for a v5e:2x2 slice with a
data=2 x seq=2 mesh (context parallelism; benchmarks/aot_tpu_train.py), and
what crosses the seq axis in the optimized HLO.

The compile runs in a subprocess: libtpu must be on the path before jax
starts, and this process's jax started in conftest.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
SCRIPT = os.path.join(ROOT, "benchmarks", "aot_tpu_train.py")
TAG = "AOT_TPU_TRAIN_JSON "

# The smallest size that still runs the Mosaic kernels (TPU tiles: d_k, d_v,
# codes and block 128) with context parallelism: batch 2 over data=2 (b = 1
# row per data group), one update segment of 512 tokens over seq=2 (a chunk
# of 256 tokens = 2 blocks per device), one layer = two attention units.
# The script's "micro" preset, spelled out here so the bound below reads it.
SIZES = dict(
    d_model=128, d_k=128, d_v=128, n_head=1, n_code=128, n_layer=1,
    block_len=128, batch=2, seq_len=512, update_len=512, n_vocab=256,
)  # fmt: skip
DATA, SEQ = 2, 2
ACT_BYTES = 2  # bfloat16 activations


def seq_exchange_bound(z: dict) -> int:
    """Bytes per device and step that context parallelism may move over the
    seq axis alone (`ops.vq_attention_context_parallel`), from the shapes.

    Per attention unit and update segment (b = rows per data group, D = seq
    devices, M = mem_len = block_len, H heads, S codes, e activation bytes):
    - boundary block, forward ppermute to the next device: the last M keys'
      int32 codes, codewords (d_k) and values (d_v):  b M H (4 + e (d_k + d_v));
    - code summaries, forward all_gather of every device's: float32 cache
      factor [D, b], counts [D, b, H, S] and value sums [D, b, H, S, d_v]:
      4 D b (1 + H S (1 + d_v));
    - final state handed to all (psum): the window as the boundary block,
      its int32 length [b], float32 counts and means: boundary + 4 b +
      4 b H S (1 + d_v);
    - backward: the boundary block's cotangent (<= boundary) and the
      summaries' transpose (reduce-scatter, <= summaries); no gradient
      through the carried state (the train step stops it).
    Sum: 2 boundary + 2 summaries + state per unit, independent of T."""
    b = z["batch"] // DATA
    h, k, v, s, m = z["n_head"], z["d_k"], z["d_v"], z["n_code"], z["block_len"]
    boundary = b * m * h * (4 + ACT_BYTES * (k + v))
    summaries = 4 * SEQ * b * (1 + h * s * (1 + v))
    state = boundary + 4 * b + 4 * b * h * s * (1 + v)
    units = 2 * z["n_layer"] * (z["seq_len"] // z["update_len"])
    return units * (2 * boundary + 2 * summaries + state)


def _dims(shape: str) -> list[int]:
    inner = shape[shape.index("[") + 1 : -1]
    return [int(x) for x in inner.split(",") if x]


def _libtpu_importable() -> bool:
    """Whether the subprocess will find libtpu (`benchmarks._libtpu`'s side
    install, or an installed one), without importing it here."""
    from benchmarks._libtpu import LIBTPU_DIR

    side = importlib.machinery.PathFinder.find_spec(
        "libtpu", [os.path.abspath(LIBTPU_DIR)]
    )
    return side is not None or importlib.util.find_spec("libtpu") is not None


def _compile_train_step() -> dict:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("libtpu has wheels for Linux x86_64 only")
    if not _libtpu_importable():
        pytest.fail(
            "libtpu is not importable (neither from .venv/libtpu nor installed): "
            "the TPU compiler this test needs; run scripts/setup.sh"
        )
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in SIZES.items()]
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--preset", "micro", "--topology", "v5e",
         f"--data={DATA}", f"--seq={SEQ}", "--dtype", "bfloat16", "--json", *argv],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    lines = [x for x in proc.stdout.splitlines() if x.startswith(TAG)]
    assert proc.returncode == 0 and lines, (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    return json.loads(lines[-1][len(TAG) :])


@pytest.mark.slow
def test_train_step_compiles_for_v5e_with_context_parallelism():
    res = _compile_train_step()
    assert res["device_kind"] == "TPU v5 lite"
    assert res["mesh"] == {"data": DATA, "seq": SEQ}
    assert res["n_mosaic"] >= 5  # forward and the four backward kernels
    mem = res["memory"]
    assert mem["temp"] is not None and mem["argument"] > 0

    colls = res["collectives"]
    over_seq = [c for c in colls if "seq" in c["axes"]]
    seq_only = [c for c in over_seq if c["axes"] == ["seq"]]
    whole = [c for c in over_seq if "data" in c["axes"]]
    assert seq_only, "no collective crosses the seq axis: context parallelism off?"
    ops = {c["op"] for c in seq_only}
    assert {"collective-permute", "all-gather"} <= ops, ops  # boundary, summaries
    # One layer, one update segment: every collective runs once per step.
    assert all(c["runs"] == 1 for c in colls), colls

    # Context parallelism's own exchange: within the bound from the shapes.
    seq_bytes = sum(c["bytes"] for c in seq_only)
    bound = seq_exchange_bound(SIZES)
    assert 0 < seq_bytes <= bound, (seq_bytes, bound)

    # No activation of the sequence crosses seq: no array over the seq axis
    # alone has a token-length dimension (a device's chunk, the segment),
    # and every all-gather over seq is a code summary ([D, b, H, S(, d_v)]).
    chunk = SIZES["update_len"] // SEQ
    token_dims = {chunk, SIZES["update_len"], SIZES["seq_len"]}
    for c in seq_only:
        for shape in c["shapes"]:
            assert not token_dims & set(_dims(shape)), c
    summary = 4 * SEQ * (SIZES["batch"] // DATA) * SIZES["n_code"] * SIZES["d_v"]
    for c in seq_only:
        if c["op"] == "all-gather":
            assert c["bytes"] <= summary, c

    # Over the whole mesh (data and seq together): data parallelism's sums of
    # the replicated parameters' gradients (at most once each, float32 or
    # narrower), the EMA codebook statistics (parameter-shaped: the codebook
    # gets no gradient all-reduce of its own) and scalar metrics.
    param_bytes = 4 * res["n_params"]
    whole_bytes = sum(c["bytes"] for c in whole)
    assert whole_bytes <= param_bytes + 4096, (whole_bytes, param_bytes)
    assert seq_bytes + whole_bytes <= bound + param_bytes + 4096
