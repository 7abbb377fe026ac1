"""Model FLOPs of a training step, counted from the config, and the peak
FLOP/s of the device they run on: what model FLOPs utilisation (MFU) is
made of. docs/training.md ("Throughput and MFU") writes the count out."""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .._config import TransformerConfig

# A term's forward FLOPs times this is its training FLOPs: a matmul whose two
# operands both take a gradient costs two more matmuls of its size in the
# backward pass (3x), one with a single differentiable operand one more (2x),
# one with none (the quantizer's distances, the codebook statistics) none.
_BOTH, _ONE, _NONE = 3, 2, 1


def model_flops_terms(
    config: TransformerConfig,
    batch_size: int,
    seq_len: int,
    *,
    update_len: int | None = None,
    backward: bool = True,
) -> dict[str, float]:
    """The matmul FLOPs of one training step of `config` on `batch_size` rows
    of `seq_len` tokens, split into `update_len`-token update segments
    (default: one segment), per term (summed over layers and units):
    `{term: FLOPs}`. `backward=False`: the forward pass alone.

    A matmul of `[m, k] x [k, n]` counts `2 m k n`; the backward pass adds
    two such matmuls per term whose operands both take a gradient (the
    usual forward + backward = 3x forward), one where only one does (scores
    against the gradient-free codebook, the one-hot cache sums) and none for
    the gradient-free ones (the quantizer's nearest-code distances, the
    codebook's statistics). What is computed densely counts in full: the
    within-block part of the window is `block_len` keys per query, causal
    mask or not. Elementwise work (norms, softmax, SiLU, the optimizer)
    is not counted; rematerialisation (`remat`) recomputes the forward pass
    but does not change the model FLOPs.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    update_len = seq_len if update_len is None else update_len
    if (
        isinstance(update_len, bool)
        or not isinstance(update_len, int)
        or update_len < 1
        or seq_len % update_len
    ):
        raise ValueError(
            f"update_len must be a positive int dividing seq_len={seq_len}; "
            f"got {update_len!r}"
        )
    c = config
    assert c.mem_len is not None  # TransformerConfig fills the default
    tokens = batch_size * seq_len
    segments = seq_len // update_len
    d, h, dk, dv, s = c.d_model, c.n_head, c.d_k, c.d_v, c.n_code
    m, blk = c.mem_len, c.block_len
    units = 2 * c.n_layer

    def mult(both: int) -> int:
        return both if backward else 1

    # Per token and unit: (forward FLOPs, backward multiplier).
    per_token: dict[str, tuple[float, int]] = {
        "projections": (2 * d * (h * dk + h * (dk + 2 * dv) + h * dv), _BOTH),
        # The quantizer's nearest code (no gradient) and its per-code key
        # sums for the EMA codebook (no gradient).
        "quantizer": (2 * h * s * dk * 2, _NONE),
        # (q + v) . r_d for the distances 0..mem_len (Transformer-XL bias).
        "relative_position": (2 * h * dk * (m + 1), _BOTH),
    }
    if c.attention == "full":
        keys = c.kv_cache_len + update_len
        per_token["window"] = (2 * h * keys * (dk + dv), _BOTH)
    else:
        # Each block's queries against its window: the mem_len keys before
        # it and its own block_len keys (scores, then values).
        per_token["window"] = (2 * h * (m + blk) * (dk + dv), _BOTH)
        # The cache's one-hot value sums (the values take a gradient when
        # it flows through the cache), kept up to date in every mode.
        cache_read = c.attention == "vq"
        grad_sums = cache_read and c.grad_thru_cache
        per_token["cache_sums"] = (2 * h * s * dv, _ONE if grad_sums else _NONE)
        if cache_read:
            # Scores against the codebook (no gradient into it), then the
            # cached means (differentiable with grad_thru_cache).
            per_token["cache_scores"] = (2 * h * s * dk, _ONE)
            per_token["cache_values"] = (
                2 * h * s * dv,
                _BOTH if c.grad_thru_cache else _ONE,
            )
    out = {
        name: float(units * tokens * fwd * mult(k))
        for name, (fwd, k) in per_token.items()
    }
    # The projected sinusoid table [mem_len + 1, d_model] x [d_model, H d_k],
    # once per update segment and unit (gradient into w_r only).
    out["relative_table"] = float(
        units * segments * 2 * (m + 1) * d * h * dk * mult(_ONE)
    )
    out["lm_head"] = float(tokens * 2 * d * c.n_vocab * mult(_BOTH))
    return out


def model_flops(
    config: TransformerConfig,
    batch_size: int,
    seq_len: int,
    *,
    update_len: int | None = None,
    backward: bool = True,
) -> float:
    """Model FLOPs of one training step (forward + backward) of `config` on
    `batch_size x seq_len` tokens in `update_len` segments: the sum of
    `model_flops_terms`. `backward=False`: the forward pass alone."""
    terms = model_flops_terms(
        config, batch_size, seq_len, update_len=update_len, backward=backward
    )
    return sum(terms.values())


# Dense peak FLOP/s per device (one jax device: a GPU, a TPU v4/v5p/v6
# chip, a TPU v2/v3 core), from the vendors' data sheets, without sparsity:
# (device_kind pattern, bfloat16 rate, float32 rate). The float32 rate is
# what a float32 matmul runs at under JAX's default precision: TF32 tensor
# cores on NVIDIA Ampere and later, one bfloat16 pass on TPU (hence the
# same number). Patterns are matched, in order, against the lower-cased
# `device.device_kind`.
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("h100 pcie", 756e12, 378e12),
    ("h100 nvl", 835e12, 418e12),
    ("h100", 989e12, 494e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200", 989e12, 494e12),
    ("gh200", 989e12, 494e12),
    ("a100", 312e12, 156e12),
    ("l40s", 362e12, 183e12),
    ("l4", 121e12, 60e12),
    ("a10", 125e12, 62.5e12),
    ("tpu v6", 918e12, 918e12),  # v6e (Trillium)
    ("tpu v5 lite", 197e12, 197e12),  # v5e
    ("tpu v5e", 197e12, 197e12),
    ("tpu v5", 459e12, 459e12),  # v5p
    ("tpu v4", 275e12, 275e12),
    ("tpu v3", 61.5e12, 61.5e12),  # per core (2 per chip)
    ("tpu v2", 22.5e12, 22.5e12),  # per core
)

PEAK_FLOPS_ENV = "TVQ_PEAK_FLOPS"


def table_peak_flops(device_kind: str, dtype: Any) -> float | None:
    """The `PEAK_FLOPS` rate of `device_kind` for activations of `dtype`
    (bfloat16 / float16: the bfloat16 column; otherwise float32); None for
    a kind not in the table."""
    low = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    kind = device_kind.lower()
    for pattern, bf16, f32 in PEAK_FLOPS:
        if re.search(rf"\b{re.escape(pattern)}", kind):
            return bf16 if low else f32
    return None


@functools.cache
def measure_matmul_flops(
    dtype: str = "float32", n: int = 1024, repeats: int = 5
) -> float:
    """FLOP/s of an `n x n` matmul in `dtype` on the default device, the best
    of `repeats` timed runs after a compiling one. On a CPU this stands in
    for the peak: what its BLAS reaches on the cores it has now (a loaded
    machine measures less), not the data-sheet number. Memoised."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / max(best, 1e-9)


