"""The kernel calls under data (batch) and head parallelism.

Every kernel is independent per (batch row, head): a program reads only its own
row of each `[B*H, ...]` operand plus that head's codebook. So a sharded call
is the same kernels run on each device's local rows, with no communication.
Three contexts need telling (docs/kernels.md, "Sharding"):

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
- Under `vmap`, which `custom_partitioning` cannot batch, a `custom_vmap` folds
  the mapped axis into the batch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
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
    # jax 0.7 only (pcast replaced it); absent from the newer jax pyright reads.
    return jax.lax.pvary(x, missing)  # pyright: ignore[reportAttributeAccessIssue]


def varying_like(x, *args):
    """`x` typed as varying along every manual axis `args` vary along."""
    return _make_varying(x, varying_axes(*args))


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
        if axes:  # jax 0.7 - 0.11: `vma`, absent from the newer jax pyright reads
            return jax.ShapeDtypeStruct(s.shape, s.dtype, vma=axes)  # pyright: ignore[reportCallIssue]
        return s

    return jax.tree.map(stamp, out_shape)


def interpret_params(kwargs: dict, args) -> dict:
    """`pallas_call` keyword arguments whose interpret mode works inside
    `shard_map` (with `check_vma=True`) on CPU devices.

    jax's default (HLO) interpreter evaluates the kernel with the operands
    typed as varying and its own constants as invariant, and fails the check
    (jax 0.12: "Primitive mul requires varying manual axes to match", even for
    `2 * x`). The TPU-style interpreter keeps kernel values untyped, so it runs
    there. It is chosen only for a CPU mesh: it carries ordered IO effects,
    which would spread to the `platform_dependent` around the call and break a
    GPU/TPU lowering of the same program. Everywhere else the HLO interpreter
    stays (it is faster, and has no effects).
    """
    if kwargs.get("interpret") is not True or not varying_axes(*args):
        return kwargs
    if _mesh_platform() in ("cuda", "rocm", "gpu", "tpu"):
        return kwargs
    try:
        from jax.experimental.pallas import tpu as pltpu
    except ImportError:  # pragma: no cover - jax without the TPU interpreter
        return kwargs
    return dict(kwargs, interpret=pltpu.InterpretParams())


def _mesh_platform() -> str:
    """Platform of the devices of the enclosing `shard_map`'s mesh."""
    get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    device = getattr(get_mesh(), "abstract_device", None) if get_mesh else None
    return getattr(device, "platform", None) or jax.default_backend()


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


