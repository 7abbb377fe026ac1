"""The optimizer: the official Transformer-VQ recipe, with the codebook routed
to its exact EMA update and nowhere else.

The codebook (`VectorQuantizer.codebook_sum` / `codebook_count`) is not
trained by gradient descent: `loss_fn` gives it the "gradient"
`theta - EMA_target`, and exactly one SGD step with learning rate 1 on it is
the EMA update. Any other transformation of that step (Adam, clipping,
weight decay, a schedule) silently breaks the codebook, so:

- `make_optimizer` (the official recipe) and `with_ema_codebook(opt)` (any
  optax optimizer of yours for the other arrays) route the codebook to that
  step and everything else to the optimizer;
- `split_codebook` splits a tree into the trainable arrays and the codebook,
  for loops that apply the two themselves;
- the wrong compositions are loud: `guard_no_codebook` raises if a codebook
  array reaches the optimizer it starts, and the optimizers above refuse to
  be put inside `optax.chain` (a transformation before them, e.g.
  `clip_by_global_norm`, would rescale the EMA step).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, NamedTuple, cast, get_args

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array

from .._config import check_literals
from ..nn import LayerStack, VectorQuantizer, XLRelativeBias

OptimizerName = Literal["adamw", "lion", "adafactor"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)

MAIN = "main"
CODEBOOK = "codebook"


class CodebookRoutingError(ValueError):
    """Codebook arrays reached the main optimizer (or vice versa)."""


def _is_quantizer(x) -> bool:
    return isinstance(x, VectorQuantizer)


def _is_masked(x) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def param_labels(params: Any) -> Any:
    """`"codebook"` for every `VectorQuantizer` leaf (`codebook_sum`,
    `codebook_count`, `ema_tally`) of `params`, `"main"` for every other leaf.

    Works on any PyTree that contains the model's `VectorQuantizer`s (a
    `Transformer`, its `eqx.filter(model, eqx.is_array)` parameters, gradients).
    """

    def label(node):
        if _is_quantizer(node):
            return jax.tree.map(lambda _: CODEBOOK, node)
        return MAIN

    return jax.tree.map(label, params, is_leaf=_is_quantizer)


def _quantizer_leaves(tree: Any) -> list:
    """The codebook leaves (possibly masked) of every VectorQuantizer in `tree`."""
    quantizers = [
        q for q in jax.tree.leaves(tree, is_leaf=_is_quantizer) if _is_quantizer(q)
    ]
    return [
        x for q in quantizers for x in (q.codebook_sum, q.codebook_count, q.ema_tally)
    ]


def split_codebook(tree: Any) -> tuple[Any, Any]:
    """`(trainable, codebook)`: `tree` with its codebook arrays set to None,
    and `tree` with everything else set to None (`eqx.combine` joins them).

    `tree` is a `Transformer`, its parameters
    (`eqx.filter(model, eqx.is_inexact_array)`), gradients or updates. Use it
    to give a plain optax optimizer only the trainable arrays, and apply the
    codebook's gradient as the EMA step itself (`theta - grad`):

        trainable, _ = split_codebook(eqx.filter(model, eqx.is_inexact_array))
        g_trainable, g_codebook = split_codebook(grads)
        updates, opt_state = optimizer.update(g_trainable, opt_state, trainable)
        model = eqx.apply_updates(model, updates)
        model = eqx.apply_updates(model, jax.tree.map(jnp.negative, g_codebook))

    `with_ema_codebook(optimizer)` does exactly this as one optax optimizer.
    """
    labels = param_labels(tree)
    is_none = lambda x: x is None
    trainable = jax.tree.map(
        lambda x, lab: x if lab == MAIN else None, tree, labels, is_leaf=is_none
    )
    codebook = jax.tree.map(
        lambda x, lab: x if lab == CODEBOOK else None, tree, labels, is_leaf=is_none
    )
    return trainable, codebook


def guard_no_codebook() -> optax.GradientTransformation:
    """Identity transformation that raises `CodebookRoutingError` if any
    `VectorQuantizer` codebook array reaches it (at `init` or `update`).

    The main optimizer chain starts with it, so clipping, Adam moments, the
    schedule and weight decay can never touch the codebook.
    """

    def check(tree, where):
        bad = [x for x in _quantizer_leaves(tree) if not _is_masked(x)]
        if bad:
            raise CodebookRoutingError(
                f"{len(bad)} codebook array(s) (VectorQuantizer.codebook_sum/"
                f"codebook_count) reached the main optimizer's {where}; the "
                "codebook is updated only by its EMA rule (its gradient is the "
                "EMA step, which this optimizer would change). Use "
                "tvq_eqx.train.with_ema_codebook(your_optimizer) or "
                "tvq_eqx.train.make_optimizer (they route the codebook to its "
                "exact EMA step), or give your optimizer only the trainable "
                "arrays (tvq_eqx.train.split_codebook)."
            )

    def init_fn(params):
        check(params, "init")
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        check(updates, "update")
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def weight_decay_mask(params: Any) -> Any:
    """True for the arrays weight decay acts on, as the official code: every
    array that is not 1-D per layer (matrices, the embedding table, the scalar
    absolute-PE scale; the leading layer axis of stacked layers not counted), except the Transformer-XL biases `u`, `v` (1-D
    `[heads * d_k]` officially, stored `[heads, d_k]` here). Norm gains and
    biases and the output bias are not decayed; the codebook never reaches
    the main optimizer."""

    return _decay_flags(params, layer_axes=0)


def _decay_flags(tree: Any, layer_axes: int) -> Any:
    # `layer_axes`: leading stacked-layer axes (inside a `LayerStack`), not
    # counted in the rank that decides.
    def is_node(x):
        return isinstance(x, (XLRelativeBias, LayerStack))

    def mark(node):
        if isinstance(node, LayerStack):
            inner = _decay_flags(node.stacked, layer_axes + 1)
            return eqx.tree_at(lambda s: s.stacked, node, inner)
        if isinstance(node, XLRelativeBias):
            flags = jax.tree.map(lambda x: jnp.ndim(x) - layer_axes != 1, node)
            return eqx.tree_at(lambda r: (r.u, r.v), flags, (False, False))
        return jnp.ndim(node) - layer_axes != 1

    return jax.tree.map(mark, tree, is_leaf=is_node)


def _split_layers(tree: Any) -> tuple[Any, Any]:
    """`(layers, rest)`: `tree` with everything outside its `LayerStack`s set
    to None, and with its `LayerStack`s set to None."""

    def is_stack(x):
        return isinstance(x, LayerStack)

    layers = jax.tree.map(lambda n: n if is_stack(n) else None, tree, is_leaf=is_stack)
    rest = jax.tree.map(lambda n: None if is_stack(n) else n, tree, is_leaf=is_stack)
    return layers, rest


def _merge_layers(layers: Any, rest: Any) -> Any:
    """Inverse of `_split_layers`."""
    return jax.tree.map(
        lambda a, b: a if isinstance(a, LayerStack) else b,
        layers,
        rest,
        is_leaf=lambda x: x is None or isinstance(x, LayerStack),
    )


def per_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied to each layer of every `LayerStack` as to its own leaves
    (`jax.vmap` over the leading layer axis), and plainly to the other arrays.

    For elementwise optimizers this changes nothing; for Adafactor it keeps
    the parameter scale and update clipping (RMS over a whole leaf) per layer,
    as in the official code, whose layers are separate leaves. The state is
    `(state of the layers, each leaf with a leading layer axis, state of the
    rest)`.
    """

    def vmapped(fn, layers, *rest_args):
        # vmap needs at least one mapped array; a tree without layers runs plainly.
        if not jax.tree.leaves(layers):
            return fn(layers, *rest_args)
        return jax.vmap(fn)(layers, *rest_args)

    def init_fn(params):
        layers, rest = _split_layers(params)
        return vmapped(inner.init, layers), inner.init(rest)

    def update_fn(updates, state, params=None):
        layer_state, rest_state = state
        u_layers, u_rest = _split_layers(updates)
        p_layers, p_rest = (None, None) if params is None else _split_layers(params)
        if p_layers is None:
            new_layers, layer_state = vmapped(
                lambda u, s: inner.update(u, s), u_layers, layer_state
            )
        else:
            new_layers, layer_state = vmapped(
                inner.update, u_layers, layer_state, p_layers
            )
        new_rest, rest_state = inner.update(u_rest, rest_state, p_rest)
        return _merge_layers(new_layers, new_rest), (layer_state, rest_state)

    return optax.GradientTransformation(init_fn, update_fn)


