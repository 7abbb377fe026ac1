"""Transformer layers and the Transformer-VQ language model."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Key, PRNGKeyArray, UInt32

from .._checks import check_token_ids, check_weights, error_if_any
from .._config import TransformerConfig
from ..ops import FullAttentionState, OnlineVQState, VQAttentionState
from ..ops._dispatch import check_doc_starts
from ..ops._padding import partial_blocks_error
from ._attention import TALLY_MESSAGE, VQAttention
from ._embedding import Embedding, OutputHead
from ._norm import RMSNorm
from ._positional import ScaledSinusoids, dropout

AttentionState = VQAttentionState | FullAttentionState | OnlineVQState


class TransformerState(eqx.Module):
    """Streaming state of the whole model: the state of every attention unit
    and the absolute position of the next token (shared by the batch, or
    `[batch]`: one per row, for rows at different positions, as
    `tvq_eqx.sampling` makes for prompts of different lengths; only the
    absolute position embedding, `abs_pe`, reads it).

    Stored like the layer stack (`LayerStack`): `stacked[j]` is one
    `VQAttentionState` (or `FullAttentionState`) holding unit `j` of every
    layer (`j = 0` the first unit of a layer, `1` the second), each array with
    a leading `[n_layer]` axis, as `model.layers.stacked.units[j]` holds their
    parameters. The layer scan reads and writes this pair as it is, so no
    call copies the carried caches to stack or unstack them.

    `state.unit(i)` is attention unit `i` in call order (layer `i // 2`,
    position `i % 2`, as `model.attention_units()`), a per-unit view with the
    layer axis sliced off; `state.units()` all of them;
    `TransformerState.from_units` builds the state from per-unit states.
    """

    # A pair, not one state with a `[n_layer, 2]` axis: each layer calls its
    # two units one after the other, so the scan body wants them apart.
    stacked: tuple[AttentionState, AttentionState]
    position: Int[Array, ""] | Int[Array, " batch"]

    @property
    def n_layer(self) -> int:
        """Layers the state is for (the leading axis of every array)."""
        return self.stacked[0].length.shape[0]

    @property
    def batch_size(self) -> int:
        return self.stacked[0].length.shape[1]

    def unit(self, i: int | np.integer) -> AttentionState:
        """Attention unit `i`'s state (call order, `0 <= i < 2 * n_layer`);
        array leaves sliced (a copy), ShapeDtypeStructs too."""
        n = 2 * self.n_layer
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"unit index must be an int; got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"unit {i} out of range for {n} units")
        layer, j = divmod(int(i) % n, 2)
        return jax.tree.map(lambda x: _slice_leaf(x, layer), self.stacked[j])

    def units(self) -> tuple[AttentionState, ...]:
        """Every unit's state in call order (two per layer): `unit(i)` for
        each `i`, the per-unit layout of checkpoint formats 2 to 4."""
        return tuple(self.unit(i) for i in range(2 * self.n_layer))

    @classmethod
    def from_units(
        cls,
        units: tuple[AttentionState, ...] | list,
        position: Int[Array, ""] | Int[Array, " batch"],
    ) -> TransformerState:
        """The state from per-unit states in call order (two per layer),
        e.g. `state.units()` or the layout of checkpoint formats 2 to 4."""
        if not units or len(units) % 2:
            raise ValueError(
                f"units must hold two states per layer; got {len(units)} states"
            )
        stacked = tuple(_stack_trees(units[j::2]) for j in range(2))
        return cls(stacked=stacked, position=position)  # type: ignore[arg-type]

    def _unit_shapes(self) -> AttentionState:
        """Unit 0's state as ShapeDtypeStructs (for checks: no slicing)."""

        def shape(x):
            if not hasattr(x, "shape"):
                return x
            return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)

        return jax.tree.map(shape, self.stacked[0])


def layer_drop(
    residual: Float[Array, "batch seq d_model"], p: float, key: PRNGKeyArray | None
) -> Float[Array, "batch seq d_model"]:
    """Drop a residual update for whole batch rows with probability `p`
    (inverted scaling; one draw per row, broadcast over positions and width,
    as the official `broadcast_dims=(0, 2, 3)`). Identity when `key` is None."""
    if key is None or p == 0.0:
        return residual
    keep = jax.random.bernoulli(key, 1.0 - p, (residual.shape[0], 1, 1))
    return jnp.where(keep, residual / (1.0 - p), 0.0).astype(residual.dtype)