def device_peak_flops(
    dtype: Any = "float32",
    devices: Sequence[Any] | None = None,
    *,
    per_device: float | None = None,
) -> tuple[float | None, str]:
    """The peak FLOP/s of `devices` together (default: all of them) for
    activations of `dtype`, and where the number comes from:

    - `per_device` (FLOP/s per device; per process on a CPU), if given;
    - `$TVQ_PEAK_FLOPS` (the same), if set;
    - the `PEAK_FLOPS` table for a GPU or TPU kind it lists;
    - on a CPU, `measure_matmul_flops` (a float32 / bfloat16 matmul timed
      now) per process: the CPU devices of a process share its cores;
    - otherwise None ("unknown": MFU is then not reported).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("device_peak_flops: no devices")
    kind = devices[0].device_kind
    cpu = devices[0].platform == "cpu"
    count = len({d.process_index for d in devices}) if cpu else len(devices)
    if per_device is not None:
        if isinstance(per_device, bool) or not (
            isinstance(per_device, (int, float)) and per_device > 0
        ):
            raise ValueError(
                f"per_device must be a positive number of FLOP/s; got {per_device!r}"
            )
        return float(per_device) * count, "given"
    env = os.environ.get(PEAK_FLOPS_ENV, "").strip()
    if env:
        try:
            value = float(env)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ValueError(
                f"${PEAK_FLOPS_ENV} must be a positive number of FLOP/s; got {env!r}"
            )
        return value * count, f"${PEAK_FLOPS_ENV}"
    peak = table_peak_flops(kind, dtype)
    if peak is not None:
        return peak * count, f"data sheet, {kind}"
    if cpu:
        name = jnp.dtype(dtype).name
        return (
            measure_matmul_flops(name) * count,
            f"measured {name} 1024x1024 matmul on the CPU",
        )
    return None, f"unknown device kind {kind!r} (set ${PEAK_FLOPS_ENV})"
