"""The kernel calls under data (batch) and head parallelism.

Every kernel is independent per (batch row, head): a program reads only its own
`bh` row of each `[BH, ...]` operand plus that head's codebook. So a sharded
call is the same kernels run on each device's local rows, with no
communication. Two contexts need telling:

- `jit` with sharded operands (automatic partitioning): a `pallas_call` is an
  opaque custom call to XLA's partitioner, which would gather every operand onto
  every device. `batch_head_call` wraps each kernel call in
  `jax.experimental.custom_partitioning`, declaring the batch and head
  dimensions as the only shardable ones (every other dimension needs
  replication) and lowering the local shard with the local batch and head
  counts. `custom_partitioning` does not differentiate, so it sits inside the
  `custom_vjp`'s forward and backward, around the kernel calls only.
- Inside `jax.shard_map` (manual axes) the operands are already local: the
  kernels run directly, and `typed_out_shape` gives each `pallas_call` output
  the varying-manual-axes type of its inputs, as `check_vma=True` requires.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

# ---------------------------------------------------------------------------
# Varying manual axes (shard_map with check_vma=True)


def _varying_axes(x) -> frozenset:
    """Mesh axes along which `x` varies inside `shard_map` (empty outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.12
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # jax 0.7 - 0.11


def varying_axes(*args) -> frozenset:
    """Union of the varying manual axes of the array leaves of `args`."""
    axes = frozenset()
    for leaf in jax.tree.leaves(args):
        axes |= _varying_axes(leaf)
    return axes


def _make_varying(x, axes: frozenset):
    """`x` typed as varying along `axes` (a no-op where it already does)."""
    missing = tuple(sorted(axes - _varying_axes(x)))
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)


def match_varying(*args):
    """`args` (None allowed) all typed as varying along the union of their
    varying axes. Inside `shard_map` a `pallas_call` gives every output one
    type, so its inputs must agree; done outside the `custom_vjp`, the transpose
    of this cast (a sum over the axes) gives an invariant input, such as a
    replicated codebook, its summed gradient."""
    axes = varying_axes(*args)
    if not axes:
        return args
    return tuple(None if a is None else _make_varying(a, axes) for a in args)


def typed_out_shape(out_shape, args):
    """`out_shape` (a pytree of `jax.ShapeDtypeStruct`) typed as varying along
    the manual axes its `pallas_call`'s inputs `args` vary along; outside
    `shard_map` that set is empty and the types are unchanged."""
    axes = varying_axes(*args)
    manual_axis_type = getattr(jax.sharding, "ManualAxisType", None)

    def stamp(s):
        if manual_axis_type is not None:  # jax >= 0.12
            kind = manual_axis_type(varying=axes)
            return jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=kind)
        if axes:  # jax 0.7 - 0.11
            return jax.ShapeDtypeStruct(s.shape, s.dtype, vma=axes)
        return s

    return jax.tree.map(stamp, out_shape)


def interpret_params(kwargs: dict, args) -> dict:
    """`pallas_call` keyword arguments with interpret mode that works inside
    `shard_map` with `check_vma=True`.

    jax's default (HLO) interpreter evaluates the kernel with operands typed as
    varying and its own constants typed as invariant, and fails the check (jax
    0.12: "Primitive mul requires varying manual axes to match" even for
    `2 * x`). The TPU-style interpreter keeps the kernel's values untyped, so it
    is used there; everywhere else the HLO interpreter stays (it is faster).
    """
    if kwargs.get("interpret") is not True or not varying_axes(*args):
        return kwargs
    try:
        from jax.experimental.pallas import tpu as pltpu
    except ImportError:  # pragma: no cover - jax without the TPU interpreter
        return kwargs
    return dict(kwargs, interpret=pltpu.InterpretParams())


def _in_manual_context() -> bool:
    """True inside `shard_map` (any manual mesh axis): operands are local."""
    get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    if get_mesh is None:
        return False
    mesh = get_mesh()
    manual = getattr(mesh, "manual_axes", ())
    return bool(manual)


# ---------------------------------------------------------------------------
# Automatic partitioning (jit with sharded operands)

_BATCH, _HEAD = "bh", "head"