def _spec_axes(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _spec_entry(axes: tuple):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def batch_head_call(fn, st, args, *, head_args=()):
    """`fn(st, *merged args)` on operands with batch and heads as separate
    leading dimensions, partitioned over both under `jit`.

    **Arguments:**

    - `fn(st, *args)`: one kernel call on the kernels' `[B*H, ...]` layout;
      every output is a `[B*H, ...]` array (or None), row `bh` depending only
      on row `bh` of the inputs and on head `bh % st.num_heads` of the
      `head_args`.
    - `st`: the call's `Static`; each shard runs with `num_heads` = its local
      head count.
    - `args`: `[B, H, ...]` operands, None entries passed through, except
      those whose index is in `head_args`: `[H, ...]` (the codebook).

    **Returns:** `fn`'s outputs as `[B, H, ...]`.

    Batch and heads stay separate dimensions up to here so that each can carry
    its own mesh axes: merging `[B, H]` into one dimension is a reshard
    (all-gather) as soon as both are split. They are merged only inside a
    shard, on local arrays.
    """
    call = _BatchHeadCall(fn, st, args, tuple(head_args))
    dyn = [args[i] for i in call.present]
    if _in_manual_context():  # shard_map: operands are already local
        tree, outs = call.run_local(dyn)
        return jax.tree.unflatten(tree, outs)
    wrapped = custom_partitioning(call.whole)
    wrapped.def_partition(partition=call.partition, sharding_rule=call.sharding_rule)
    # custom_partitioning has no batching rule; under vmap the mapped axis
    # folds into the batch dimension (the kernels are independent per row).
    batched = jax.custom_batching.custom_vmap(lambda *xs: tuple(wrapped(*xs)))
    batched.def_vmap(call.vmap_rule)
    outs = batched(*dyn)
    return jax.tree.unflatten(call.traced["tree"], outs)


class _BatchHeadCall:
    """One `batch_head_call`: the kernel call on local operands, and the
    partitioning, Shardy and vmap rules around it. `present`: the indices of
    the arguments given (not None); `batch_args`: those of them that are
    `[B, H, ...]` (the rest are per head)."""

    def __init__(self, fn, st, args, head_args: tuple):
        self.fn, self.st, self.args, self.head_args = fn, st, args, head_args
        self.present = [i for i, a in enumerate(args) if a is not None]
        self.batch_args = [i for i in self.present if i not in head_args]
        self.traced: dict = {}  # the output tree and ranks, filled by `whole`

    def run_local(self, local_args):
        """`fn` on (local) [b, h, ...] operands; outputs flattened, [b, h, ...]."""
        present, head_args = self.present, self.head_args
        full: list[jax.Array | None] = [None] * len(self.args)
        b, h = local_args[present.index(self.batch_args[0])].shape[:2]
        for i, a in zip(present, local_args, strict=True):
            full[i] = a if i in head_args else a.reshape(b * h, *a.shape[2:])
        st_local = dataclasses.replace(self.st, num_heads=h)
        leaves, tree = jax.tree.flatten(self.fn(st_local, *full))
        for leaf in leaves:
            if leaf.shape[0] != b * h:
                raise ValueError(
                    f"batch_head_call: output {tuple(leaf.shape)} of "
                    f"{getattr(self.fn, '__name__', self.fn)} does not lead with "
                    f"batch*heads={b * h}"
                )
        return tree, tuple(x.reshape(b, h, *x.shape[1:]) for x in leaves)

    def whole(self, *all_args):
        """The call as `custom_partitioning` traces it (unpartitioned)."""
        tree, outs = self.run_local(all_args)
        self.traced.update(tree=tree, ranks=[o.ndim for o in outs])
        return outs

    def partition(self, mesh, arg_shapes, result_shape):
        """Split over the batch and head axes of the first batch operand's
        sharding; every other dimension replicated."""
        present, head_args = self.present, self.head_args
        n_batch, n_head = self.args[self.batch_args[0]].shape[:2]
        shapes = dict(zip(present, arg_shapes, strict=True))
        sharding = shapes[self.batch_args[0]].sharding
        if isinstance(sharding, NamedSharding):
            mesh = sharding.mesh
            spec = (*sharding.spec, None, None)
            b_axes, h_axes = _spec_axes(spec[0]), _spec_axes(spec[1])
        else:
            # No named axes to read (a positional/GSPMD sharding): run
            # replicated on the partitioner's mesh -- correct, only gathered.
            b_axes = h_axes = ()
        # An uneven split runs replicated on that dimension rather than padded.
        if n_batch % math.prod(mesh.shape[x] for x in b_axes):
            b_axes = ()
        if n_head % math.prod(mesh.shape[x] for x in h_axes):
            h_axes = ()
        lead = (_spec_entry(b_axes), _spec_entry(h_axes))

        def named(rank, head):
            rest = (None,) * (rank - len(head))
            return NamedSharding(mesh, PartitionSpec(*head, *rest))

        arg_shardings = tuple(
            named(len(shapes[i].shape), lead[1:] if i in head_args else lead)
            for i in present
        )
        results = jax.tree.leaves(result_shape)
        result_shardings = tuple(named(len(r.shape), lead) for r in results)

        def lower_fn(*local_args):
            return self.run_local(local_args)[1]

        return mesh, lower_fn, result_shardings, arg_shardings

    def sharding_rule(self, mesh, value_types, result_types):
        """Shardy rule: "b h" shared by every [B, H, ...] operand and result,
        "h" by the head operands; every other dimension is its own factor that
        must stay replicated (the kernels need whole sequences, codebooks and
        features). Built at lowering time, once tracing told the result ranks."""
        del mesh, value_types, result_types
        names = iter(f"r{n}" for n in range(10_000))
        free = []

        def factors(rank, head):
            rest = [next(names) for _ in range(rank - len(head))]
            free.extend(rest)
            return " ".join((*head, *rest))

        operands = [
            factors(self.args[i].ndim, ("h",) if i in self.head_args else ("b", "h"))
            for i in self.present
        ]
        results = [factors(r, ("b", "h")) for r in self.traced["ranks"]]
        rule = ", ".join(operands) + " -> " + ", ".join(results)
        return rule, dict(need_replication_factors=tuple(free))

    def vmap_rule(self, axis_size, in_batched, *xs):
        """The mapped axis folded into the batch (or, for a codebook per
        example, the plain kernels under vmap)."""
        present, head_args = self.present, self.head_args
        if any(b for i, b in zip(present, in_batched, strict=True) if i in head_args):
            # A codebook per example cannot fold into the batch: the plain
            # kernels under vmap (pallas_call batches over a new grid axis).
            axes = [0 if b else None for b in in_batched]
            outs = jax.vmap(lambda *ys: self.run_local(ys)[1], in_axes=axes)(*xs)
            return outs, (True,) * len(outs)
        full: list[jax.Array | None] = [None] * len(self.args)
        for i, x, b in zip(present, xs, in_batched, strict=True):
            if i not in head_args:
                x = x if b else jnp.broadcast_to(x, (axis_size, *x.shape))
                x = x.reshape(axis_size * x.shape[1], *x.shape[2:])
            full[i] = x
        leaves = jax.tree.leaves(
            batch_head_call(self.fn, self.st, full, head_args=head_args)
        )
        outs = tuple(o.reshape(axis_size, -1, *o.shape[1:]) for o in leaves)
        return outs, (True,) * len(outs)
