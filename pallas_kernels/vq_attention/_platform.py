"""One pallas_call, three platforms: Triton params on GPU, Mosaic params on
TPU, interpret mode elsewhere (CPU), chosen when the program is lowered."""

from __future__ import annotations

import functools

import jax
from jax.core import ShapedArray
from jax.experimental import pallas as pl
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from . import partition

# Imported up front, not only inside `_compiler_params`: this module defines
# config flags that are part of jit's cache key, so a first import during the
# first trace would make the next call with the same shapes trace again.
try:
    from jax.experimental.pallas import tpu as _pltpu  # noqa: F401
except ImportError:  # pragma: no cover - jax without the Mosaic TPU backend
    pass


def _compiler_params(
    platform: str,
    vmem_limit_bytes: int | None,
    semantics: tuple[str, ...],
    num_warps: int,
    num_stages: int,
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
                dimension_semantics=semantics,  # pyright: ignore[reportArgumentType]
                vmem_limit_bytes=vmem_limit_bytes,
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
    vmem_limit_bytes: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool | None = None,
    debug: bool = False,
    target: str | None = None,
    sequential_last: bool = False,
    scratch_shapes=(),
):
    """`pl.pallas_call` whose platform settings are picked at lowering time.

    `interpret=None` (default): interpret mode exactly when lowering for a
    platform other than cuda/rocm/tpu (so on CPU, automatically). `True` forces
    interpret mode everywhere (debugging on a GPU); `False` never uses it.
    `target` ("gpu", "tpu", "cpu"): the platform is already known (the
    caller is one branch of a `platform_dependent`); None = decide here.
    `sequential_last`: the last grid axis accumulates (Mosaic "arbitrary";
    TPU and interpret mode only, which run the grid in order).
    """
    semantics = ("parallel",) * (len(grid) - 1) + (
        ("arbitrary",) if sequential_last else ("parallel",)
    )

    def call(platform, *args):
        if sequential_last and platform == "gpu" and interpret is not True:
            message = (
                f"{name}: a sequential grid axis (BlockSizes.dq_stream_v) runs "
                "on TPU and in interpret mode only; Triton programs run in "
                "parallel"
            )
            return jax.tree.map(
                lambda o: unavailable(o.shape, o.dtype, message, args), out_shape
            )
        kwargs = _compiler_params(
            platform, vmem_limit_bytes, semantics, num_warps, num_stages
        )
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
            scratch_shapes=scratch_shapes,
            name=name,
            debug=debug,
            **kwargs,
        )(*args)

    def run(*args):
        if target is not None:
            return call(target, *args)
        return jax.lax.platform_dependent(
            *args,
            cuda=functools.partial(call, "gpu"),
            rocm=functools.partial(call, "gpu"),
            tpu=functools.partial(call, "tpu"),
            default=functools.partial(call, "cpu"),
        )

    return run


# A variant that cannot be built for its platform (e.g. a block shorter than
# Triton's 16-row dots) must not stop the others: it is traced as this
# operand-free primitive, which has the output's shape and raises the
# variant's error only if that platform's program is actually lowered.
def _unavailable_abstract_eval(*, shape, dtype, message):
    del message
    return ShapedArray(shape, dtype)


def _unavailable_lowering(ctx, *, shape, dtype, message):
    del ctx, shape, dtype
    raise ValueError(message)


def _unavailable_jvp(primals, tangents, **params):
    del primals, tangents
    out = _unavailable_p.bind(**params)
    return out, ad.Zero(ShapedArray(params["shape"], params["dtype"]))


def _unavailable_batch(args, dims, *, shape, dtype, message):
    del args, dims  # no operands: nothing is batched
    return _unavailable_p.bind(shape=shape, dtype=dtype, message=message), None


_unavailable_p = Primitive("vq_attention_unavailable")
_unavailable_p.def_abstract_eval(_unavailable_abstract_eval)
mlir.register_lowering(_unavailable_p, _unavailable_lowering)
ad.primitive_jvps[_unavailable_p] = _unavailable_jvp
batching.primitive_batchers[_unavailable_p] = _unavailable_batch


def unavailable(shape, dtype, message: str, like=()):
    """An array of `shape` and `dtype` whose lowering raises
    `ValueError(message)` (see above); inside `shard_map` typed as varying
    like the arrays `like` (the branches of a switch must agree)."""
    x = _unavailable_p.bind(
        shape=tuple(shape), dtype=jax.numpy.dtype(dtype), message=message
    )
    return partition.varying_like(x, like)
