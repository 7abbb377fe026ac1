"""One pallas_call, three platforms: Triton params on GPU, Mosaic params on
TPU, interpret mode elsewhere (CPU), chosen when the program is lowered."""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl

from . import partition
from .config import BlockSizes

# Imported up front, not only inside `_compiler_params`: this module defines
# config flags that are part of jit's cache key, so a first import during the
# first trace would make the next call with the same shapes trace again.
try:
    from jax.experimental.pallas import tpu as _pltpu  # noqa: F401
except ImportError:  # pragma: no cover - jax without the Mosaic TPU backend
    pass


def _compiler_params(
    platform: str, sizes: BlockSizes, n_grid: int, num_warps: int, num_stages: int
):
    if platform == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return dict(
            compiler_params=pltriton.CompilerParams(
                num_warps=num_warps, num_stages=num_stages
            )
        )
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return dict(
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel",) * n_grid,
                vmem_limit_bytes=sizes.vmem_limit_bytes,
            )
        )
    return dict(interpret=True)


def pallas_call(
    kernel,
    *,
    name: str,
    grid,
    in_specs,
    out_specs,
    out_shape,
    sizes: BlockSizes,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool | None = None,
    debug: bool = False,
):
    """`pl.pallas_call` whose platform settings are picked at lowering time.

    `interpret=None` (default): interpret mode exactly when lowering for a
    platform other than cuda/rocm/tpu (so on CPU, automatically). `True` forces
    interpret mode everywhere (debugging on a GPU); `False` never uses it.
    """

    def call(platform, *args):
        kwargs = _compiler_params(platform, sizes, len(grid), num_warps, num_stages)
        if interpret is not None:
            kwargs.pop("interpret", None)
            if interpret:
                kwargs = dict(interpret=True)
        # Inside shard_map: interpret mode that passes the varying-axes check,
        # and outputs that vary along the manual axes the inputs do.
        kwargs = partition.interpret_params(kwargs, args)
        return pl.pallas_call(
            kernel,
            out_shape=partition.typed_out_shape(out_shape, args),
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            name=name,
            debug=debug,
            **kwargs,
        )(*args)

    def run(*args):
        return jax.lax.platform_dependent(
            *args,
            cuda=functools.partial(call, "gpu"),
            rocm=functools.partial(call, "gpu"),
            tpu=functools.partial(call, "tpu"),
            default=functools.partial(call, "cpu"),
        )

    return run