class TransformerLayer(eqx.Module):
    """Two gated VQ-attention units with residual connections and LayerDrop.

    `layerdrop="unit"` (official): `x1 = x + drop1(unit1(x))`,
    `x2 = x1 + drop2(unit2(x1))`, two independent per-row masks.
    `layerdrop="layer"`: `x2 = x + drop(unit1(x) + unit2(x + unit1(x)))`, one
    mask for the layer. The masks come from `sequence_key` (fixed for a
    sequence); residual dropout inside the units from `key`.
    """

    units: tuple[VQAttention, VQAttention]
    p_droplyr: float = eqx.field(static=True)
    layerdrop: str = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.units = (VQAttention(config, key=k1), VQAttention(config, key=k2))
        self.p_droplyr = config.p_droplyr
        self.layerdrop = config.layerdrop

    def __call__(
        self,
        x: Float[Array, "batch seq d_model"],
        states: tuple[AttentionState, AttentionState],
        *,
        mask: Float[Array, "batch seq"],
        key: PRNGKeyArray | None = None,
        sequence_key: PRNGKeyArray | None = None,
        doc_starts: Bool[Array, "batch seq"] | None = None,
    ) -> tuple[
        Float[Array, "batch seq d_model"], tuple[AttentionState, ...], list[dict]
    ]:
        res_keys = (None, None) if key is None else tuple(jax.random.split(key))
        if sequence_key is None:
            sin_keys = drop_keys = (None, None)
        else:
            k = jax.random.split(sequence_key, 4)
            sin_keys, drop_keys = (k[0], k[1]), (k[2], k[3])
        per_unit = self.layerdrop == "unit"
        y = x
        new_states, stats = [], []
        for i, (unit, state) in enumerate(zip(self.units, states, strict=True)):
            res, new_state, st = unit(
                y,
                state,
                mask=mask,
                key=res_keys[i],
                sequence_key=sin_keys[i],
                doc_starts=doc_starts,
            )
            if per_unit:
                res = layer_drop(res, self.p_droplyr, drop_keys[i])
            y = y + res
            new_states.append(new_state)
            stats.append(st)
        if not per_unit:
            y = x + layer_drop(y - x, self.p_droplyr, drop_keys[0])
        return y, tuple(new_states), stats


def _slice_leaf(x, i: int):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[i] if eqx.is_array(x) else x


class LayerStack(eqx.Module):
    """The `n_layer` identical `TransformerLayer`s held as one module: every
    array of `stacked` has a leading `[n_layer]` axis (built with
    `eqx.filter_vmap`, run with `jax.lax.scan`), so tracing and compile time
    do not grow with depth.

    `stack[i]` is layer `i` as a plain `TransformerLayer` (a read-only view
    with the layer axis sliced off); `len(stack)` and iteration work too. The
    same indexing works on any PyTree of this shape (gradients, optimizer
    labels): only array leaves are sliced.
    """

    stacked: TransformerLayer
    n_layer: int = eqx.field(static=True)

    @classmethod
    def init(
        cls,
        config: TransformerConfig,
        *,
        keys: Key[Array, " n_layer"] | UInt32[Array, "n_layer 2"],
    ) -> LayerStack:
        """`config.n_layer` fresh layers, layer `i` initialised from `keys[i]`
        (the same values as `TransformerLayer(config, key=keys[i])`).
        Old-style `uint32 [n_layer, 2]` keys are accepted."""
        if keys.dtype == jnp.uint32 and keys.shape == (config.n_layer, 2):
            keys = jax.random.wrap_key_data(keys)
        if keys.shape != (config.n_layer,):
            raise ValueError(
                f"keys must have shape ({config.n_layer},) (one per layer); got "
                f"{keys.shape}"
            )
        make = eqx.filter_vmap(lambda k: TransformerLayer(config, key=k))
        return cls(make(keys), config.n_layer)

    def __len__(self) -> int:
        return self.n_layer

    def __getitem__(self, i: int) -> TransformerLayer:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layer index must be an int; got {type(i).__name__}")
        if not -self.n_layer <= i < self.n_layer:
            raise IndexError(f"layer {i} out of range for {self.n_layer} layers")
        i %= self.n_layer
        return jax.tree.map(lambda x: _slice_leaf(x, i), self.stacked)

    def __iter__(self):
        return (self[i] for i in range(self.n_layer))


