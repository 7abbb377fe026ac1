"""TransformerConfig: every hyperparameter of the model, frozen and validated."""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Literal

import jax.numpy as jnp

from pallas_kernels.vq_attention.config import PallasConfig

_DTYPES = ("float32", "bfloat16", "float16")
_ATTENTIONS = ("vq", "window", "block_window", "full")
_STATE_KEYS = ("codewords", "codes")
_IMPLEMENTATIONS = (None, "xla", "pallas", "quadratic")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of a Transformer-VQ language model.

    Names follow the official implementation. Parameter arrays do not depend on
    `block_len`, so one set of weights runs at any block length.

    - `n_vocab`, `d_model`, `d_k`, `d_v`, `n_head`, `n_code`, `n_layer`: sizes;
      each layer holds two gated attention units.
    - `block_len`: attention block length; sequences are multiples of it.
    - `mem_len`: window length M (default `block_len`, any M >= 0, also
      above `block_len`): each block attends directly to the last M keys
      before it plus itself, with the Transformer-XL relative biases for
      distances 0..M; older keys go through the compressive cache.
    - `p_dropemb`, `p_dropsin`, `p_dropres`, `p_droplyr`: dropout on embeddings,
      on the relative-position sinusoids, on each unit's residual, and
      LayerDrop (per attention unit or per layer, see `layerdrop`).
    - `c_beta`: commitment-loss weight; `c_gamma`: codebook EMA rate.
    - `param_dtype`, `dtype`: parameter and activation dtypes (log-probs and
      norms are always float32).
    - `attention`: `"vq"` (default: exact VQ attention with the compressive
      cache), `"window"` (compressive cache off: sliding window over the last
      `mem_len` tokens, the official `agg_cache=0`), `"block_window"` (cache
      off, each block sees the `mem_len` keys before it plus itself: the
      previous + current block at the default `mem_len`), `"full"` (baseline:
      un-quantized causal
      softmax over all keys in a KV cache of the last `kv_cache_len` tokens
      plus the current segment, with the same relative biases).
    - `kv_cache_len`: KV-cache capacity of the `"full"` baseline.
    - `grad_thru_cache`: gradients pass through the state carried between
      blocks (window keys and values of earlier blocks, cached means); False
      makes it a constant, as the official `grad_thru_cache=False`.
    - `state_keys`: `"codewords"` (official: the carried window keeps the
      codewords of the step that quantized them) or `"codes"` (keeps codes and
      re-reads the current codebook); differs only after a codebook update.
    - `tie_embeddings`: output head shares the token embedding.
    - `abs_pe`: add sinusoidal absolute position embeddings to the input,
      times a learned scalar that starts at 0 (official `pe_abs`, `ScaledSin`).
    - `output_norm`: RMS-normalise (learned gain and bias) before the output
      head (official `e_preln`).
    - `pe_lam`: sinusoid wavelength base (official launch default 1e5).
    - `e_scale`: the logits `x E^T + b` (tied) or `x W + b` (untied) are
      multiplied by it before the log-softmax (official `e_scale`; 0.005 in
      the official PG-19 and ImageNet64 runs).
    - `qk_norm`: `"rms"` (default, official: RMS norm without centring, no
      gain or bias) or `"layer"` (centred layer norm, tvq-eqx's earlier form).
    - `layerdrop`: `"unit"` (default, official: each attention unit's
      residual is dropped on its own, the second unit sees the first unit's
      dropped output) or `"layer"` (one mask per layer for the sum of both
      units' residuals).
    - `drop_mask_scope`: `"sequence"` (default, official "timeless" masks:
      the LayerDrop and sinusoid-dropout masks depend only on the
      `sequence_key` passed to the model, so every update segment of one
      sequence uses the same masks) or `"segment"` (fresh masks every call,
      drawn from `key`).
    - `lm_loss_average`: `"positions"` (default, official: the masked
      negative log-likelihood summed and divided by all `batch * seq`
      positions, padding included) or `"tokens"` (divided by the number of
      unmasked tokens: the per-token mean, unaffected by padding).
    - `implementation`: VQ-attention implementation (`None` = best available).
    - `pallas`: how the Pallas kernels run when they do (`PallasConfig`: tile
      sizes, backward choice, interpret mode); None = the defaults.
    - `remat`: rematerialisation of the scanned layer body in the backward
      pass (`jax.checkpoint`): `"none"` (default: keep every activation),
      `"full"` (keep only each layer's input, recompute the rest),
      `"dots"` (keep matmul outputs, `checkpoint_policies.dots_saveable`),
      `"dots_no_batch"` (keep matmul outputs without batch dimensions, i.e.
      weight-stationary ones, `dots_with_no_batch_dims_saveable`). Same values and
      gradients, less memory, more compute.
    """

    n_vocab: int = 256
    d_model: int = 128
    d_k: int = 32
    d_v: int = 128
    n_head: int = 1
    n_code: int = 64
    n_layer: int = 2
    block_len: int = 64
    mem_len: int | None = None
    p_dropemb: float = 0.0
    p_dropsin: float = 0.0
    p_dropres: float = 0.0
    p_droplyr: float = 0.0
    c_beta: float = 1e-4
    c_gamma: float = 0.99
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention: str = "vq"
    grad_thru_cache: bool = True
    tie_embeddings: bool = False
    abs_pe: bool = False
    output_norm: bool = True
    pe_lam: float = 100_000.0
    e_scale: float = 1.0
    qk_norm: Literal["rms", "layer"] = "rms"
    layerdrop: Literal["unit", "layer"] = "unit"
    drop_mask_scope: Literal["sequence", "segment"] = "sequence"
    lm_loss_average: Literal["positions", "tokens"] = "positions"
    implementation: str | None = None
    kv_cache_len: int = 2048
    state_keys: str = "codewords"
    pallas: PallasConfig | None = None
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"

    def __post_init__(self):
        positive = (
            "n_vocab",
            "d_model",
            "d_k",
            "d_v",
            "n_head",
            "n_code",
            "n_layer",
            "block_len",
            "kv_cache_len",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"TransformerConfig.{name} must be a positive int; got {value!r}"
                )
        if self.mem_len is None:
            object.__setattr__(self, "mem_len", self.block_len)
        m = self.mem_len
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(
                f"TransformerConfig.mem_len must be a non-negative int; got {m!r}"
            )
        for name in ("p_dropemb", "p_dropsin", "p_dropres", "p_droplyr"):
            p = getattr(self, name)
            if (
                not isinstance(p, (int, float))
                or isinstance(p, bool)
                or not 0.0 <= p < 1.0
            ):
                raise ValueError(
                    f"TransformerConfig.{name} must be in [0, 1); got {p!r}"
                )
        if not isinstance(self.c_beta, (int, float)) or self.c_beta < 0:
            raise ValueError(
                f"TransformerConfig.c_beta must be >= 0; got {self.c_beta!r}"
            )
        if not isinstance(self.c_gamma, (int, float)) or not 0.0 <= self.c_gamma < 1.0:
            raise ValueError(
                f"TransformerConfig.c_gamma must be in [0, 1); got {self.c_gamma!r}"
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(
                    f"TransformerConfig.{name} must be one of {_DTYPES}; got {getattr(self, name)!r}"
                )
        if self.attention not in _ATTENTIONS:
            raise ValueError(
                f"TransformerConfig.attention must be one of {_ATTENTIONS}; got {self.attention!r}"
            )
        if self.state_keys not in _STATE_KEYS:
            raise ValueError(
                f"TransformerConfig.state_keys must be one of {_STATE_KEYS}; "
                f"got {self.state_keys!r}"
            )
        if self.implementation not in _IMPLEMENTATIONS:
            raise ValueError(
                f"TransformerConfig.implementation must be one of {_IMPLEMENTATIONS}; "
                f"got {self.implementation!r}"
            )
        if self.pallas is not None and not isinstance(self.pallas, PallasConfig):
            raise ValueError(
                f"TransformerConfig.pallas must be a PallasConfig or None; got "
                f"{self.pallas!r}"
            )
        for name in ("grad_thru_cache", "tie_embeddings", "abs_pe", "output_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"TransformerConfig.{name} must be a bool; got {getattr(self, name)!r}"
                )
        if not isinstance(self.pe_lam, (int, float)) or self.pe_lam <= 1:
            raise ValueError(
                f"TransformerConfig.pe_lam must be > 1; got {self.pe_lam!r}"
            )
        if (
            isinstance(self.e_scale, bool)
            or not isinstance(self.e_scale, (int, float))
            or not self.e_scale > 0
        ):
            raise ValueError(
                f"TransformerConfig.e_scale must be a float > 0; got {self.e_scale!r}"
            )
        for name in ("qk_norm", "layerdrop", "drop_mask_scope", "lm_loss_average"):
            allowed = _literal_values(name)
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"TransformerConfig.{name} must be one of {allowed}; "
                    f"got {getattr(self, name)!r}"
                )
        if self.remat not in _literal_values("remat"):
            raise ValueError(
                f"TransformerConfig.remat must be one of {_literal_values('remat')}; "
                f"got {self.remat!r}"
            )

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> TransformerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@functools.cache
def _literal_values(name: str) -> tuple[str, ...]:
    """The allowed values of a `Literal`-typed TransformerConfig field."""
    hints = typing.get_type_hints(TransformerConfig)
    return typing.get_args(hints[name])
