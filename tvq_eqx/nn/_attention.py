"""The gated VQ-attention unit (GAU) of Transformer-VQ."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .._checks import error_if_any
from .._config import TransformerConfig
from ..ops import (
    FullAttentionState,
    OnlineVQState,
    VQAttentionState,
    full_attention_with_state,
    online_vq_attention_with_state,
    vq_attention_sharded,
    vq_attention_with_state,
)
from ._norm import RMSNorm, layer_norm, rms_norm
from ._positional import XLRelativeBias, dropout
from ._quantizer import VectorQuantizer

TALLY_MESSAGE = (
    "a VectorQuantizer's ema_tally is not a whole number: an optimizer "
    "other than the codebook's EMA rule (SGD, learning rate 1) updated "
    "the codebook (e.g. optax.adamw over the whole model, or weight "
    "decay, clipping or a schedule on the codebook). Wrap your "
    "optimizer in tvq_eqx.train.with_ema_codebook(...), use "
    "tvq_eqx.train.make_optimizer, or apply the codebook part yourself "
    "(tvq_eqx.train.split_codebook); see the README's 'Your own "
    "training loop'"
)


class VQAttention(eqx.Module):
    """Gated VQ-attention unit.

    `x~ = RMSNorm(x)` (gain and bias); `q = N(x~ W_q)`, `k = N(x~ W_k)` with
    `N` a parameter-free norm per head (`qk_norm`: RMS norm without centring,
    official, or centred layer norm); `v = SiLU(x~ W_v)`, `g = SiLU(x~ W_g)`;
    scores
    `tau [(q + u) . k^_j + (q + v) . r_{i-j}]` with `tau = d_k^-1/2`, `k^` the
    quantized key and the position term only for `i - j <= mem_len`; output
    `dropout((g * attention) W_o)`, to be added to `x` by the caller.

    Our scores equal the official ones: it scales q, k, u, v and r by
    `d_k^-1/4` each instead of multiplying by `tau`. Official parameters map
    as `norm.weight/bias = input_ln.g/b`, `w_q = q_proj.kernel`,
    `w_kvg = kvg_proj.kernel`, `w_o = res_proj.kernel`,
    `rel_bias.w_r = r_proj.kernel`, `rel_bias.u/v = u/v` reshaped to
    `[heads, d_k]`, and the quantizer as `VectorQuantizer` says.
    Initialisers as the official ones: projections N(0, 1/fan_in), u, v zero.
    """

    norm: RMSNorm
    w_q: Float[Array, "d_model heads_d_k"]
    w_kvg: Float[Array, "d_model heads_kvg"]
    w_o: Float[Array, "heads_d_v d_model"]
    rel_bias: XLRelativeBias
    quantizer: VectorQuantizer
    config: TransformerConfig = eqx.field(static=True)

    def __init__(
        self,
        config: TransformerConfig | None = None,
        *,
        key: PRNGKeyArray,
        **sizes: Any,
    ):
        """From a model's `config`, or from the unit's own settings as
        keywords (`VQAttention(d_model=64, n_head=2, d_k=16, d_v=32,
        n_code=32, block_len=64, key=k)`), every other one the
        `TransformerConfig` default; not both."""
        if config is None:
            config = TransformerConfig(**sizes)
        elif sizes:
            raise TypeError(
                f"VQAttention takes a config or its settings as keywords, not "
                f"both; got config and {sorted(sizes)}"
            )
        c = config
        kq, kkvg, ko, kr, kc = jax.random.split(key, 5)
        pdt = c.jnp_param_dtype
        hk, hv = c.n_head * c.d_k, c.n_head * c.d_v
        self.norm = RMSNorm(c.d_model, dtype=pdt)  # gain and bias (official)
        self.w_q = jax.random.normal(kq, (c.d_model, hk), pdt) * c.d_model**-0.5
        self.w_kvg = (
            jax.random.normal(kkvg, (c.d_model, hk + 2 * hv), pdt) * c.d_model**-0.5
        )
        self.w_o = jax.random.normal(ko, (hv, c.d_model), pdt) * hv**-0.5
        assert c.mem_len is not None  # TransformerConfig fills the default
        self.rel_bias = XLRelativeBias(
            c.d_model,
            c.n_head,
            c.d_k,
            c.mem_len,
            pe_lam=c.pe_lam,
            p_dropsin=c.p_dropsin,
            key=kr,
            dtype=pdt,
        )
        self.quantizer = VectorQuantizer(
            c.n_head, c.n_code, c.d_k, c_gamma=c.c_gamma, key=kc
        )
        self.config = config

    def init_state(
        self, batch_size: int
    ) -> VQAttentionState | FullAttentionState | OnlineVQState:
        c = self.config
        assert c.mem_len is not None  # TransformerConfig fills the default
        if c.codebook_mode == "online":
            # Every slot free: the dictionary is per sequence.
            return OnlineVQState.empty(
                batch_size,
                mem_len=c.mem_len,
                heads=c.n_head,
                codes=c.n_code,
                d_k=c.d_k,
                d_v=c.d_v,
                dtype=c.jnp_dtype,
            )
        if c.attention == "full":
            return FullAttentionState.empty(
                batch_size,
                capacity=c.kv_cache_len,
                heads=c.n_head,
                d_k=c.d_k,
                d_v=c.d_v,
                dtype=c.jnp_dtype,
            )
        # Window in the activation dtype; the cache (counts, value means) is
        # float32 whatever it is, so long bf16 streams do not drift.
        return VQAttentionState.empty(
            batch_size,
            mem_len=c.mem_len,
            heads=c.n_head,
            codes=c.n_code,
            d_k=c.d_k,
            d_v=c.d_v,
            dtype=c.jnp_dtype,
        )

    @jax.named_scope("tvq_eqx.VQAttention")
    def __call__(
        self,
        x: Float[Array, "batch seq d_model"],
        state: VQAttentionState | FullAttentionState | OnlineVQState | None = None,
        *,
        mask: Float[Array, "batch seq"] | None = None,
        key: PRNGKeyArray | None = None,
        sequence_key: PRNGKeyArray | None = None,
        doc_starts: Bool[Array, "batch seq"] | None = None,
    ) -> tuple[
        Float[Array, "batch seq d_model"],
        VQAttentionState | FullAttentionState | OnlineVQState,
        dict[str, Array],
    ]:
        """`state` None: no history (`init_state`). `mask` (1 = a real
        token; default all ones) weighs the codebook statistics and the
        commit term. `key` draws the residual dropout; `sequence_key` the
        sinusoid dropout mask (the official "timeless" mask, fixed for a
        sequence). Either None: that dropout is off.

        Returns `(out, new_state, stats)`; add `self.auxiliary_loss(stats,
        ...)` to your loss and train with `tvq_eqx.train.with_ema_codebook`
        so that the codebook learns (docs/training.md, "VQAttention in your
        own model")."""
        c = self.config
        b, t, _ = x.shape
        if state is None:
            state = self.init_state(b)
        if mask is None:
            mask = jnp.ones((b, t), jnp.float32)
        # Loud, in the unit itself: an optimizer other than the EMA rule moved
        # the codebook (the Transformer checks too; a user's module may not).
        x = error_if_any(x, ~self.quantizer.tally_is_whole(), TALLY_MESSAGE)
        h, dv = c.n_head, c.d_v
        dt = c.jnp_dtype
        q, k, v, g = self._projections(x.astype(dt))
        scale = c.d_k**-0.5
        rel_table = self.rel_bias.table(key=sequence_key).astype(dt)
        query = q + self.rel_bias.u.astype(dt)[None, None]
        rel_query = (q + self.rel_bias.v.astype(dt)[None, None]) * scale
        attn, new_state = self._attend(
            query, k, v, state, scale=scale, rel_query=rel_query,
            rel_table=rel_table, doc_starts=doc_starts,
        )  # fmt: skip
        gated = attn.reshape(b, t, h * dv) * g
        out = jnp.einsum("bte,ed->btd", gated, self.w_o.astype(dt))
        out = dropout(out, c.p_dropres, key)
        stats = self.quantizer.statistics(k, mask)
        if c.attention == "full" or c.codebook_mode == "online":
            # Keys are not quantized by the trained codebook here: the commit
            # term must not pull them.
            stats["commit_sum"] = jax.lax.stop_gradient(stats["commit_sum"])
        return out.astype(x.dtype), new_state, stats

    def _projections(self, x):
        """Queries and keys (normalised per head), values and gates (SiLU)
        of the normed input: `[B, T, H, K]`, `[B, T, H, K]`, `[B, T, H, V]`,
        `[B, T, H * V]`."""
        c = self.config
        b, t, _ = x.shape
        h, dk, dv = c.n_head, c.d_k, c.d_v
        dt = c.jnp_dtype
        xt = self.norm(x)
        q = jnp.einsum("btd,de->bte", xt, self.w_q.astype(dt)).reshape(b, t, h, dk)
        kvg = jnp.einsum("btd,de->bte", xt, self.w_kvg.astype(dt))
        k, v, g = jnp.split(kvg, [h * dk, h * (dk + dv)], axis=-1)
        qk_norm = rms_norm if c.qk_norm == "rms" else layer_norm
        q = qk_norm(q)
        k = qk_norm(k.reshape(b, t, h, dk))
        v = jax.nn.silu(v).reshape(b, t, h, dv)
        return q, k, v, jax.nn.silu(g)

    def _attend(self, query, k, v, state, *, scale, rel_query, rel_table, doc_starts):
        """The attention this config names (full, context-parallel VQ, or
        VQ / window on one device), with the state it carries."""
        c = self.config
        if c.attention == "full":
            if not isinstance(state, FullAttentionState):
                raise TypeError(
                    "attention='full' needs a FullAttentionState (init_state); "
                    f"got {type(state).__name__}"
                )
            attn, new_state = full_attention_with_state(
                query,
                k,
                v,
                state,
                scale=scale,
                rel_query=rel_query,
                rel_table=rel_table,
            )
        elif c.codebook_mode == "online":
            if not isinstance(state, OnlineVQState):
                raise TypeError(
                    "codebook_mode='online' needs an OnlineVQState (init_state); "
                    f"got {type(state).__name__}"
                )
            if doc_starts is not None:
                c.check_masks_documents()
            attn, new_state = online_vq_attention_with_state(
                query,
                k,
                v,
                state,
                block_len=c.block_len,
                scale=scale,
                rel_query=rel_query,
                rel_table=rel_table,
            )
        elif c.seq_axis is not None:
            # Context parallelism (the config checked the other options).
            if isinstance(state, FullAttentionState):
                raise TypeError(
                    "seq_axis needs a VQAttentionState (init_state); got a "
                    "FullAttentionState"
                )
            attn, new_state = vq_attention_sharded(
                query,
                k,
                v,
                self.quantizer.codebook,
                state,
                seq_axis=c.seq_axis,
                batch_axis=c.batch_axis,
                block_len=c.block_len,
                mem_len=c.mem_len,
                scale=scale,
                rel_query=rel_query,
                rel_table=rel_table,
                cache_decay=c.cache_decay,
                implementation=c.implementation,
                pallas=c.pallas,
                doc_starts=doc_starts,
            )
        else:
            if not isinstance(state, VQAttentionState):
                raise TypeError(
                    f"attention={c.attention!r} needs a VQAttentionState "
                    f"(init_state); got {type(state).__name__}"
                )
            attn, new_state = vq_attention_with_state(
                query,
                k,
                v,
                self.quantizer.codebook,
                state,
                block_len=c.block_len,
                scale=scale,
                rel_query=rel_query,
                rel_table=rel_table,
                mem_len=c.mem_len,
                use_cache=c.attention == "vq",
                # "window": official agg_cache=False (last mem_len tokens);
                # "block_window": the whole window of the query's block.
                sliding_window=c.attention == "window",
                cache_grad=c.grad_thru_cache,
                state_keys=c.state_keys,
                implementation=c.implementation,
                pallas=c.pallas,
                cache_decay=c.cache_decay,
                doc_starts=doc_starts,
            )
        return attn, new_state

    def auxiliary_loss(
        self, stats: dict[str, Array], *, n_positions: int
    ) -> Float[Array, ""]:
        """The unit's terms of the official objective, to add to a loss of
        your own: `c_beta * commit` (the commit term averaged over
        `n_positions`, the batch's `B * T` as the official loss) plus the
        codebook's EMA surrogate
        and tally surrogate with value 0 (`s - stop_gradient(s)`: only their
        gradients act). With `tvq_eqx.train.with_ema_codebook(opt)` the
        surrogate's gradient makes the optimizer step the codebook's exact
        EMA update; without it the codebook never moves."""
        q = self.quantizer
        surrogate = q.codebook_loss(stats["code_count"], stats["code_key_sum"])
        surrogate = surrogate + q.tally_loss()
        commit = stats["commit_sum"] / n_positions
        return self.config.c_beta * commit + (
            surrogate - jax.lax.stop_gradient(surrogate)
        )