def _spec_axes(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _spec_entry(axes: tuple):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def batch_head_call(fn, st, args, *, head_args=()):
    """`fn(st, *args)`, partitioned over batch and heads under `jit`.

    **Arguments:**

    - `fn(st, *args)`: one kernel call; every output is a `[BH, ...]` array
      (or None) and row `bh` of each output depends only on row `bh` of the
      `[BH, ...]` inputs and on head `bh % st.num_heads` of the `head_args`.
    - `st`: the call's `Static`; the local shard runs with
      `num_heads` = the local head count.
    - `args`: the operands; None entries pass through. Entries whose index is in
      `head_args` are `[H, ...]` (the codebook); the rest are `[BH, ...]`.

    Inside `shard_map` (operands already local) this is `fn(st, *args)`.
    """
    if _in_manual_context():
        return fn(st, *args)
    n_head = st.num_heads
    kinds = tuple(
        None if a is None else (_HEAD if i in head_args else _BATCH)
        for i, a in enumerate(args)
    )
    bh = next(a.shape[0] for a, k in zip(args, kinds, strict=True) if k == _BATCH)
    n_batch = bh // n_head
    present = [i for i, k in enumerate(kinds) if k is not None]

    def split(a, kind):
        # [B*H, ...] -> [B, H, ...]: batch and heads become separate dimensions,
        # so each can carry its own mesh axes.
        if kind == _HEAD:
            return a
        return a.reshape(n_batch, n_head, *a.shape[1:])

    def run_local(st_local, local_args):
        """The kernels on (local) 4-D operands; outputs flattened, [b, h, ...]."""
        full = [None] * len(args)
        b = h = None
        for i, a in zip(present, local_args, strict=True):
            if kinds[i] == _BATCH:
                b, h = a.shape[:2]
                full[i] = a.reshape(b * h, *a.shape[2:])
            else:
                full[i] = a
        st_local = dataclasses.replace(st_local, num_heads=h)
        leaves, tree = jax.tree.flatten(fn(st_local, *full))
        for leaf in leaves:
            if leaf.shape[0] != b * h:
                raise ValueError(
                    f"batch_head_call: output {tuple(leaf.shape)} of {fn.__name__} "
                    f"does not lead with batch*heads={b * h}"
                )
        return tree, tuple(x.reshape(b, h, *x.shape[1:]) for x in leaves)

    def partition(mesh, arg_shapes, result_shape):
        shapes = dict(zip(present, arg_shapes, strict=True))
        ref = shapes[next(i for i in present if kinds[i] == _BATCH)]
        sharding = ref.sharding
        if not isinstance(sharding, NamedSharding):
            raise NotImplementedError(
                f"batch_head_call: operand sharding {sharding} has no named mesh"
            )
        mesh = sharding.mesh
        spec = (*sharding.spec, None, None)
        b_axes, h_axes = _spec_axes(spec[0]), _spec_axes(spec[1])
        # An uneven split (not possible from a [B*H] dimension split evenly,
        # but cheap to guard) runs replicated rather than padded.
        if n_batch % math.prod(mesh.shape[x] for x in b_axes):
            b_axes = ()
        if n_head % math.prod(mesh.shape[x] for x in h_axes):
            h_axes = ()
        bh_lead = (_spec_entry(b_axes), _spec_entry(h_axes))

        def named(rank, head):
            return NamedSharding(
                mesh, PartitionSpec(*head, *((None,) * (rank - len(head))))
            )

        arg_shardings = tuple(
            named(len(shapes[i].shape), bh_lead if kinds[i] == _BATCH else bh_lead[1:])
            for i in present
        )
        results = jax.tree.leaves(result_shape)
        result_shardings = tuple(named(len(r.shape), bh_lead) for r in results)

        def lower_fn(*local_args):
            return run_local(st, local_args)[1]

        return mesh, lower_fn, result_shardings, arg_shardings

    # Shardy rule: "b h" shared by every [B, H, ...] operand and result, "h" by
    # the head operands; every other dimension its own factor that must stay
    # replicated (the kernels need whole sequences, codebooks and features).
    # Built at lowering time, once tracing has told the result ranks.
    dyn = [split(args[i], kinds[i]) for i in present]
    lead = [("b", "h") if kinds[i] == _BATCH else ("h",) for i in present]
    traced = {}  # the output tree and ranks, filled while tracing `whole`

    def whole(*local_args):
        tree, outs = run_local(st, local_args)
        traced.update(tree=tree, ranks=[o.ndim for o in outs])
        return outs

    def sharding_rule(mesh, value_types, result_types):
        del mesh, value_types, result_types
        names = iter(f"r{n}" for n in range(10_000))
        free = []

        def factors(rank, head):
            rest = [next(names) for _ in range(rank - len(head))]
            free.extend(rest)
            return " ".join((*head, *rest))

        operands = [factors(a.ndim, h) for a, h in zip(dyn, lead, strict=True)]
        results = [factors(r, ("b", "h")) for r in traced["ranks"]]
        rule = ", ".join(operands) + " -> " + ", ".join(results)
        return rule, dict(need_replication_factors=tuple(free))

    wrapped = custom_partitioning(whole)
    wrapped.def_partition(partition=partition, sharding_rule=sharding_rule)
    outs = wrapped(*dyn)
    merged = [o.reshape(o.shape[0] * o.shape[1], *o.shape[2:]) for o in outs]
    return jax.tree.unflatten(traced["tree"], merged)