def stack_layers(layers: tuple | list) -> LayerStack:
    """A `LayerStack` from per-layer `TransformerLayer`s (or PyTrees of their
    shape, e.g. the layers of an old, unrolled checkpoint): array leaves are
    stacked along a new leading axis."""
    if not layers:
        raise ValueError("stack_layers needs at least one layer")
    return LayerStack(_stack_trees(layers), len(layers))


_REMAT_POLICIES = {
    "full": None,  # save nothing but the layer's inputs
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _stack_trees(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


class Transformer(eqx.Module):
    """Transformer-VQ decoder-only language model.

    ```python
    model = Transformer(config, key=jax.random.key(0))
    state = model.init_state(batch_size)
    logprobs, state, aux = model(tokens, state)   # tokens int [batch, seq]
    ```

    `tokens` may have any integer dtype (uint8 bytes included); ids outside
    `[0, n_vocab)` raise at run time, under `jit` and `shard_map` too.
    `state=None` is the empty history (`model.init_state(batch)`).

    `seq` may be any length (a partial last block is padded inside the
    attention and masked; see `vq_attention_with_state`), except with
    `cache_decay < 1` or `attention="block_window"`, whose carried state
    depends on where blocks begin: there it is a multiple of
    `config.block_len`. Calling the model on consecutive segments, passing
    the state along, equals one call on their concatenation, whatever the
    segments' lengths: positions go on from the real tokens. `key=None` disables dropout. `mask` (`[batch, seq]`, 1 =
    real token) keeps padding out of the codebook statistics and commit loss.

    Dropout keys: `key` draws the per-call masks (embedding and residual
    dropout); `sequence_key` the LayerDrop and sinusoid-dropout masks, which
    the official code keeps fixed for a whole sequence ("timeless"): pass the
    same `sequence_key` for every segment of a sequence (the train step does).
    With `sequence_key=None`, or `config.drop_mask_scope="segment"`, those
    masks are drawn from `key` instead (fresh every call).

    Parameters map onto the official Flax model as `embedding.weight = embs`;
    `position_embedding.scale = position_embedder.scale`; `out_norm.weight/bias
    = out_ln.g/b`; `head.bias = bias_out` (tied) or `out_proj.bias`;
    `head.weight = out_proj.kernel` (untied; `None` when tied); layer `i`'s
    `units[0]`, `units[1]` = `scanned_attn1`, `scanned_attn2` (see
    `VQAttention`) of `transformer_layers_i`, stored at index `i` of the
    leading layer axis of `layers.stacked` (a `LayerStack`; `layers[i]` reads
    layer `i`).

    The layers run as one `jax.lax.scan` over the stacked parameters;
    `config.remat` wraps its body in `jax.checkpoint`. The state is stored
    stacked the same way (`TransformerState.stacked`, one state per unit
    position with a leading layer axis) and scanned over as it is.

    **Returns:** float32 log-probabilities `[batch, seq, n_vocab]`, the new
    state, and `aux = {"vq": stats}` where each entry of `stats` has a leading
    axis over the `2 * n_layer` attention units (see
    `VectorQuantizer.statistics`).
    """

    embedding: Embedding
    position_embedding: ScaledSinusoids | None
    layers: LayerStack
    out_norm: RMSNorm | None
    head: OutputHead
    config: TransformerConfig = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        if not isinstance(config, TransformerConfig):
            raise TypeError(
                f"config must be a TransformerConfig; got {type(config).__name__}"
            )
        keys = jax.random.split(key, 2 + config.n_layer)
        ke, kh, kl = keys[0], keys[1], keys[2:]
        pdt = config.jnp_param_dtype
        self.embedding = Embedding(config.n_vocab, config.d_model, key=ke, dtype=pdt)
        self.position_embedding = (
            ScaledSinusoids(config.d_model, pe_lam=config.pe_lam)
            if config.abs_pe
            else None
        )
        self.layers = LayerStack.init(config, keys=kl)
        self.out_norm = (
            RMSNorm(config.d_model, dtype=pdt) if config.output_norm else None
        )
        self.head = OutputHead(
            config.d_model,
            config.n_vocab,
            tied=config.tie_embeddings,
            e_scale=config.e_scale,
            key=kh,
            dtype=pdt,
        )
        self.config = config

    def attention_units(self) -> list[VQAttention]:
        """All attention units in call order (two per layer), as per-layer
        views of the stacked parameters."""
        return [unit for layer in self.layers for unit in layer.units]

    def init_state(self, batch_size: int | np.integer) -> TransformerState:
        """The state before any token (`batch_size`: an int, numpy ints too)."""
        if isinstance(batch_size, np.integer):
            batch_size = int(batch_size)
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int)
            or batch_size <= 0
        ):
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        # One empty unit state (it depends on the config only), repeated
        # along a leading layer axis for each unit position.
        n = self.config.n_layer
        stacked = tuple(
            jax.tree.map(
                lambda x: jnp.broadcast_to(x[None], (n, *x.shape)),
                unit.init_state(batch_size),
            )
            for unit in self.layers.stacked.units
        )
        return TransformerState(
            stacked=stacked,  # type: ignore[arg-type]
            position=jnp.zeros((), jnp.int32),
        )

    def with_config(self, **changes) -> Transformer:
        """The same weights under a config with `changes` (e.g. another
        `block_len` or `implementation`); array shapes must not change."""
        new_config = self.config.replace(**changes)
        skeleton = eqx.filter_eval_shape(Transformer, new_config, key=jax.random.key(0))
        leaves = jax.tree.leaves(self)
        new_leaves, treedef = jax.tree.flatten(skeleton)  # static config is in treedef
        if [(x.shape, x.dtype) for x in leaves] != [
            (x.shape, x.dtype) for x in new_leaves
        ]:
            raise ValueError(
                f"with_config({changes}) would change parameter shapes or dtypes"
            )
        return jax.tree.unflatten(treedef, leaves)

    @staticmethod
    def _check_token_array(tokens) -> None:
        if not hasattr(tokens, "dtype") or not jnp.issubdtype(
            tokens.dtype, jnp.integer
        ):
            raise TypeError(
                f"tokens must be an integer array [batch, seq]; got "
                f"{getattr(tokens, 'dtype', type(tokens).__name__)}"
            )
        if tokens.ndim != 2:
            raise ValueError(
                f"tokens must have rank 2 [batch, seq]; got shape {tuple(tokens.shape)}"
            )

    def _check_tokens(self, tokens, state) -> None:
        c = self.config
        # Any seq length: the attention pads a partial last block itself,
        # except where the carried state depends on where blocks begin.
        self._check_token_array(tokens)
        if c.attention != "full":
            error = partial_blocks_error(
                tokens.shape[1], block_len=c.block_len,
                use_cache=c.attention == "vq",
                sliding_window=c.attention == "window",
                cache_decay=c.cache_decay,
                online=c.codebook_mode == "online",
            )  # fmt: skip
            if error is not None:
                raise ValueError(f"tokens {tuple(tokens.shape)}: {error}")
        if not isinstance(state, TransformerState):
            raise TypeError(
                f"state must be a TransformerState (model.init_state); got {type(state).__name__}"
            )
        if len(state.stacked) != 2 or state.n_layer != c.n_layer:
            raise ValueError(
                f"state has {2 * state.n_layer} units; the model has {2 * c.n_layer}"
            )
        first = state._unit_shapes()
        want_b = first.length.shape[0]
        if tokens.shape[0] != want_b:
            raise ValueError(
                f"tokens batch {tokens.shape[0]} (shape {tuple(tokens.shape)}) does not match "
                f"the state's batch {want_b}"
            )
        want_type = (
            FullAttentionState
            if c.attention == "full"
            else OnlineVQState
            if c.codebook_mode == "online"
            else VQAttentionState
        )
        if not isinstance(first, want_type):
            raise TypeError(
                f"state holds {type(first).__name__}; attention={c.attention!r} needs "
                f"{want_type.__name__} (use model.init_state)"
            )
        if tuple(state.position.shape) not in ((), (want_b,)):
            raise ValueError(
                f"state.position must be a scalar or one per row ({want_b},); got "
                f"shape {tuple(state.position.shape)}"
            )
        if (
            isinstance(first, VQAttentionState | OnlineVQState)
            and first.mem_len != c.mem_len
        ):
            raise ValueError(
                f"state was made for mem_len={first.mem_len}, the model "
                f"uses mem_len={c.mem_len}"
            )

    def __call__(
        self,
        tokens: Array | np.ndarray,
        state: TransformerState | None = None,
        *,
        key: PRNGKeyArray | None = None,
        mask: Array | None = None,
        sequence_key: PRNGKeyArray | None = None,
        doc_starts: Array | None = None,
    ) -> tuple[Float[Array, "batch seq vocab"], TransformerState, dict]:
        if state is None:  # no history, as the op's state=None
            self._check_token_array(tokens)
            state = self.init_state(tokens.shape[0])
        self._check_tokens(tokens, state)
        c = self.config
        dt = c.jnp_dtype
        b, t = tokens.shape
        # Any integer dtype (uint8 bytes from `data.load_bytes` included).
        tokens = check_token_ids(tokens, c.n_vocab, "token")
        if mask is None:
            mask = jnp.ones((b, t), jnp.float32)
        else:
            if not hasattr(mask, "shape") or tuple(mask.shape) != (b, t):
                raise ValueError(
                    f"mask must have the tokens' shape {(b, t)} [batch, seq]; got "
                    f"{tuple(getattr(mask, 'shape', ()))}"
                )
            mask = check_weights(jnp.asarray(mask).astype(jnp.float32), "mask")
        keys, seq_keys = self._dropout_keys(key, sequence_key)

        x = self._check_codebook_tally(self.embedding(tokens).astype(dt))
        if self.position_embedding is not None:
            # [1, t] for a shared position, [b, t] for one per row.
            pos = jnp.reshape(state.position, (-1, 1)) + jnp.arange(t)[None, :]
            pe = self.position_embedding(pos.reshape(-1)).reshape(*pos.shape, -1)
            x = x + pe.astype(dt)
        x = dropout(x, c.p_dropemb, keys[0])

        doc_starts = self._check_doc_starts(doc_starts, (b, t))
        x, new_stacked, stats = self._run_layers(
            x, state.stacked, mask, keys[1], seq_keys, doc_starts
        )

        if self.out_norm is not None:
            x = self.out_norm(x)
        tied = self.embedding.weight if self.head.weight is None else None
        logits = self.head(x, tied)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        new_state = TransformerState(stacked=new_stacked, position=state.position + t)
        return logprobs, new_state, {"vq": stats}

    def _check_codebook_tally(self, x: Array) -> Array:
        """`x` unchanged, raising at run time if an optimizer other than the
        EMA rule has moved a codebook (see `VectorQuantizer.ema_tally`)."""
        whole = [u.quantizer.tally_is_whole() for u in self.layers.stacked.units]
        return error_if_any(x, ~jnp.stack(whole), TALLY_MESSAGE)

    def _check_doc_starts(self, doc_starts, shape):
        """None, or a bool `[batch, seq]` array the attention can mask with
        (the op's policy: `check_doc_starts`)."""
        if doc_starts is None:
            return None
        self.config.check_masks_documents("doc_starts")
        return check_doc_starts(
            doc_starts, shape=shape, where=f"the tokens' shape {shape} [batch, seq]"
        )

    def _run_layers(self, x, states, mask, layer_keys, seq_keys, doc_starts=None):
        """`jax.lax.scan` of the layers over their stacked parameters, their
        stacked attention states (`TransformerState.stacked`) and per-layer
        dropout keys.

        **Returns:** the output, the new stacked states (the same layout) and
        the quantizer statistics with a leading `2 * n_layer` axis.
        """
        n = self.config.n_layer
        params, static = eqx.partition(self.layers.stacked, eqx.is_array)

        def body(x, per_layer):
            params, states, key, sequence_key = per_layer
            layer = eqx.combine(params, static)
            y, new_states, stats = layer(
                x,
                states,
                mask=mask,
                key=key,
                sequence_key=sequence_key,
                doc_starts=doc_starts,
            )
            return y, (new_states, _stack_trees(stats))

        if self.config.remat != "none":
            body = jax.checkpoint(
                body, policy=_REMAT_POLICIES[self.config.remat], prevent_cse=False
            )
        x, (new_states, stats) = jax.lax.scan(
            body, x, (params, states, layer_keys, seq_keys)
        )
        # [n_layer, 2, ...] -> [2 * n_layer, ...] in unit order.
        stats = jax.tree.map(lambda a: a.reshape(2 * n, *a.shape[2:]), stats)
        return x, tuple(new_states), stats

    def _dropout_keys(self, key, sequence_key):
        """Per-call keys (embedding dropout, then `[n_layer]` keys for the
        layers' residual dropout) and `[n_layer]` sequence keys (LayerDrop,
        sinusoid dropout); all None when `key` is None."""
        c = self.config
        n = c.n_layer
        if key is None:
            return (None, None), None
        keys = jax.random.split(key, n + 1)
        if c.drop_mask_scope == "segment" or sequence_key is None:
            # Fresh masks for this call: derived from `key`, independent of
            # the per-call keys above.
            sequence_key = jax.random.fold_in(key, 0x5E0)
        return (keys[0], keys[1:]), jax.random.split(sequence_key, n)
