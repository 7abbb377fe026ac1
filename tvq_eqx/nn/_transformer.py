"""Transformer layers and the Transformer-VQ language model."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._config import TransformerConfig
from ..ops import FullAttentionState, VQAttentionState
from ._attention import VQAttention
from ._embedding import Embedding, OutputHead, sinusoids
from ._norm import RMSNorm
from ._positional import dropout

AttentionState = VQAttentionState | FullAttentionState


class TransformerState(eqx.Module):
    """Streaming state of the whole model: one `VQAttentionState` per attention
    unit (two per layer, in order) and the absolute position of the next token."""

    units: tuple[AttentionState, ...]
    position: Int[Array, ""]


class TransformerLayer(eqx.Module):
    """Two gated VQ-attention units with residual connections; LayerDrop
    (per example, inverted scaling) drops the whole layer's update in training."""

    units: tuple[VQAttention, VQAttention]
    p_droplyr: float = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.units = (VQAttention(config, key=k1), VQAttention(config, key=k2))
        self.p_droplyr = config.p_droplyr

    def __call__(
        self,
        x: Float[Array, "batch seq d_model"],
        states: tuple[AttentionState, AttentionState],
        *,
        mask: Float[Array, "batch seq"],
        key: PRNGKeyArray | None = None,
    ) -> tuple[
        Float[Array, "batch seq d_model"], tuple[AttentionState, ...], list[dict]
    ]:
        keys = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
        y = x
        new_states, stats = [], []
        for unit, state, k in zip(self.units, states, keys[:2], strict=True):
            res, new_state, st = unit(y, state, mask=mask, key=k)
            y = y + res
            new_states.append(new_state)
            stats.append(st)
        if keys[2] is not None and self.p_droplyr > 0.0:
            keep = jax.random.bernoulli(
                keys[2], 1.0 - self.p_droplyr, (x.shape[0], 1, 1)
            )
            y = x + jnp.where(keep, (y - x) / (1.0 - self.p_droplyr), 0.0).astype(
                x.dtype
            )
        return y, tuple(new_states), stats


class Transformer(eqx.Module):
    """Transformer-VQ decoder-only language model.

    ```python
    model = Transformer(config, key=jax.random.key(0))
    state = model.init_state(batch_size)
    logprobs, state, aux = model(tokens, state)   # tokens int [batch, seq]
    ```

    `seq` must be a multiple of `config.block_len`. Calling the model on
    consecutive segments, passing the state along, equals one call on their
    concatenation. `key=None` disables dropout. `mask` (`[batch, seq]`, 1 =
    real token) keeps padding out of the codebook statistics and commit loss.

    **Returns:** float32 log-probabilities `[batch, seq, n_vocab]`, the new
    state, and `aux = {"vq": stats}` where each entry of `stats` has a leading
    axis over the `2 * n_layer` attention units (see
    `VectorQuantizer.statistics`).
    """

    embedding: Embedding
    layers: tuple[TransformerLayer, ...]
    out_norm: RMSNorm | None
    head: OutputHead | None
    config: TransformerConfig = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        if not isinstance(config, TransformerConfig):
            raise TypeError(
                f"config must be a TransformerConfig; got {type(config).__name__}"
            )
        ke, kh, *kl = jax.random.split(key, 2 + config.n_layer)
        pdt = config.jnp_param_dtype
        self.embedding = Embedding(config.n_vocab, config.d_model, key=ke, dtype=pdt)
        self.layers = tuple(TransformerLayer(config, key=k) for k in kl)
        self.out_norm = (
            RMSNorm(config.d_model, dtype=pdt) if config.output_norm else None
        )
        self.head = (
            None
            if config.tie_embeddings
            else OutputHead(config.d_model, config.n_vocab, key=kh, dtype=pdt)
        )
        self.config = config

    def attention_units(self) -> list[VQAttention]:
        """All attention units in call order (two per layer)."""
        return [unit for layer in self.layers for unit in layer.units]

    def init_state(self, batch_size: int) -> TransformerState:
        """The state before any token."""
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int)
            or batch_size <= 0
        ):
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        return TransformerState(
            units=tuple(u.init_state(batch_size) for u in self.attention_units()),
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

    def _check_tokens(self, tokens, state) -> None:
        c = self.config
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
        if tokens.shape[1] % c.block_len != 0:
            raise ValueError(
                f"tokens seq length {tokens.shape[1]} (shape {tuple(tokens.shape)}) must be a "
                f"multiple of block_len={c.block_len}"
            )
        if not isinstance(state, TransformerState):
            raise TypeError(
                f"state must be a TransformerState (model.init_state); got {type(state).__name__}"
            )
        if len(state.units) != 2 * c.n_layer:
            raise ValueError(
                f"state has {len(state.units)} units; the model has {2 * c.n_layer}"
            )
        first = state.units[0]
        want_b = first.length.shape[0]
        if tokens.shape[0] != want_b:
            raise ValueError(
                f"tokens batch {tokens.shape[0]} (shape {tuple(tokens.shape)}) does not match "
                f"the state's batch {want_b}"
            )
        want_type = FullAttentionState if c.attention == "full" else VQAttentionState
        if not isinstance(first, want_type):
            raise TypeError(
                f"state holds {type(first).__name__}; attention={c.attention!r} needs "
                f"{want_type.__name__} (use model.init_state)"
            )
        if isinstance(first, VQAttentionState) and first.mem_len != c.mem_len:
            raise ValueError(
                f"state was made for mem_len={first.mem_len}, the model "
                f"uses mem_len={c.mem_len}"
            )

    def __call__(
        self,
        tokens: Array,
        state: TransformerState,
        *,
        key: PRNGKeyArray | None = None,
        mask: Array | None = None,
    ) -> tuple[Float[Array, "batch seq vocab"], TransformerState, dict]:
        self._check_tokens(tokens, state)
        c = self.config
        dt = c.jnp_dtype
        b, t = tokens.shape
        tokens = eqx.error_if(
            tokens,
            (tokens < 0) | (tokens >= c.n_vocab),
            f"token ids must be in [0, n_vocab={c.n_vocab})",
        )
        mask = (
            jnp.ones((b, t), jnp.float32) if mask is None else mask.astype(jnp.float32)
        )
        keys = (
            [None] * (c.n_layer + 1)
            if key is None
            else list(jax.random.split(key, c.n_layer + 1))
        )

        x = self.embedding(tokens).astype(dt)
        if c.abs_pe:
            pos = state.position + jnp.arange(t)
            x = x + sinusoids(pos, c.d_model, c.pe_lam).astype(dt)[None]
        x = dropout(x, c.p_dropemb, keys[0])

        new_units, stats = [], []
        for i, layer in enumerate(self.layers):
            x, st, s = layer(
                x, state.units[2 * i : 2 * i + 2], mask=mask, key=keys[i + 1]
            )
            new_units.extend(st)
            stats.extend(s)

        if self.out_norm is not None:
            x = self.out_norm(x)
        logits = self.embedding.logits(x) if self.head is None else self.head(x)
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        new_state = TransformerState(
            units=tuple(new_units), position=state.position + t
        )
        vq = jax.tree.map(lambda *xs: jnp.stack(xs), *stats)
        return logprobs, new_state, {"vq": vq}