def lr_schedule(
    peak: float, warmup_steps: int, total_steps: int, final_ratio: float = 0.1
) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then cosine decay to
    `final_ratio * peak` at `total_steps` (constant afterwards)."""
    warmup = optax.linear_schedule(0.0, peak, transition_steps=max(warmup_steps, 1))
    decay = optax.cosine_decay_schedule(
        init_value=peak,
        decay_steps=max(total_steps - warmup_steps, 1),
        alpha=final_ratio,
    )
    return optax.join_schedules([warmup, decay], boundaries=[warmup_steps])


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer's settings (the official enwik8 recipe by default); the
    only place their defaults are written. The schedule's length is the run's
    `steps`, passed separately to `make_optimizer` / `optimizer_from_config`."""

    name: OptimizerName = "adamw"
    """adamw (b1 0.9, b2 0.98, eps 1e-9), lion (bfloat16 momentum) or adafactor."""
    learning_rate: float = 4e-4
    """Peak learning rate."""
    warmup_steps: int = 10_000
    """Linear warmup from 0 over this many updates."""
    weight_decay: float = 2e-4
    """Decoupled weight decay (not scaled by the learning rate)."""
    grad_clip: float | None = 0.1
    """Global-norm gradient clipping (None = off)."""
    final_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak learning rate."""

    def __post_init__(self):
        check_literals(self)
        for name in ("learning_rate", "weight_decay", "final_lr_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"OptimizerConfig.{name} must be a float; got {v!r}")
        if not self.learning_rate > 0:
            raise ValueError(
                f"OptimizerConfig.learning_rate must be > 0; got {self.learning_rate!r}"
            )
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(
                f"OptimizerConfig.warmup_steps must be an int >= 0; got {w!r}"
            )
        if self.weight_decay < 0:
            raise ValueError(
                f"OptimizerConfig.weight_decay must be >= 0; got {self.weight_decay!r}"
            )
        if self.grad_clip is not None and not (
            isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0
        ):
            raise ValueError(
                f"OptimizerConfig.grad_clip must be > 0 or None; got {self.grad_clip!r}"
            )
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(
                f"OptimizerConfig.final_lr_ratio must be in [0, 1]; got "
                f"{self.final_lr_ratio!r}"
            )


_DEFAULT = OptimizerConfig()


def _base(name: str, schedule: optax.Schedule) -> optax.GradientTransformation:
    if name == "adamw":
        # Weight decay is added separately below (not scaled by the lr).
        return optax.adam(schedule, b1=0.9, b2=0.98, eps=1e-9, mu_dtype=jnp.float32)
    if name == "lion":
        # bfloat16 momentum, as the official code (Chen et al., 2023).
        return optax.lion(
            schedule, b1=0.95, b2=0.98, mu_dtype=jnp.bfloat16, weight_decay=0.0
        )
    if name == "adafactor":
        # Per layer: the parameter scale and update clipping are RMS over a
        # whole leaf, and official's leaves are single layers.
        return per_layer(
            optax.adafactor(
                schedule, multiply_by_parameter_scale=True, clipping_threshold=1.0
            )
        )
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {name!r}")


def make_optimizer(
    name: str = _DEFAULT.name,
    *,
    learning_rate: float = _DEFAULT.learning_rate,
    warmup_steps: int = _DEFAULT.warmup_steps,
    total_steps: int = 125_000,
    weight_decay: float = _DEFAULT.weight_decay,
    grad_clip: float | None = _DEFAULT.grad_clip,
    final_lr_ratio: float = _DEFAULT.final_lr_ratio,
) -> optax.GradientTransformation:
    """The Transformer-VQ optimizer (the official recipe).

    `optax.multi_transform` over two groups, labelled by `param_labels`:

    - **main** (every array except the codebooks):
      `guard_no_codebook -> clip_by_global_norm(grad_clip) -> optimizer with
      lr_schedule -> add decayed weights`. The optimizer is AdamW
      (`b1=0.9, b2=0.98, eps=1e-9`, float32 moments), Lion (`b1=0.95,
      b2=0.98`, bfloat16 momentum) or Adafactor (parameter-scaled, update
      clipping 1.0, its statistics per layer as in the official code: see
      `per_layer`). Weight decay is *decoupled*: each update subtracts
      `weight_decay * theta`, not scaled by the learning rate (as the official
      code does), on the arrays `weight_decay_mask` selects (matrices,
      embeddings, the absolute-PE scale; no norms, biases or `u`, `v`).
    - **codebook** (`codebook_sum`, `codebook_count` of every quantizer):
      `optax.sgd(1.0)`. `loss_fn` gives them the gradient
      `theta - EMA_target` times `(1 - c_gamma)`, so this step is exactly the
      EMA update; no clipping, decay or schedule touches them.

    Feed it `eqx.filter(model, eqx.is_inexact_array)`-shaped gradients and
    params, unmodified: it must be the outermost transformation (inside
    `optax.chain` it raises `CodebookRoutingError`; a clip before it would
    rescale the EMA step). For an optimizer of your own, see
    `with_ema_codebook`.

    **Arguments:** `name` (`"adamw"`, `"lion"`, `"adafactor"`),
    `learning_rate` (peak), `warmup_steps` (linear warmup from 0),
    `total_steps` (cosine decay to `final_lr_ratio * learning_rate` at this
    optimizer step), `weight_decay`, `grad_clip` (global norm; `None` = off).
    """
    # Validated in one place: the config's own checks (`name` included).
    OptimizerConfig(
        name=cast(OptimizerName, name),
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        final_lr_ratio=final_lr_ratio,
    )
    if (
        isinstance(total_steps, bool)
        or not isinstance(total_steps, int)
        or total_steps < 1
    ):
        raise ValueError(f"total_steps must be an int >= 1; got {total_steps!r}")
    schedule = lr_schedule(learning_rate, warmup_steps, total_steps, final_lr_ratio)
    main = [guard_no_codebook()]
    if grad_clip is not None:
        main.append(optax.clip_by_global_norm(grad_clip))
    main.append(_base(name, schedule))
    if weight_decay > 0:
        main.append(optax.add_decayed_weights(-weight_decay, mask=weight_decay_mask))
    return _routed(main)


def with_ema_codebook(
    optimizer: optax.GradientTransformation | optax.MultiSteps,
) -> optax.GradientTransformation:
    """`optimizer` for every array of the model except the codebooks, and the
    codebooks' exact EMA step (`optax.sgd(1.0)` on their `loss_fn`
    gradient): the safe way to train Transformer-VQ with an optax optimizer
    of your own.

    Whole-tree transformations belong *inside*, e.g.
    `with_ema_codebook(optax.chain(optax.clip_by_global_norm(1.0),
    optax.adamw(1e-3)))`: clipping then sees the trainable gradients only.
    The result refuses to be put inside `optax.chain` (`CodebookRoutingError`),
    since anything chained before it would rescale the EMA step.

    `optimizer` never sees a codebook array (it is preceded by
    `guard_no_codebook`); feed the result `eqx.filter(model,
    eqx.is_inexact_array)`-shaped gradients and parameters, as
    `make_optimizer`'s, which is this with the official recipe.

    **Gradient accumulation:** `with_ema_codebook(optax.MultiSteps(opt, k))`
    accumulates `k` micro-batches' gradients (MultiSteps' settings kept:
    `every_k_schedule`, `use_grad_mean`, `should_skip_update_fn`,
    `accumulator_dtype`) and takes one real update with `opt`, and one EMA
    step of the codebook, equal to the update on the `k` micro-batches
    concatenated: the codebook moves towards the *sum* of their statistics
    (counts and key sums add up over rows), not their mean, and its tally
    counts one step. The trainable arrays get the mean gradient, which is
    the concatenated batch's for equal-sized micro-batches under
    `lm_loss_average="positions"` (default); with `"tokens"` it weights the
    micro-batches equally whatever their token counts (the train step's
    `grad_accum` is exact in both). The other order,
    `optax.MultiSteps(with_ema_codebook(opt), k)`, steps the codebook
    towards the micro-batches' *mean* statistics: an EMA step that weighs
    the `k` micro-batches as one.
    """
    if isinstance(optimizer, optax.MultiSteps):
        return _accumulating(optimizer)
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation; got "
            f"{type(optimizer).__name__}"
        )
    return _routed([guard_no_codebook(), optimizer])


def _accumulating(multi: optax.MultiSteps) -> _Routed:
    """`with_ema_codebook(optax.MultiSteps(opt, ...))`: the routing inside,
    the MultiSteps (same settings) outside, and the codebook's step on the
    accumulated gradient turned into the EMA step on the summed statistics
    (`_ema_of_accumulated`)."""
    # optax keeps MultiSteps' settings private (optax 0.2.x); rebuild it
    # around the routed optimizer with the same ones.
    try:
        every_k = multi._every_k_schedule
        use_mean = multi._use_grad_mean
        should_skip = multi._should_skip_update_fn
        acc_dtype: Any = multi._accumulator_dtype  # optax types it Optional
    except AttributeError as e:  # pragma: no cover (another optax)
        raise TypeError(
            "with_ema_codebook cannot read this optax version's MultiSteps "
            f"settings ({e}); apply the gradient accumulation in the train step "
            "instead (train_step / make_train_step grad_accum, --grad-accum)"
        ) from None
    inner = multi.inner_opt
    routed = optax.multi_transform(
        {
            MAIN: optax.chain(guard_no_codebook(), inner),
            CODEBOOK: _ema_of_accumulated(every_k, use_mean),
        },
        param_labels=param_labels,
    )
    rebuilt = optax.MultiSteps(
        routed,
        every_k,
        use_grad_mean=use_mean,
        should_skip_update_fn=should_skip,
        accumulator_dtype=acc_dtype,
    )
    return _standard_promotion(rebuilt.gradient_transformation())


class _AccumulatedEmaState(NamedTuple):
    updates: Array  # real updates so far (MultiSteps' gradient_step)


def _ema_of_accumulated(every_k, use_mean: bool) -> optax.GradientTransformation:
    """The codebook's step inside `optax.MultiSteps`: from the gradient
    accumulated over `k` micro-batches (their mean, or sum without
    `use_mean`), the EMA step on the micro-batches' *summed* statistics,
    i.e. one SGD(1) step on the concatenated batch's codebook gradient.

    A micro-batch's gradient is `(1 - gamma) (theta - s_i)` (`s_i` its
    statistics, `theta` the codebook, unchanged while MultiSteps
    accumulates) and the concatenated batch's `(1 - gamma) (theta - sum_i
    s_i)` = `k mean_i - (k - 1) (1 - gamma) theta`. The tally's gradient is
    -1 per micro-batch and -1 for the concatenated batch: its mean. The state
    counts the real updates (MultiSteps keeps this state only when it
    updates), which `every_k` turns into the `k` of the update."""

    def init_fn(params):
        del params
        return _AccumulatedEmaState(updates=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "with_ema_codebook(optax.MultiSteps(...)).update needs params "
                "(the codebook's EMA step is computed from it)"
            )
        k = jnp.asarray(every_k(state.updates), jnp.float32)

        def step(g, theta):
            if not _is_quantizer(g):
                return g  # a masked node (not the codebook)
            w = 1.0 - g.c_gamma
            mean = g if use_mean else jax.tree.map(lambda x: x / k, g)

            def ema(m, th):
                return k * m - (k - 1.0) * w * th

            return eqx.tree_at(
                lambda q: (q.codebook_sum, q.codebook_count, q.ema_tally),
                mean,
                (
                    ema(mean.codebook_sum, theta.codebook_sum),
                    ema(mean.codebook_count, theta.codebook_count),
                    mean.ema_tally,
                ),
            )

        grads = jax.tree.map(step, updates, params, is_leaf=_is_quantizer)
        # SGD with learning rate 1: the EMA step.
        steps = jax.tree.map(jnp.negative, grads)
        return steps, _AccumulatedEmaState(updates=state.updates + 1)

    return optax.GradientTransformation(init_fn, update_fn)


class _Routed(optax.GradientTransformationExtraArgs):
    """An optimizer that routes the codebook to its EMA step. `optax.chain`
    unpacks the transformations it is given; unpacking this one raises, so
    `optax.chain(optax.clip_by_global_norm(c), make_optimizer())` (which
    would clip the EMA step with the gradients) is an error, not a silently
    wrong codebook. `.init` / `.update` and indexing work as usual."""

    __slots__ = ()

    def __iter__(self):
        raise CodebookRoutingError(
            "this optimizer (tvq_eqx.train.make_optimizer / with_ema_codebook) "
            "routes the codebook to its exact EMA step and must be the "
            "outermost transformation: inside optax.chain, a transformation "
            "before it (clipping, scaling) would change that step. Put "
            "whole-tree transformations inside instead: "
            "with_ema_codebook(optax.chain(optax.clip_by_global_norm(c), opt)), "
            "or make_optimizer(grad_clip=c)."
        )

    # The namedtuple helpers that would iterate, by index instead.
    def __getnewargs__(self):
        return (self[0], self[1])

    def _asdict(self) -> dict[str, Any]:
        return {"init": self[0], "update": self[1]}

    def _replace(self, **changes) -> _Routed:
        return _Routed(changes.pop("init", self[0]), changes.pop("update", self[1]))


def _routed(main: list[optax.GradientTransformation]) -> _Routed:
    """The codebook to `optax.sgd(1.0)`, every other array to `chain(*main)`
    (whose first element is `guard_no_codebook()`), under standard dtype
    promotion."""
    return _standard_promotion(
        optax.multi_transform(
            {MAIN: optax.chain(*main), CODEBOOK: optax.sgd(1.0)},
            param_labels=param_labels,
        )
    )


def _standard_promotion(inner: optax.GradientTransformation) -> _Routed:
    """`inner` run under jax's standard dtype promotion. optax mixes dtypes
    inside its updates (int32 step counts with Python floats, bfloat16 Lion
    momentum with float32 gradients), so a program that sets
    `jax_numpy_dtype_promotion="strict"` (our tests do) could not train."""

    def init_fn(params):
        with jax.numpy_dtype_promotion("standard"):
            return inner.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # none of ours takes any
        with jax.numpy_dtype_promotion("standard"):
            return inner.update(updates, state, params)

    return _Routed(init_fn, update_fn)


@functools.lru_cache(maxsize=32)
def optimizer_from_config(
    cfg: OptimizerConfig, total_steps: int
) -> optax.GradientTransformation:
    """`make_optimizer` from a config and the schedule's length, memoised:
    equal arguments give the same object, so compiled train steps are reused
    (e.g. after `--resume`)."""
    return make_optimizer(
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
        total_steps=total_steps,
    )
