"""Train-step and sampling throughput of a run configuration on random
tokens (`tvq-eqx bench`; the benchmarks' scripts time finer parts)."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ._flops import device_peak_flops, model_flops
from ._optimizer import optimizer_from_config
from ._run_config import RunConfig
from ._steps import make_train_step, shard_train_state
from .runs import new_train_state


def random_batch(run: RunConfig, *, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch of uniform random tokens shaped as `run`'s; `doc_starts`
    marks a document every `block_len` tokens (for `doc_masking`)."""
    b, t = run.data.batch_size, run.data.seq_len
    tokens = np.random.default_rng(seed).integers(
        0, run.model.n_vocab, (b, t + 1), dtype=np.int32
    )
    return dict(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        loss_mask=np.ones((b, t), np.float32),
        doc_starts=np.arange(t)[None, :].repeat(b, 0) % run.model.block_len == 0,
    )


def measure_throughput(
    run: RunConfig, *, steps: int, sample_tokens: int = 0, mesh: Mesh | None = None
) -> dict[str, Any]:
    """Seconds per train step of `run` (the first call, which compiles, timed
    apart as `compile_s`; then the mean of `steps` calls), tokens per second,
    model FLOPs per second (`model_flops`) and their fraction `mfu` of
    `peak_flops` (`device_peak_flops`, with `peak_source`; None when
    unknown), and with `sample_tokens > 0` milliseconds per sampled token
    (after one compiling sample of the same length)."""
    from ..sampling import sample

    if steps < 1 or sample_tokens < 0:
        raise ValueError(
            f"steps must be >= 1 and sample_tokens >= 0; got {steps}, {sample_tokens}"
        )
    train_state = new_train_state(run)
    if mesh is not None:
        train_state = shard_train_state(train_state, mesh)
    batch = random_batch(run)
    step = make_train_step(
        optimizer_from_config(run.optimizer, run.steps),
        update_len=run.update_len,
        mesh=mesh,
        doc_masking=run.doc_masking,
        grad_accum=run.grad_accum,
    )
    t0 = time.perf_counter()
    train_state, metrics = step(train_state, batch, reset=True)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        train_state, metrics = step(train_state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
    b, t = run.data.batch_size, run.data.seq_len
    flops_per_s = model_flops(run.model, b, t, update_len=run.update_len) / step_s
    peak, source = device_peak_flops(
        run.model.dtype, None if mesh is None else list(mesh.devices.flat)
    )
    out: dict[str, Any] = dict(
        device=jax.devices()[0].platform,
        devices=jax.device_count(),
        compile_s=compile_s,
        step_s=step_s,
        train_tokens_per_s=b * t / step_s,
        model_flops_per_s=flops_per_s,
        peak_flops=peak,
        peak_source=source,
        mfu=None if peak is None else flops_per_s / peak,
    )
    if sample_tokens > 0:
        prompt = batch["inputs"][:1, :1]
        timings = []
        for seed in (0, 1):  # the first compiles
            t0 = time.perf_counter()
            jax.block_until_ready(
                sample(train_state.model, prompt, steps=sample_tokens,
                       key=jax.random.key(seed))
            )  # fmt: skip
            timings.append(time.perf_counter() - t0)
        out["sample_ms_per_token"] = 1e3 * timings[1] / sample_tokens
    return out
